"""Language identification for triage: en / sv / es / other, fast enough for every chat line.

`detect(text, hint=None, locale=None) -> (language, confidence)`.

The model (built by `python -m triagebot.langid.build`, stored in models/langid/langid.npz) is a
naive Bayes over words. A word's log-probability under each language mixes its frequency in that
language with a character 5-gram model (word boundaries, Witten-Bell back-off), so a known word
("funkar") is strong evidence and an unknown one ("lokalförsörjningsnämndens", "pequeos") is still
judged by its spelling. Norwegian, Danish, German and other languages are modelled too, so they
are rejected as `other` instead of being pushed into the nearest of en/sv/es; they start with a
lower prior, so a short, ambiguous text stays in scope and only clear evidence makes it `other`.
The sender's earlier language (`hint`) and the Slack locale add to the prior; they never override
clear evidence. Technical words shared by all languages (APN, roaming, firmware, ...) and short
all-capital acronyms are ignored when the text has other words.

All lookups are sorted-array searches over whole texts (numpy), so loading is just reading arrays.
"""
from __future__ import annotations

import json
import math
import re
import threading
import unicodedata
import zlib
from pathlib import Path

import numpy as np

__all__ = ["detect", "scores", "tokenize", "word_hash", "Model", "get_model", "MODEL_PATH", "LANGUAGES"]

MODEL_PATH = Path(__file__).resolve().parents[2] / "models" / "langid" / "langid.npz"
LANGUAGES = ("en", "sv", "es", "other")
FORMAT = 1                   # layout of the model file; a file of another layout is refused

BOS, EOS = 1, 2              # codes of the word-boundary symbols; letters are 3..126
UNKNOWN = 127                # code of a character no modelled language uses
MAX_WORDS = 200              # longer texts are judged on their first 200 words
MAX_WORD_LEN = 30
ACRONYM_MAX = 5              # "APN", "SIM", "NOC": all-capital words up to this length are neutral

# a run of letters (with inner apostrophes) that touches no digit or underscore: identifiers,
# versions and snake_case are not language
_WORD = re.compile(r"(?<!\w)[^\W\d_]+(?:'[^\W\d_]+)*(?!\w)")
_LN10 = math.log(10.0)


def _words(text: str) -> list[tuple[str, bool]]:
    """(lower-cased word, is_acronym) for each word of a text."""
    found = _WORD.findall(unicodedata.normalize("NFC", text).replace("’", "'"))
    return [(w.lower(), 1 < len(w) <= ACRONYM_MAX and w.isupper()) for w in found]


def tokenize(text: str) -> list[str]:
    """Lower-cased words of a text as the model sees them."""
    return [w for w, _ in _words(text)]


def word_hash(word: str) -> int:
    """Stable 32-bit key of a word in the word table."""
    return zlib.crc32(word.encode("utf-8"))


def _lang_code(value: str | None) -> str | None:
    """'sv-SE' / 'sv_SE' / 'nb' / 'nn-NO' -> model language code (Norwegian variants -> 'no')."""
    if not value:
        return None
    code = re.split(r"[-_.@]", value.strip().lower(), maxsplit=1)[0]
    return "no" if code in ("nb", "nn", "no") else code


class Model:
    """The loaded tables and the scoring function."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.meta = json.loads(bytes(arrays["meta"]).decode("utf-8"))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"language model file has format {self.meta.get('format')!r}, this code reads "
                             f"format {FORMAT}: rebuild it with `python -m triagebot.langid.build`")
        self.langs: tuple[str, ...] = tuple(self.meta["langs"])
        self.in_scope = np.array([lang in LANGUAGES for lang in self.langs])
        self.order = int(self.meta["order"])
        self.alphabet: str = self.meta["alphabet"]
        self._code = {c: i + 3 for i, c in enumerate(self.alphabet)}
        # n-gram keys: 7-bit codes packed oldest-first; keeping the low n groups gives the n-gram
        self._mask_of = [(1 << (7 * n)) - 1 for n in range(self.order + 1)]
        self._rows = dict(zip(arrays["ngram_keys"].tolist(), range(len(arrays["ngram_keys"]))))
        self._ctxs = dict(zip(arrays["ctx_keys"].tolist(), range(len(arrays["ctx_keys"]))))
        # tables stay quantized (uint8, -log p / step) until gathered; one extra all-zero row
        # stands for letters no language uses
        self._none_row = len(arrays["ngram_keys"])
        self.ngram_q = np.vstack([arrays["ngram_q"], np.zeros((1, len(self.langs)), dtype=np.uint8)])
        self.ctx_q = arrays["ctx_q"]
        self.ngram_step = float(self.meta["ngram_step"])
        self.word_keys = arrays["word_keys"].astype(np.uint32)
        self.word_q = arrays["word_q"]
        self.word_step = float(self.meta["word_step"])
        lam = float(self.meta["word_lambda"])
        # log(lambda * frequency) for each stored Zipf step; -inf for 0, "not listed"
        lut = np.arange(256, dtype=np.float64) * (self.word_step * _LN10) + math.log(lam) - 9.0 * _LN10
        lut[0] = -np.inf
        self._listed_lut = lut.astype(np.float32)
        self.char_weight = math.log(1.0 - lam)
        self.neutral = frozenset(self.meta["neutral_words"])
        self.base_prior = np.where(self.in_scope, 0.0, float(self.meta["prior_other"]))
        self._other = ~self.in_scope
        self._cache: dict[str, np.ndarray] = {}
        self._priors: dict[tuple[str | None, str | None], np.ndarray] = {}

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> "Model":
        """Load a model file written by triagebot.langid.build."""
        with np.load(path, allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unknown"))

    # -- scoring ---------------------------------------------------------------------------------
    def char_lp(self, words: list[str]) -> np.ndarray:
        """log P(word | language) under each language's character model, shape (words, langs)."""
        if not words:
            return np.zeros((0, len(self.langs)), dtype=np.float32)
        code, masks = self._code, self._mask_of
        full = masks[self.order]
        get_row, get_ctx, none_row = self._rows.get, self._ctxs.get, self._none_row
        rows: list[int] = []
        starts: list[int] = []
        ctx: list[int] = []
        ctx_word: list[int] = []
        for wi, w in enumerate(words):
            starts.append(len(rows))
            # key of the longest window ending at each letter: 7-bit codes packed oldest-first,
            # starting from the word-start symbol, so early windows are simply shorter
            keys = []
            k = BOS
            for c in [code.get(ch, UNKNOWN) for ch in w]:
                k = ((k << 7) | c) & full
                keys.append(k)
            keys.append(((k << 7) | EOS) & full)
            found = list(map(get_row, keys))     # the common case: the longest n-gram is known
            if None in found:
                for i, r in enumerate(found):
                    if r is not None:
                        continue
                    key = keys[i]
                    n = (key.bit_length() + 6) // 7
                    while r is None and n > 1:
                        c_idx = get_ctx(key >> 7)
                        if c_idx is not None:  # context known, letter never followed it: back-off weight
                            ctx.append(c_idx)
                            ctx_word.append(wi)
                        n -= 1
                        key &= masks[n]
                        r = get_row(key)
                    found[i] = none_row if r is None else r  # a letter no language uses: no evidence
            rows.extend(found)
        out = np.add.reduceat(self.ngram_q[rows].astype(np.float32), starts, axis=0)
        if ctx:
            np.add.at(out, ctx_word, self.ctx_q[ctx])
        out *= -self.ngram_step
        return out

    def word_lp(self, words: list[str]) -> np.ndarray:
        """log P(word | language): frequency-list mixture with the character model, (words, langs)."""
        cache = self._cache
        got = {w: cache.get(w) for w in words}   # a local view: other threads may clear the cache
        new = [w for w, v in got.items() if v is None]
        if new:
            lp = self.char_lp(new) + np.float32(self.char_weight)
            if len(self.word_keys):
                h = np.fromiter((word_hash(w) for w in new), dtype=np.uint32, count=len(new))
                pos = np.minimum(np.searchsorted(self.word_keys, h), len(self.word_keys) - 1)
                hit = self.word_keys[pos] == h
                if hit.any():
                    lp[hit] = np.logaddexp(self._listed_lut[self.word_q[pos[hit]]], lp[hit])
            if len(cache) > 100_000:
                cache.clear()  # bounded memory; common words come back at once
            for w, v in zip(new, lp):
                got[w] = cache[w] = v
        return np.array([got[w] for w in words])

    def prior(self, hint: str | None = None, locale: str | None = None) -> np.ndarray:
        """Log-prior per language: rejected languages start lower; hint and locale add to it."""
        key = (hint, locale)
        p = self._priors.get(key)
        if p is None:
            p = self.base_prior.copy()
            h = _lang_code(hint)
            if h == "other":
                p[~self.in_scope] += self.meta["hint_boost"]
            elif h in self.langs:
                p[self.langs.index(h)] += self.meta["hint_boost"]
            loc = _lang_code(locale)
            if loc in self.langs:
                p[self.langs.index(loc)] += self.meta["locale_boost_en" if loc == "en" else "locale_boost"]
            if len(self._priors) < 1000:
                self._priors[key] = p
        return p

    def _evidence(self, text: str) -> list[str]:
        """The words that count: technical words and acronyms only if there is nothing else."""
        words = _words(text)
        keep = [w for w, acro in words if not acro and w not in self.neutral]
        if not keep:
            keep = [w for w, _ in words]
        return [w for w in keep if len(w) <= MAX_WORD_LEN][:MAX_WORDS]

    def log_scores(self, text: str, hint: str | None = None, locale: str | None = None) -> tuple[np.ndarray, int]:
        """Unnormalized log-posterior per model language, and the number of words used."""
        words = self._evidence(text)
        prior = self.prior(hint, locale)
        if not words:
            return prior, 0
        lp = self.word_lp(words)
        return (lp[0] if len(words) == 1 else lp.sum(axis=0)) + prior, len(words)

    def posteriors(self, text: str, hint: str | None = None, locale: str | None = None) -> dict[str, float]:
        """Posterior probability of each model language (sums to 1)."""
        lp, _ = self.log_scores(text, hint, locale)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        return {lang: float(v) for lang, v in zip(self.langs, p)}

    def detect(self, text: str, hint: str | None = None, locale: str | None = None) -> tuple[str, float]:
        """(en|sv|es|other, confidence in [0, 1]) for a text."""
        lp, n = self.log_scores(text, hint, locale)
        if n == 0 and not (hint or locale):
            return "other", 0.0  # no letters and nothing known about the sender
        if n and not text.isascii() and self._mostly_foreign_script(text):
            return "other", 0.9  # Cyrillic, Greek, CJK, Arabic, ...: none of ours
        best = int(lp.argmax())
        p = np.exp(lp - lp[best])
        if self.in_scope[best]:
            return self.langs[best], round(float(1.0 / p.sum()), 3)
        return "other", round(float(p[self._other].sum() / p.sum()), 3)

    def _mostly_foreign_script(self, text: str) -> bool:
        """True when most letters are outside the alphabets of all modelled languages."""
        letters = [c for c in text.lower() if c.isalpha()]
        foreign = sum(1 for c in letters if c not in self._code)
        return foreign * 2 > len(letters)


_model: Model | None = None
_model_lock = threading.Lock()


def get_model() -> Model:
    """The default model, loaded once on first use."""
    global _model
    if _model is None:
        with _model_lock:
            if _model is None:
                _model = Model.load(MODEL_PATH)
    return _model


def detect(text: str, hint: str | None = None, locale: str | None = None) -> tuple[str, float]:
    """Language of a text: ("en" | "sv" | "es" | "other", confidence in [0, 1])."""
    return get_model().detect(text, hint, locale)


def scores(text: str, hint: str | None = None, locale: str | None = None) -> dict[str, float]:
    """Posterior per modelled language (en, sv, es, no, da, de, ...), for explanations."""
    return get_model().posteriors(text, hint, locale)
