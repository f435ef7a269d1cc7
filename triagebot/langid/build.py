"""Build the language-identification model: `python -m triagebot.langid.build`.

The model is a word-level naive Bayes over a fixed set of languages (en, sv, es plus the
languages it must reject as `other`). Each word's probability under a language is a mixture of
its corpus frequency (from `wordfreq`, plus our own support text) and a character language model
(interpolated Witten-Bell, order 5, word boundaries), so known words count strongly and unknown
words (compounds, inflections, typos) still get graded evidence.

Training text: `wordfreq` frequency lists (shipped in the package), hand-written support lines in
this file, and labelled e-mail messages from training/data/*.jsonl when present. Spanish is also
trained with its accents stripped (`pequenos`) and deleted (`pequeos`), because chat text often
loses them; every language gets a small share of accent-stripped forms for the same reason.
The lingua test files are never read here.

Size: n-grams are pruned by (how often they occur) x (how far their back-off is from them), and
the word table keeps frequent words plus the words the spelling model alone would misjudge.

Output: models/langid/langid.npz (no pickle): n-gram keys (7-bit letter codes packed into int64)
with uint8 quantized -log P per language, context back-off weights likewise, a word table of CRC32
keys with uint8 Zipf frequencies per language, and a JSON `meta` (parameters, alphabet, neutral
words, training fingerprint). `--dev PCT` instead builds without PCT% of the wordfreq words and
reports accuracy on them (out-of-vocabulary words and pairs). See `triagebot.langid.Model`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from triagebot.langid import (
    BOS,
    EOS,
    MAX_WORD_LEN,
    FORMAT,
    MODEL_PATH,
    UNKNOWN,
    Model,
    tokenize,
    word_hash,
)

ROOT = Path(__file__).resolve().parents[2]
TRAINING_DATA = ROOT / "training" / "data"

# Languages the model knows. Everything after the first three is reported as `other`;
# they are here so that Norwegian, Danish, German, ... text is recognised and rejected
# instead of being forced into the nearest of en/sv/es.
LANGS: tuple[str, ...] = ("en", "sv", "es", "no", "da", "de", "nl", "fi", "fr", "pt", "it", "ca", "pl")
IN_SCOPE = ("en", "sv", "es")
WORDFREQ_CODE = {"no": "nb"}  # wordfreq's Norwegian list is Bokmål (with some Nynorsk in it)

ORDER = 5               # character n-gram order (4 characters of context)
PURITY = 0.2           # a word trains a language's spelling model only if its frequency there is
                        # at least this share of its highest frequency in any language
CHAR_BETA = 0.3         # char-LM training weight of a word = (freq / min freq) ** beta
MIN_COUNT = 2.0         # prune n-grams seen less than this (weighted) in every language
MIN_CTX_COUNT = 2.0     # keep backoff weights of contexts seen at least this often somewhere
THETA_NGRAM = 3e-5      # keep an n-gram only if (share of letters) x (log-ratio to back-off) is this big
THETA_CTX = 0.1         # keep a context's back-off weight only if it is at least this far from 0
WORD_MARGIN = 1.0       # list a word unless the spelling model alone labels it right by this margin
COMMON_ZIPF = 4.0       # ... and always list words this frequent (1 in 100,000 words) in some language
UNIGRAM_FLOOR = 1e-4    # share of the unigram model spread evenly over the joint alphabet
WORD_LAMBDA = 0.5       # weight of the word-frequency part of the word mixture
MIN_ZIPF_TRAIN = 1.0    # en/sv/es words down to this Zipf frequency (1 per 100 million) train the model
MIN_ZIPF_SCOPE = 1.5    # ... and those down to this one may enter the word table
MIN_ZIPF_OTHER = 2.0    # words of the rejected languages: training and word table
STRIP_SHARE = 0.15      # frequency given to the accent-stripped form of a word (all languages)
ES_DELETE_SHARE = 0.3   # frequency given to the accent-deleted form of a Spanish word
NGRAM_STEP = 0.2        # quantization step (nats) of stored n-gram log-probabilities
WORD_STEP = 0.05        # quantization step of stored Zipf frequencies
OWN_TEXT_SHARE = 0.03   # share of the word distribution given to our own support text

# log-prior added to each language before the decision; rejected languages start lower, so
# a short, ambiguous text stays in en/sv/es and only clear evidence makes it `other`.
PRIOR_OTHER = -4.0
HINT_BOOST = 2.0        # language the sender/thread used before
LOCALE_BOOST = 1.0      # Slack user locale (en locales are weaker: many people keep en-US)
LOCALE_BOOST_EN = 0.4

# Technical and brand words that appear in every language of the desk; they carry no evidence
# about the language of the message around them (a Swedish line with "APN" and "firmware"
# is still Swedish). Ignored unless the text consists of nothing else.
NEUTRAL_WORDS = sorted(set("""
apn apns roaming sim sims esim esims euicc eid iccid iccids imsi imsis msisdn msisdns imei imeis
portal portalen firmware fw reset reboot restart modem modems router routers gateway gateways
lte gsm gprs umts wcdma nbiot nb iot m2m catm ltem volte ip ips ipv ipsec vpn vpns dns dhcp nat
sms mms ussd csd pdp ota api apis sdk http https tcp udp mqtt coap ping pings timeout
hlr hss pgw sgw ggsn sgsn mme radius qos rssi rsrp rsrq sinr cell cellid bts enodeb gnodeb
at cgatt cgact cereg creg cops cme cms ceer cbst cpin csq
login logins dashboard backend frontend webhook webhooks cloud server servers app
ok okay asap fyi btw pls thx
telia tele telenor vodafone movistar orange telefonica telefónica tre comviq
""".split()))

# ---------------------------------------------------------------------------------------------
# Hand-written training text: short support lines and everyday sentences, as people write them.
# (The test sentences in tests/test_langid.py are different texts.)
OWN_TEXT: dict[str, str] = {
    "en": """
hi, our trackers stopped sending data this morning, can you check?
still not working after the reboot
thanks for the quick reply, that fixed it
we can't reach the devices since yesterday evening
please cancel these numbers and send us a confirmation
how do I change the APN on the portal?
the invoice for last month is much higher than usual, can you explain the extra charges?
we would like to order five hundred SIM cards for our new meters
any update on this? the customer is getting impatient
no signal at the site, the antenna looks fine
Kind regards
Best regards, the operations team
could you please activate the attached list of cards
is there a known outage in the north of the country?
the units attach but never get an IP address
sorry, my mistake, it works now
good morning, we have a problem with roaming in Germany
""",
    "sv": """
hej, funkar inte
hej! vi har problem med datan på våra mätare sedan i morse
funkar fortfarande inte efter omstart
tack för snabbt svar, nu fungerar det
kan ni kolla om simkorten är aktiva i portalen?
vi har bytt APN men får ingen data ändå
modemet tappar uppkopplingen hela tiden efter firmware-uppdateringen
fakturan för förra månaden är mycket högre än vanligt, vad beror det på?
vi vill beställa femhundra nya simkort till våra laddboxar
någon uppdatering? kunden börjar bli otålig
ingen täckning ute på anläggningen, antennen ser hel ut
Med vänliga hälsningar
Mvh driftgruppen
tack på förhand
kan ni aktivera korten i bifogad lista
är det någon känd störning i norra Sverige?
enheterna kopplar upp men får aldrig någon IP-adress
förlåt, mitt fel, det funkar nu
god morgon, vi har problem med roaming i Tyskland
det här är inte okej, vi har väntat i tre dagar
kolla gärna loggarna och återkom
jag kommer inte in i portalen, lösenordet funkar inte
ska det vara något annat APN för era kort?
hej igen, samma fel som förra veckan
""",
    "es": """
hola, no funciona
buenos días, los routers no tienen datos desde ayer
sigue sin funcionar después de reiniciar
gracias por la rápida respuesta, ya funciona
podéis revisar si las tarjetas SIM están activas en el portal?
hemos cambiado el APN pero seguimos sin datos
el módem pierde la conexión cada poco después de actualizar el firmware
la factura del mes pasado es mucho más alta de lo normal, a qué se debe?
queremos pedir quinientas tarjetas SIM para los nuevos contadores
alguna novedad? el cliente está impaciente
no hay cobertura en la instalación, la antena parece estar bien
Un saludo
Saludos cordiales
quedo a la espera de vuestra respuesta
por favor activad las tarjetas de la lista adjunta
hay alguna incidencia conocida en el norte?
los equipos se registran pero nunca obtienen dirección IP
perdón, error mío, ya funciona
buenas tardes, tenemos un problema con el roaming en Francia
no puedo entrar en el portal, la contraseña no funciona
necesitamos ayuda urgente, tenemos todos los equipos caídos
""",
    "no": """
hei, det fungerer ikke
hei! vi har ikke fått data på målerne siden i morges
fungerer fortsatt ikke etter omstart
takk for raskt svar, nå virker det
kan dere sjekke om SIM-kortene er aktive i portalen?
vi har byttet APN men får ingen data likevel
fakturaen for forrige måned er mye høyere enn vanlig, hva skyldes det?
vi ønsker å bestille fem hundre nye SIM-kort
noen oppdatering? kunden begynner å bli utålmodig
Med vennlig hilsen
jeg kommer ikke inn i portalen, passordet virker ikke
hei, eg har ikkje fått data på ruteren sidan i går
kva er feil med abonnementet vårt?
korleis kan vi endre APN på desse korta?
det fungerer ikkje i dag heller
vi treng hjelp med fakturaen, den er altfor høg
takk for svaret, no verkar det
eg veit ikkje kvifor modemet ikkje koplar seg til
kan de sjå på dette så snart som mogleg?
Med venleg helsing
""",
    "da": """
hej, det virker ikke
hej! vi har ikke fået data på vores målere siden i morges
virker stadig ikke efter genstart
tak for hurtigt svar, nu virker det
kan I tjekke om SIM-kortene er aktive i portalen?
vi har skiftet APN men får stadig ingen data
fakturaen for sidste måned er meget højere end normalt, hvad skyldes det?
vi vil gerne bestille fem hundrede nye SIM-kort
nogen opdatering? kunden er ved at blive utålmodig
Med venlig hilsen
jeg kan ikke logge ind i portalen, adgangskoden virker ikke
undskyld, min fejl, det virker nu
""",
    "de": """
hallo, das funktioniert nicht
seit gestern haben unsere Router keine Datenverbindung
funktioniert auch nach dem Neustart nicht
vielen Dank für die schnelle Antwort, jetzt geht es
können Sie bitte prüfen, ob die SIM-Karten im Portal aktiv sind?
wir haben den APN geändert, bekommen aber trotzdem keine Daten
die Rechnung für den letzten Monat ist viel höher als sonst
wir möchten fünfhundert neue SIM-Karten bestellen
Mit freundlichen Grüßen
ich komme nicht ins Portal, das Passwort funktioniert nicht
""",
    "nl": """
hallo, het werkt niet
sinds gisteren hebben onze routers geen dataverbinding
bedankt voor het snelle antwoord, het werkt nu
kunnen jullie controleren of de simkaarten actief zijn?
Met vriendelijke groet
""",
    "fi": """
hei, se ei toimi
eilisestä lähtien reitittimissämme ei ole ollut datayhteyttä
kiitos nopeasta vastauksesta, nyt se toimii
voitteko tarkistaa, ovatko SIM-kortit aktiivisia?
Ystävällisin terveisin
""",
    "fr": """
bonjour, ça ne marche pas
depuis hier nos routeurs n'ont plus de connexion de données
merci pour la réponse rapide, ça fonctionne maintenant
pouvez-vous vérifier si les cartes SIM sont actives ?
Cordialement
""",
    "pt": """
olá, não está funcionando
desde ontem os nossos routers estão sem ligação de dados
obrigado pela resposta rápida, agora funciona
podem verificar se os cartões SIM estão ativos?
Atenciosamente
""",
    "it": """
ciao, non funziona
da ieri i nostri router non hanno connessione dati
grazie per la risposta veloce, adesso funziona
potete verificare se le schede SIM sono attive?
Cordiali saluti
""",
    "ca": """
hola, no funciona
des d'ahir els nostres encaminadors no tenen connexió de dades
gràcies per la resposta ràpida, ara funciona
podeu comprovar si les targetes SIM estan actives?
Salutacions
""",
    "pl": """
dzień dobry, to nie działa
od wczoraj nasze routery nie mają połączenia z internetem
dziękuję za szybką odpowiedź, teraz działa
czy możecie sprawdzić, czy karty SIM są aktywne?
Pozdrawiam
""",
}


# ---------------------------------------------------------------------------------------------
def strip_accents(word: str) -> str:
    """`pequeños` -> `pequenos`: combining marks removed (how accents get lost when typing)."""
    return unicodedata.normalize("NFC", "".join(
        c for c in unicodedata.normalize("NFD", word) if not unicodedata.combining(c)))


def delete_accents(word: str) -> str:
    """`pequeños` -> `pequeos`: non-ASCII letters deleted (how some scraped text loses them)."""
    return "".join(c for c in word if c.isascii())


_QUOTE_START = re.compile(
    r"^\s*(>|On .{0,200} wrote:|El .{0,200} escribi[oó]:|Den .{0,200} skrev\b.{0,200}:\s*$|"
    r"-{2,}\s*(Original Message|Ursprungligt meddelande|Mensaje original|Forwarded message)|"
    r"(From|Från|De|Fra|Von|Sent|Skickat|Enviado):\s)", re.IGNORECASE)


def cut_quoted(body: str) -> str:
    """The new text of a mail body: everything before the first quote/forward marker."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if _QUOTE_START.match(line):
            return "\n".join(lines[:i])
    return body


def _holdout(word: str, share: int) -> bool:
    """Deterministic held-out split for the development check (a word is out in every language)."""
    h = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % 100 < share


def wordfreq_words(lang: str, min_zipf: float) -> dict[str, float]:
    """wordfreq's frequency list for a language, restricted to tokens our tokenizer keeps whole."""
    import wordfreq

    code = WORDFREQ_CODE.get(lang, lang)
    out: dict[str, float] = {}
    floor = 10.0 ** (min_zipf - 9.0)
    for w, f in wordfreq.get_frequency_dict(code, wordlist="best").items():
        if f < floor or len(w) > MAX_WORD_LEN:
            continue
        toks = tokenize(w)
        if len(toks) == 1 and toks[0] == w:
            out[w] = f
    return out


def training_fingerprint() -> dict:
    """What the model was built from: data hash, library versions, date (stored in the model)."""
    import datetime
    import importlib.metadata as md

    h = hashlib.sha256(json.dumps(OWN_TEXT, sort_keys=True).encode())
    files = sorted(TRAINING_DATA.glob("*.jsonl")) if TRAINING_DATA.is_dir() else []
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "training_files": [p.name for p in files],
        "training_sha256": h.hexdigest(),
        "libraries": {name: md.version(name) for name in ("wordfreq", "numpy")},
    }


def own_text(lang: str) -> list[str]:
    """Our hand-written lines plus labelled e-mail bodies (new text only) from training/data."""
    texts = [line for line in OWN_TEXT.get(lang, "").splitlines() if line.strip()]
    for path in sorted(TRAINING_DATA.glob("*.jsonl")) if TRAINING_DATA.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # files are being written while we read; a torn line is skipped
            # Slack lines are kept out: the benchmark measures them as unseen chat text.
            if rec.get("language") != lang or rec.get("channel") != "email" or rec.get("html"):
                continue
            texts.append((rec.get("subject") or "") + "\n" + cut_quoted(rec.get("body") or ""))
    return texts


def word_distribution(lang: str, holdout: int = 0) -> dict[str, float]:
    """Frequency of each word in `lang`: wordfreq + accent-less variants + our own text."""
    min_zipf = MIN_ZIPF_TRAIN if lang in IN_SCOPE else MIN_ZIPF_OTHER
    base = wordfreq_words(lang, min_zipf)
    if holdout:
        base = {w: f for w, f in base.items() if not _holdout(w, holdout)}
    dist: Counter[str] = Counter()
    for w, f in base.items():
        dist[w] += f
        s = strip_accents(w)
        if s != w:
            dist[s] += f * STRIP_SHARE
        if lang == "es":
            d = delete_accents(w)
            if d != w and d:
                dist[d] += f * ES_DELETE_SHARE
    counts: Counter[str] = Counter()
    for text in own_text(lang):
        counts.update(tokenize(text))
    total = sum(counts.values())
    for w, c in counts.items():
        if len(w) <= MAX_WORD_LEN:
            dist[w] += OWN_TEXT_SHARE * c / total
            s = strip_accents(w)
            if s != w:
                dist[s] += STRIP_SHARE * OWN_TEXT_SHARE * c / total
    return dict(dist)


# ---------------------------------------------------------------------------------------------
class Alphabet:
    """Letters <-> codes 3..126 (0 padding, 1 and 2 the word boundaries), as the runtime uses them."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.letters = "".join(sorted(set(chars)))
        if len(self.letters) > UNKNOWN - 3:
            raise ValueError(f"alphabet too large for 7-bit codes: {len(self.letters)} letters")
        self.code = {c: i + 3 for i, c in enumerate(self.letters)}


def language_alphabet(dist: dict[str, float], share: float = 2e-5) -> set[str]:
    """Letters making up at least `share` of the language's running text (drops stray scripts)."""
    c: Counter[str] = Counter()
    for w, f in dist.items():
        for ch in w:
            c[ch] += f
    total = sum(c.values())
    return {ch for ch, v in c.items() if v / total >= share}


def count_ngrams(words: list[str], weights: np.ndarray, alpha: Alphabet) -> tuple[np.ndarray, np.ndarray]:
    """Weighted counts of all 1..ORDER-grams (a letter with up to ORDER-1 letters of history)."""
    width = MAX_WORD_LEN + 2
    codes = np.zeros((len(words), width), dtype=np.int64)
    for i, w in enumerate(words):
        codes[i, 0] = BOS
        codes[i, 1:len(w) + 1] = [alpha.code[c] for c in w]
        codes[i, len(w) + 1] = EOS
    keys_all, cnt_all = [], []
    for n in range(1, ORDER + 1):
        for t in range(1, width):
            s = t - n + 1
            if s < 0:
                continue
            valid = codes[:, t] != 0
            if not valid.any():
                continue
            key = np.zeros(int(valid.sum()), dtype=np.int64)
            for j in range(s, t + 1):
                key = (key << 7) | codes[valid, j]
            keys_all.append(key)
            cnt_all.append(weights[valid])
    uniq, inv = np.unique(np.concatenate(keys_all), return_inverse=True)
    return uniq, np.bincount(inv, weights=np.concatenate(cnt_all))


def _order(keys: np.ndarray) -> np.ndarray:
    """n-gram order of packed keys (codes are >= 1, so the top 7-bit group is never empty)."""
    o = np.zeros(len(keys), dtype=np.int64)
    k = keys.copy()
    while (k > 0).any():
        o += k > 0
        k >>= 7
    return o


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray, default: float = 0.0) -> np.ndarray:
    """values[key] for each query key, `default` where the key is absent."""
    if len(sorted_keys) == 0:
        return np.full(len(query), default)
    pos = np.clip(np.searchsorted(sorted_keys, query), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == query, values[pos], default)


class LangCounts:
    """One language's n-gram counts and context statistics for Witten-Bell smoothing."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.keys, self.counts = keys, counts
        multi = _order(keys) > 1
        c_uniq, c_inv = np.unique(keys[multi] >> 7, return_inverse=True)
        self.ctx_keys = c_uniq
        self.ctx_count = np.bincount(c_inv, weights=counts[multi])
        self.ctx_types = np.bincount(c_inv).astype(np.float64)
        self.uni_total = counts[~multi].sum()


def count_all(dists: dict[str, dict[str, float]]) -> tuple[Alphabet, dict[str, LangCounts]]:
    """Character n-gram counts of every language (words weighted by frequency ** CHAR_BETA)."""
    alphabets = {lang: language_alphabet(d) for lang, d in dists.items()}
    alpha = Alphabet(set().union(*alphabets.values()))
    top: dict[str, float] = {}
    for d in dists.values():
        for w, f in d.items():
            if f > top.get(w, 0.0):
                top[w] = f
    per_lang: dict[str, LangCounts] = {}
    for lang in LANGS:
        d = dists[lang]
        # Frequency lists of every language contain English and neighbours' words (web text);
        # the spelling model of a language learns only from words that are at home in it.
        words = [w for w, f in d.items() if f >= PURITY * top[w] and all(c in alphabets[lang] for c in w)]
        f = np.array([d[w] for w in words])
        keys, counts = count_ngrams(words, (f / f.min()) ** CHAR_BETA, alpha)
        per_lang[lang] = LangCounts(keys, counts)
        log(f"  {lang}: {len(words):7d} words, {len(keys):8d} n-grams")
    return alpha, per_lang


def char_tables(alpha: Alphabet, per_lang: dict[str, LangCounts]) -> dict[str, np.ndarray]:
    """Smoothed log P(letter | context) for all kept n-grams, and log back-off weights of contexts."""
    uni = np.array([EOS] + [alpha.code[c] for c in alpha.letters], dtype=np.int64)
    kept = [uni] + [lc.keys[(lc.counts >= MIN_COUNT) & (_order(lc.keys) > 1)] for lc in per_lang.values()]
    rows = np.unique(np.concatenate(kept))
    orders = _order(rows)
    ctx_all = np.unique(np.concatenate([lc.ctx_keys[lc.ctx_count >= MIN_CTX_COUNT] for lc in per_lang.values()]))
    logp = np.zeros((len(rows), len(LANGS)))
    freq = np.zeros((len(rows), len(LANGS)))      # share of the language's letter positions
    log_gamma = np.zeros((len(ctx_all), len(LANGS)))
    for li, lang in enumerate(LANGS):
        lc = per_lang[lang]
        prob = np.zeros(len(rows))
        for n in range(1, ORDER + 1):
            sel = np.nonzero(orders == n)[0]
            g = rows[sel]
            c = _lookup(lc.keys, lc.counts, g)
            if n == 1:
                prob[sel] = (1 - UNIGRAM_FLOOR) * c / lc.uni_total + UNIGRAM_FLOOR / len(uni)
                continue
            lower = prob[np.searchsorted(rows, g & ((1 << (7 * (n - 1))) - 1))]
            cc = _lookup(lc.ctx_keys, lc.ctx_count, g >> 7)
            ct = _lookup(lc.ctx_keys, lc.ctx_types, g >> 7)
            seen = cc > 0
            prob[sel] = np.where(seen, (c + ct * lower) / np.where(seen, cc + ct, 1.0), lower)
        logp[:, li] = np.log(prob)
        freq[:, li] = _lookup(lc.keys, lc.counts, rows) / lc.uni_total
        cc = _lookup(lc.ctx_keys, lc.ctx_count, ctx_all)
        ct = _lookup(lc.ctx_keys, lc.ctx_types, ctx_all)
        seen = cc > 0
        log_gamma[:, li] = np.where(seen, np.log(np.where(seen, ct / np.where(seen, cc + ct, 1.0), 1.0)), 0.0)
    return {"rows": rows, "logp": logp, "freq": freq, "ctx": ctx_all, "log_gamma": log_gamma}


def prune_char(t: dict[str, np.ndarray], theta: float, theta_ctx: float) -> dict[str, np.ndarray]:
    """Drop n-grams that matter little: how often they occur times how far back-off is from them.

    Importance of an n-gram = max over languages of (its share of that language's letters) x
    |log P - log P_backoff| (Stolcke-style relative-entropy pruning, per language).
    """
    rows, logp, freq, ctx, lg = t["rows"], t["logp"], t["freq"], t["ctx"], t["log_gamma"]
    orders = _order(rows)
    keep = orders == 1
    multi = ~keep
    n = orders[multi]
    suffix = rows[multi] & ((np.int64(1) << (7 * (n - 1))) - 1)
    backoff = logp[np.searchsorted(rows, suffix)]
    cpos = np.clip(np.searchsorted(ctx, rows[multi] >> 7), 0, len(ctx) - 1)
    has_ctx = ctx[cpos] == rows[multi] >> 7
    backoff = backoff + np.where(has_ctx[:, None], lg[cpos], 0.0)
    importance = (freq[multi] * np.abs(logp[multi] - backoff)).max(axis=1)
    keep[multi] = importance >= theta
    # a context's back-off weight is needed only where some kept longer n-gram could miss
    kept_ctx = np.unique(rows[keep & (orders > 1)] >> 7)
    ckeep = np.isin(ctx, kept_ctx) & (np.abs(lg).max(axis=1) >= theta_ctx)
    return {"rows": rows[keep], "logp": logp[keep], "ctx": ctx[ckeep], "log_gamma": lg[ckeep]}


def word_table(dists: dict[str, dict[str, float]], char_model: Model, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Hashed word table: Zipf frequency per language for frequent words and those the spelling model misjudges.

    A listed word is kept when it is frequent (Zipf >= COMMON_ZIPF somewhere) or when, judged
    alone, the character model would give it a different label (en/sv/es/other) than its listed
    frequencies do, or the same label by less than `margin` nats.
    """
    vocab: dict[str, None] = {}
    for lang in LANGS:
        floor = MIN_ZIPF_SCOPE if lang in IN_SCOPE else MIN_ZIPF_OTHER
        for w, f in dists[lang].items():
            if math.log10(f) + 9.0 >= floor:
                vocab[w] = None
    words = list(vocab)
    zipf = np.zeros((len(words), len(LANGS)))
    for li, lang in enumerate(LANGS):
        d = dists[lang]
        zipf[:, li] = [math.log10(d[w]) + 9.0 if w in d else 0.0 for w in words]
    zipf = np.where(zipf > 0, np.maximum(zipf, WORD_STEP), 0.0)
    prior = np.array([0.0 if lang in IN_SCOPE else PRIOR_OTHER for lang in LANGS])
    n_in = len(IN_SCOPE)

    def groups(score: np.ndarray) -> np.ndarray:  # en, sv, es, best rejected language
        return np.concatenate([score[:, :n_in], score[:, n_in:].max(axis=1, keepdims=True)], axis=1)

    keep = np.zeros(len(words), dtype=bool)
    step = 5000
    for start in range(0, len(words), step):
        char = char_model.char_lp(words[start:start + step]).astype(np.float64) + math.log(1 - WORD_LAMBDA)
        z = zipf[start:start + step]
        with np.errstate(divide="ignore"):
            listed = np.where(z > 0, (z - 9.0) * math.log(10) + math.log(WORD_LAMBDA), -np.inf)
        full = groups(np.logaddexp(listed, char) + prior)
        alone = groups(char + prior)
        label = full.argmax(axis=1)
        rows = np.arange(len(label))
        rival = alone.copy()
        rival[rows, label] = -np.inf
        # frequent words always: their frequencies are the best evidence short texts have
        keep[start:start + step] = (alone[rows, label] - rival.max(axis=1) < margin) | (z.max(axis=1) >= COMMON_ZIPF)
    idx = np.nonzero(keep)[0]
    hashes = np.array([word_hash(words[i]) for i in idx], dtype=np.uint32)
    q = np.clip(np.round(zipf[idx] / WORD_STEP), 0, 255).astype(np.uint8)
    # on a hash collision keep the more frequent word (a collision costs one word, nothing else)
    order = np.lexsort((-zipf[idx].max(axis=1), hashes))
    hashes, q = hashes[order], q[order]
    first = np.ones(len(hashes), dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    log(f"  word table: {len(words)} candidates, {len(idx)} kept, {int((~first).sum())} hash collisions dropped")
    return hashes[first], q[first]


def _quantize(neg_log: np.ndarray) -> np.ndarray:
    return np.clip(np.round(neg_log / NGRAM_STEP), 0, 255).astype(np.uint8)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def meta(alpha: Alphabet) -> dict:
    """Parameters the runtime needs, stored with the tables."""
    return {
        "format": FORMAT,
        "version": "langid-wb5-1",
        "langs": list(LANGS),
        "alphabet": alpha.letters,
        "order": ORDER,
        "ngram_step": NGRAM_STEP,
        "word_step": WORD_STEP,
        "word_lambda": WORD_LAMBDA,
        "prior_other": PRIOR_OTHER,
        "hint_boost": HINT_BOOST,
        "locale_boost": LOCALE_BOOST,
        "locale_boost_en": LOCALE_BOOST_EN,
        "neutral_words": NEUTRAL_WORDS,
        "params": {
            "purity": PURITY, "char_beta": CHAR_BETA, "min_count": MIN_COUNT, "min_ctx_count": MIN_CTX_COUNT,
            "theta_ngram": THETA_NGRAM, "theta_ctx": THETA_CTX, "word_margin": WORD_MARGIN, "common_zipf": COMMON_ZIPF,
            "unigram_floor": UNIGRAM_FLOOR, "min_zipf_train": MIN_ZIPF_TRAIN, "min_zipf_scope": MIN_ZIPF_SCOPE,
            "min_zipf_other": MIN_ZIPF_OTHER, "strip_share": STRIP_SHARE,
            "es_delete_share": ES_DELETE_SHARE, "own_text_share": OWN_TEXT_SHARE,
        },
    }


def _meta_array(m: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(m, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def assemble(alpha: Alphabet, char: dict[str, np.ndarray], dists: dict[str, dict[str, float]],
             extra_meta: dict | None = None) -> dict[str, np.ndarray]:
    """Prune the character tables, choose the word table, and return the arrays to save."""
    pruned = prune_char(char, THETA_NGRAM, THETA_CTX)
    m = meta(alpha) | (extra_meta or {})
    arrays = {
        "ngram_keys": pruned["rows"],
        "ngram_q": _quantize(-pruned["logp"]),
        "ctx_keys": pruned["ctx"],
        "ctx_q": _quantize(-pruned["log_gamma"]),
        "word_keys": np.zeros(0, dtype=np.uint32),
        "word_q": np.zeros((0, len(LANGS)), dtype=np.uint8),
        "meta": _meta_array(m),
    }
    log(f"  n-grams: {len(char['rows'])} -> {len(pruned['rows'])}; contexts: {len(char['ctx'])} -> {len(pruned['ctx'])}")
    arrays["word_keys"], arrays["word_q"] = word_table(dists, Model(arrays), WORD_MARGIN)
    return arrays


def build(holdout: int = 0) -> dict[str, np.ndarray]:
    """All arrays of the model (holdout > 0 leaves that percentage of wordfreq words out)."""
    fingerprint = training_fingerprint()
    dists = {lang: word_distribution(lang, holdout) for lang in LANGS}
    alpha, per_lang = count_all(dists)
    char = char_tables(alpha, per_lang)
    extra = fingerprint | {"holdout_percent": holdout,
                           "version": f"langid-wb5-{fingerprint['training_sha256'][:8]}"}
    return assemble(alpha, char, dists, extra)


# ---------------------------------------------------------------------------------------------
def dev_check(model: Model, holdout: int, n: int = 600) -> dict[str, float]:
    """Accuracy on held-out wordfreq words and pairs (left out of every language), per language.

    Rejected languages count as right when the answer is `other`; their single words rarely are,
    by design (a lone word needs clear evidence to leave en/sv/es).
    """
    import random

    rng = random.Random(7)
    out: dict[str, float] = {}
    for lang in LANGS:
        pool = [(w, f) for w, f in wordfreq_words(lang, 1.5).items()
                if _holdout(w, holdout) and len(w) >= 5]
        if not pool:
            continue
        words = [w for w, _ in pool]
        weights = [f ** 0.5 for _, f in pool]
        sample = rng.choices(words, weights, k=2 * n)
        if lang == "es":
            sample = [delete_accents(w) if i % 2 else w for i, w in enumerate(sample)]
        want = lang if lang in IN_SCOPE else "other"
        single = sum(model.detect(w)[0] == want for w in sample[:n]) / n
        pairs = sum(model.detect(f"{a} {b}")[0] == want for a, b in zip(sample[:n], sample[n:])) / n
        out[f"{lang}/word"] = round(single, 3)
        out[f"{lang}/pair"] = round(pairs, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the model and save it (or, with --dev, report held-out accuracy)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=MODEL_PATH)
    ap.add_argument("--dev", type=int, default=0, metavar="PCT",
                    help="hold out PCT%% of wordfreq words, report accuracy on them, save nothing")
    args = ap.parse_args(argv)
    t0 = time.time()
    arrays = build(args.dev)
    if args.dev:
        model = Model(arrays)
        for k, v in dev_check(model, args.dev).items():
            print(f"{k:10s} {v:.3f}")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.stem + ".partial.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(args.out)  # a worker loading the model never sees half a file
    t1 = time.time()
    Model.load(args.out)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {t1 - t0:.0f}s; "
        f"load {time.time() - t1:.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
