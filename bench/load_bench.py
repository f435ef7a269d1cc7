"""Load benchmark: mixed mail and Slack traffic through 1, 2 and 4 `triagebot worker` processes on PostgreSQL.

    .venv/bin/python bench/load_bench.py [--messages 20000] [--workers 1,2,4] [--rate R] [--json FILE]
                                         [--database-url postgresql://postgres@127.0.0.1:5432/test]

The traffic (seeded, the same on every run): raw RFC 822 mail and Slack Events API envelopes in English,
Swedish and Spanish whose bodies are the project's own training and evaluation texts (training/), some of
them HTML; about 30% thread replies (In-Reply-To/References, Slack thread_ts) to messages at least
--reply-min-gap messages earlier; out-of-office replies and bounces (they end `ignored`); mail delivered
twice with the same bytes (ends `duplicate`); Slack events delivered twice (refused at intake by the
delivery key); and an outage burst (2.5% of the messages, 500 of 20,000) from many customers about one
roaming failure in Germany, arriving close together. The texts come from training/: when those files
change, the traffic changes too (its "texts" hash is printed and written to the JSON).

Every run gets a fresh schema in the database of --database-url (dropped afterwards) and stores the
messages the way the listeners do: mail through the SMTP listener's GroupCommitWriter (one INSERT ...
RETURNING per group), Slack through the Slack app's take_in (one commit per event, keyed by delivery key).

Two modes, both per worker count:

* batch: everything is enqueued first (timed: the enqueue throughput), held (not_before in the future)
  while N `triagebot worker` processes start, then released: first 10 rows per worker at a time until
  every worker has processed one (a worker's first message loads models; these warm-up rows stay out of
  the figures), then the rest at once. wall s is release -> last row finished, msg/s = rows / wall s;
  "start s" is how long the workers took to reach their claim loop. Intake->case latency is then mostly
  time spent waiting in the queue; it is measured from the release. All of it arrives within one outage
  window, so outage clustering has every open incident to compare with (a storm, or a backlog).
* paced: the workers are started and warmed up first, then the messages arrive at --rate per second (the
  outage burst at --burst-factor times that), through the same listener code; intake->case latency is
  finished_at - received_at of each intake row, the time of the commit that stored its message and case
  (queue.mark_done runs inside that transaction). Without --rate it is half the lowest batch throughput,
  so below capacity for every worker count.

After each run every intake row is checked: it is `done` (not failed, not left queued), and it ended in
exactly one message row that is in exactly one existing case, or in a message row marked ignored, or,
for a repeated delivery, in no row of its own while its first copy has one; no case is without
messages; no Message-ID sits in two cases; every thread reply is in its root's case; every repeated Slack
delivery was refused at intake. "exactly-once" in the table is that check.

The machine's core count is printed: more worker processes than cores oversubscribe the CPU, and
PostgreSQL runs on the same cores. Figures from a shared machine are noisy. --launch supervisor runs one
`triagebot worker --concurrency N` (forked workers sharing loaded models) instead of N processes.
"""
from __future__ import annotations

import argparse
import bisect
import email.utils
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
SUPPORT = "support@support.example.net"
OUR_TEAM = "T0SUPPORTDESK"          # the Slack workspace the bot lives in; customers are Slack Connect guests
LANGS = ("en", "sv", "es")
EPOCH = datetime(2026, 11, 23, 7, 0, tzinfo=timezone.utc)

# ---------------------------------------------------------------------------------------------------------
# traffic
# ---------------------------------------------------------------------------------------------------------

FIRST = {"en": ["James", "Sarah", "Mark", "Emma", "Oliver", "Laura", "Daniel", "Chloe", "Peter", "Rachel"],
         "sv": ["Anna", "Erik", "Karin", "Lars", "Maria", "Johan", "Elin", "Mattias", "Sofia", "Niklas"],
         "es": ["Marta", "Javier", "Lucía", "Carlos", "Elena", "Pablo", "Carmen", "Diego", "Sofía", "Raúl"]}
LAST = {"en": ["Smith", "Jensen", "Brown", "Taylor", "Walker", "Hughes", "Clarke", "Evans"],
        "sv": ["Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Berg", "Lindqvist", "Ström"],
        "es": ["García", "Martínez", "López", "Sánchez", "Gómez", "Fernández", "Ruiz", "Díaz"]}
STEMS = {"en": ["fleetline", "meterco", "tracklogic", "alarmnet", "coldchain", "agrisense"],
         "sv": ["elnat", "vattenverk", "hisservice", "larmtjanst", "akeri", "kylfrakt"],
         "es": ["transportes", "contadores", "alarmas", "aparcamientos", "logistica", "riegos"]}
# customers of rules/customers.yaml, so tiers and fleet sizes take part
REGISTERED = [("malarkraft.example", "sv"), ("aparcalevante.example", "es"), ("hissteknik.example", "sv"),
              ("tryggahem.example", "sv"), ("nordtrans.example", "en")]
REPLY_PREFIX = {"en": ["Re: ", "RE: "], "sv": ["SV: ", "Sv: ", "Re: "], "es": ["RE: ", "Re: ", "RV: "]}
WROTE = {"en": "On {date}, {name} wrote:", "sv": "Den {date} skrev {name}:", "es": "El {date}, {name} escribió:"}
OOO = {
    "en": [("Out of Office: {subject}", "Thank you for your email. I am out of the office until {day} with limited "
            "access to email. For urgent matters please contact our operations desk.\n\n{name}"),
           ("Automatic reply: {subject}", "I am currently on leave and will be back on {day}. Your message will "
            "not be forwarded.\n\nKind regards\n{name}")],
    "sv": [("Automatiskt svar: {subject}", "Tack för ditt mejl. Jag är på semester och tillbaka {day}.\nVid "
            "brådskande ärenden, kontakta driftcentralen.\n\nHälsningar\n{name}"),
           ("Frånvaro: {subject}", "Hej! Jag är ledig till och med {day} och läser inte min e-post.\n\n{name}")],
    "es": [("Respuesta automática: {subject}", "Estoy fuera de la oficina hasta el {day}. Para asuntos urgentes "
            "contacte con el centro de operaciones.\n\nUn saludo,\n{name}"),
           ("Fuera de la oficina: {subject}", "Gracias por su mensaje. Estaré de vacaciones hasta el {day} con "
            "acceso limitado al correo.\n\n{name}")],
}
AUTO_HEADERS = [("Auto-Submitted", "auto-replied"), ("X-Autoreply", "yes"), ("Precedence", "auto_reply"),
                ("X-Auto-Response-Suppress", "All")]
DEVICES = {"en": ["trucks", "trackers", "cold-chain loggers", "water meters", "alarm panels", "vending machines"],
           "sv": ["lastbilar", "spårare", "kylloggrar", "vattenmätare", "larmcentraler", "fordon"],
           "es": ["camiones", "localizadores", "registradores de frío", "contadores", "alarmas", "vehículos"]}
BURST_SUBJECT = {"en": ["No data roaming in Germany", "Roaming Germany down?", "URGENT: devices in Germany offline"],
                 "sv": ["Ingen data vid roaming i Tyskland", "Roaming i Tyskland nere?",
                        "BRÅDSKANDE: enheter i Tyskland"],
                 "es": ["Sin datos en roaming en Alemania", "¿Caída del roaming en Alemania?",
                        "URGENTE: equipos en Alemania sin conexión"]}
BURST_BODY = {
    "en": "Hi,\n\nSince about {hh}:{mm} CET our {dev} roaming in Germany have lost data. {n} units are affected, "
          "the ones in Denmark and Sweden are fine. They attach but no PDP context comes up.\n\n{ask}\n\n{name}",
    "sv": "Hej,\n\nSedan ca {hh}:{mm} har våra {dev} som roamar i Tyskland tappat data. {n} enheter berörs, de i "
          "Sverige fungerar. De registrerar sig men ingen datasession kommer upp.\n\n{ask}\n\nMvh\n{name}",
    "es": "Hola,\n\nDesde las {hh}:{mm} aprox. nuestros {dev} en roaming en Alemania no tienen datos. Hay {n} "
          "equipos afectados, los de España funcionan. Se registran pero no levantan sesión de datos.\n\n{ask}\n\n"
          "Saludos,\n{name}",
}
BURST_SLACK = {"en": "roaming in Germany down? {n} of our {dev} have had no data since {hh}:{mm}, {ask}",
               "sv": "är roaming i Tyskland nere? {n} av våra {dev} har ingen data sedan {hh}:{mm}, {ask}",
               "es": "¿se ha caído el roaming en Alemania? {n} de nuestros {dev} sin datos desde las {hh}:{mm}, {ask}"}
ASK = {"en": ["Please check urgently.", "Is this a known issue?", "Can you confirm an outage?"],
       "sv": ["Kan ni kolla snarast?", "Är detta ett känt fel?", "Kan ni bekräfta en störning?"],
       "es": ["Por favor revisen urgente.", "¿Es un problema conocido?", "¿Pueden confirmar una incidencia?"]}


@dataclass
class Customer:
    """A customer organisation: its domain, language, mail contacts and Slack Connect channel."""

    domain: str
    lang: str
    contacts: list[tuple[str, str]]     # (name, address)
    team: str
    channel: str
    users: list[str]


@dataclass
class Item:
    """One delivery: what a listener receives, and what should become of it."""

    idx: int
    channel: str                 # email | slack
    kind: str                    # new | reply | burst | autoreply | bounce | duplicate | redelivery
    lang: str
    expect: str                  # case | ignored | duplicate | refused
    raw: bytes = b""             # mail bytes, or the Slack envelope as JSON (for the record)
    body: dict | None = None     # the Slack envelope, as the Slack app hands it to take_in
    root: int | None = None      # a reply: the idx of its thread's first message
    dup_of: int | None = None    # a duplicate / redelivery: the idx of the first delivery
    sender: str = ""
    text_key: str = ""           # what must be unique per sender for a message not to be a content duplicate


@dataclass
class _Thread:
    root: int
    channel: str
    customer: Customer
    subject: str
    msgids: list[str]
    ts: str | None
    last_text: str
    last_name: str
    positions: list[int] = field(default_factory=list)


def corpus_files() -> list[Path]:
    """The training and evaluation files the message texts come from."""
    return sorted((ROOT / "training" / "data").glob("*.jsonl")) + [ROOT / "training" / "eval" / "independent.jsonl"]


def corpus_hash() -> str:
    """The traffic depends on the seed and on these texts: a hash of them, for comparing runs."""
    h = hashlib.sha1()
    for path in corpus_files():
        if path.exists():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def load_corpus() -> dict[tuple[str, str], list[dict]]:
    """Training and evaluation texts by (channel, language), each body once."""
    files = corpus_files()
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seen: set[str] = set()
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("language") not in LANGS or not r.get("body") or r["body"] in seen:
                continue
            seen.add(r["body"])
            out[(r["channel"], r["language"])].append(r)
    if not out:
        raise SystemExit("no training texts found under training/")
    return out


def _customers(rng: random.Random, count: int) -> list[Customer]:
    out = []
    for i in range(count):
        if i < len(REGISTERED):
            domain, lang = REGISTERED[i]
        else:
            lang = rng.choice(LANGS)
            domain = f"{rng.choice(STEMS[lang])}{i}.example"
        contacts = []
        for j in range(rng.randint(1, 3)):
            first, last = rng.choice(FIRST[lang]), rng.choice(LAST[lang])
            local = f"{first}.{last}{j}".lower()
            local = "".join(ch for ch in unicodedata.normalize("NFKD", local) if ch.isascii())
            contacts.append((f"{first} {last}", f"{local}@{domain}"))
        out.append(Customer(domain, lang, contacts, team=f"T0C{i:06d}", channel=f"C0C{i:06d}",
                            users=[f"U0C{i:05d}{j}" for j in range(rng.randint(1, 3))]))
    return out


def _quote(text: str, lang: str, name: str, when: datetime) -> str:
    lines = [ln for ln in text.splitlines()][:12]
    head = WROTE[lang].format(date=email.utils.format_datetime(when), name=name)
    return head + "\n" + "\n".join("> " + ln if ln else ">" for ln in lines)


def _html(text: str) -> str:
    paras = "".join(f"<p>{escape(p).replace(chr(10), '<br>')}</p>" for p in text.split("\n\n") if p.strip())
    return f'<html><body><div style="font-family:Calibri,sans-serif;font-size:11pt">{paras}</div></body></html>'


def _mail(*, sender: tuple[str, str], subject: str, msgid: str, when: datetime, text: str | None = None,
          html: str | None = None, charset: str = "utf-8", headers: list[tuple[str, str]] = ()) -> bytes:
    m = EmailMessage(policy=SMTP_POLICY)
    m["From"] = email.utils.formataddr(sender, charset="utf-8")
    m["To"] = SUPPORT
    m["Subject"] = subject
    m["Message-ID"] = msgid
    m["Date"] = email.utils.format_datetime(when)
    for k, v in headers:
        m[k] = v
    if text is not None:
        m.set_content(text, charset=charset)
        if html is not None:
            m.add_alternative(html, subtype="html", charset="utf-8")
    else:
        m.set_content(html or "", subtype="html", charset="utf-8")
    if m.is_multipart():   # the generator would pick a random boundary: the same bytes on every run instead
        m.set_boundary("=_" + hashlib.sha1(msgid.encode()).hexdigest()[:24])
    return m.as_bytes()


def _bounce(rng: random.Random, c: Customer, msgid: str, when: datetime) -> bytes:
    victim = f"former.employee{rng.randint(1, 99)}@{c.domain}"
    subject = rng.choice(["Undelivered Mail Returned to Sender", "Delivery Status Notification (Failure)",
                          "Mail delivery failed: returning message to sender"])
    boundary = f"b{rng.getrandbits(48):012x}"
    text = (f"From: Mail Delivery System <MAILER-DAEMON@mx.{c.domain}>\r\nTo: {SUPPORT}\r\nSubject: {subject}\r\n"
            f"Message-ID: {msgid}\r\nDate: {email.utils.format_datetime(when)}\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\"\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
            f"I'm sorry to have to inform you that your message could not be delivered.\r\n"
            f"<{victim}>: host mx.{c.domain} said: 550 5.1.1 User unknown\r\n\r\n"
            f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
            f"Reporting-MTA: dns; mx.{c.domain}\r\n\r\nFinal-Recipient: rfc822; {victim}\r\nAction: failed\r\n"
            f"Status: 5.1.1\r\n\r\n--{boundary}--\r\n")
    return text.encode("ascii")


def _slack(c: Customer, user: str, text: str, ts: str, idx: int, thread_ts: str | None = None) -> dict:
    event = {"type": "message", "channel": c.channel, "channel_type": "channel", "user": user, "user_team": c.team,
             "team": c.team, "text": text, "ts": ts, "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return {"type": "event_callback", "team_id": OUR_TEAM, "api_app_id": "A0TRIAGEBOT", "event_id": f"Ev{idx:09d}",
            "event_time": int(float(ts)), "event": event}


def generate(n: int, seed: int = 7, reply_min_gap: int = 100) -> list[Item]:
    """n deliveries, the same for the same arguments."""
    rng = random.Random(seed)
    corpus = load_corpus()
    customers = _customers(rng, max(30, n // 20))
    items: list[Item] = []
    threads: list[_Thread] = []          # eligible thread roots, by position
    thread_pos: list[int] = []
    used: set[tuple[str, str]] = set()   # (sender, text key): a pair twice would be a content duplicate
    dup_sources: list[int] = []          # positions of mail that may be delivered twice
    slack_sources: list[int] = []        # positions of Slack events that may be delivered twice
    burst_n = round(n * 0.025) if n >= 40 else 0
    burst_start = int(n * 0.4)
    burst_left = burst_n
    burst_customers = rng.sample(customers, len(customers))

    def pick(channel: str, lang: str, sender: str, pool_channel: str | None = None) -> dict:
        pool = corpus.get((pool_channel or channel, lang)) or corpus[(pool_channel or channel, "en")]
        for _ in range(50):
            r = rng.choice(pool)
            if (sender, r["id"]) not in used:
                used.add((sender, r["id"]))
                return r
        raise RuntimeError("ran out of distinct texts for one sender")

    def lang_of(c: Customer) -> str:
        return c.lang if rng.random() < 0.9 else rng.choice(LANGS)

    def when(i: int) -> datetime:
        return datetime.fromtimestamp(EPOCH.timestamp() + i * 7, tz=timezone.utc)

    def ts_of(i: int) -> str:
        return f"{1795000000 + i * 7}.{i % 1000000:06d}"

    for i in range(n):
        in_burst = burst_left > 0 and i >= burst_start and (rng.random() < 0.8 or n - i <= burst_left)
        eligible = bisect.bisect_right(thread_pos, i - reply_min_gap)
        r = rng.random()
        if in_burst:
            kind = "burst"
        elif r < 0.305:
            kind = "reply" if eligible else "new"
        elif r < 0.34:
            kind = "autoreply"
        elif r < 0.355:
            kind = "bounce"
        elif r < 0.37 and dup_sources:
            kind = "duplicate"
        elif r < 0.38 and slack_sources:
            kind = "redelivery"
        else:
            kind = "new"
        msgid_dom = None
        if kind == "burst":
            burst_left -= 1
            c = burst_customers[(burst_n - burst_left - 1) % len(burst_customers)]
            lang = c.lang
            hh, mm = 9, rng.randint(40, 59)
            fmt = dict(hh=f"{hh:02d}", mm=f"{mm:02d}", dev=rng.choice(DEVICES[lang]), n=rng.randint(3, 400),
                       ask=rng.choice(ASK[lang]))
            if rng.random() < 0.7:
                name, addr = rng.choice(c.contacts)
                text = BURST_BODY[lang].format(name=name, **fmt)
                subject = rng.choice(BURST_SUBJECT[lang])
                key = f"burst:{text}"
                if (addr, key) in used:
                    text += f"\n{rng.randint(100, 999)}"
                    key = f"burst:{text}"
                used.add((addr, key))
                msgid = f"<lb{seed}.{i}.{rng.getrandbits(32):08x}@{c.domain}>"
                raw = _mail(sender=(name, addr), subject=subject, msgid=msgid, when=when(i), text=text,
                            html=_html(text) if rng.random() < 0.3 else None)
                it = Item(i, "email", kind, lang, "case", raw, sender=addr, text_key=key)
                threads.append(_Thread(i, "email", c, subject, [msgid], None, text, name, [i]))
                dup_sources.append(i)
            else:
                user = rng.choice(c.users)
                text = BURST_SLACK[lang].format(**fmt)
                body = _slack(c, user, text, ts_of(i), i)
                used.add((user, f"burst:{text}"))
                it = Item(i, "slack", kind, lang, "case", body=body, sender=user, text_key=f"burst:{text}")
                threads.append(_Thread(i, "slack", c, "", [], ts_of(i), text, user, [i]))
                slack_sources.append(i)
            thread_pos.append(i)
        elif kind == "reply":
            k = eligible - 1 - min(int(rng.expovariate(1 / 150)), eligible - 1)
            th = threads[k]
            c = th.customer
            lang = c.lang
            if th.channel == "email":
                name, addr = th.customer.contacts[0] if rng.random() < 0.3 else rng.choice(c.contacts)
                # the latest message of the thread that is at least the gap back; References name them all
                parents = [p for p in th.positions if p <= i - reply_min_gap]
                parent_msgid = th.msgids[len(parents) - 1]
                rec = pick("email", lang, addr, pool_channel="slack")   # follow-ups are short
                text = rec["body"] + "\n\n" + name.split()[0]
                quoted = _quote(th.last_text, lang, th.last_name, when(th.positions[len(parents) - 1]))
                subject = rng.choice(REPLY_PREFIX[lang]) + th.subject
                msgid = f"<lb{seed}.{i}.{rng.getrandbits(32):08x}@{c.domain}>"
                refs = " ".join(th.msgids[:len(parents)])
                raw = _mail(sender=(name, addr), subject=subject, msgid=msgid, when=when(i),
                            text=text + "\n\n" + quoted,
                            headers=[("In-Reply-To", parent_msgid), ("References", refs)])
                it = Item(i, "email", kind, lang, "case", raw, root=th.root, sender=addr, text_key=rec["id"])
                th.msgids.append(msgid)
                th.positions.append(i)
                th.last_text, th.last_name = text, name
                dup_sources.append(i)
            else:
                user = rng.choice(c.users)
                rec = pick("slack", lang, user)
                body = _slack(c, user, rec["body"], ts_of(i), i, thread_ts=th.ts)
                it = Item(i, "slack", kind, lang, "case", body=body, root=th.root, sender=user, text_key=rec["id"])
                th.positions.append(i)
                slack_sources.append(i)
        elif kind == "autoreply":
            c = rng.choice(customers)
            lang = c.lang
            name, addr = rng.choice(c.contacts)
            subj_t, body_t = rng.choice(OOO[lang])
            text = body_t.format(day=f"{rng.randint(1, 28)}/{rng.randint(1, 12)}", name=name)
            headers = [rng.choice(AUTO_HEADERS[:3])]
            if rng.random() < 0.5:
                headers.append(("In-Reply-To", f"<ack.{rng.getrandbits(40):010x}@support.example.net>"))
            msgid = f"<lb{seed}.{i}.ooo@{c.domain}>"
            raw = _mail(sender=(name, addr), subject=subj_t.format(subject=f"CASE-{rng.randint(1, 999999):06d}"),
                        msgid=msgid, when=when(i), text=text, headers=headers)
            it = Item(i, "email", kind, lang, "ignored", raw, sender=addr)
        elif kind == "bounce":
            c = rng.choice(customers)
            it = Item(i, "email", kind, "en", "ignored", _bounce(rng, c, f"<lb{seed}.{i}.dsn@mx.{c.domain}>", when(i)),
                      sender=f"mailer-daemon@mx.{c.domain}")
        elif kind == "duplicate":
            # mail delivered twice: half a moment later (a relay's retry), half long after (a re-sent copy)
            recent = [p for p in dup_sources[-30:] if p >= i - 20]
            src = rng.choice(recent) if recent and rng.random() < 0.5 else rng.choice(dup_sources)
            o = items[src]
            it = Item(i, "email", kind, o.lang, "duplicate", o.raw, dup_of=src, sender=o.sender)
        elif kind == "redelivery":
            # Slack retries within seconds when it did not get its 200 in time
            src = rng.choice(slack_sources[-10:])
            o = items[src]
            it = Item(i, "slack", kind, o.lang, "refused", body=o.body, dup_of=src, sender=o.sender)
        else:
            c = rng.choice(customers)
            lang = lang_of(c)
            if rng.random() < 0.65:
                name, addr = rng.choice(c.contacts)
                rec = pick("email", lang, addr)
                subject = rec.get("subject") or rng.choice(["Question", "Fråga", "Consulta", "Problem"])
                msgid = f"<lb{seed}.{i}.{rng.getrandbits(32):08x}@{c.domain}>"
                if rec.get("html"):
                    raw = _mail(sender=(name, addr), subject=subject, msgid=msgid, when=when(i), html=rec["body"])
                    text = rec["body"]
                else:
                    text = rec["body"]
                    charset = "iso-8859-1" if lang != "en" and rng.random() < 0.2 else "utf-8"
                    try:
                        text.encode(charset)
                    except UnicodeEncodeError:
                        charset = "utf-8"
                    raw = _mail(sender=(name, addr), subject=subject, msgid=msgid, when=when(i), text=text,
                                charset=charset, html=_html(text) if rng.random() < 0.15 else None)
                it = Item(i, "email", kind, lang, "case", raw, sender=addr, text_key=rec["id"])
                threads.append(_Thread(i, "email", c, subject, [msgid], None, text, name, [i]))
                dup_sources.append(i)
            else:
                user = rng.choice(c.users)
                rec = pick("slack", lang, user)
                body = _slack(c, user, rec["body"], ts_of(i), i)
                it = Item(i, "slack", kind, lang, "case", body=body, sender=user, text_key=rec["id"])
                threads.append(_Thread(i, "slack", c, "", [], ts_of(i), rec["body"], user, [i]))
                slack_sources.append(i)
            thread_pos.append(i)
        if it.channel == "slack" and it.body is not None:
            it.raw = json.dumps(it.body, ensure_ascii=False, sort_keys=True).encode("utf-8")
        items.append(it)
    return items


def composition(items: list[Item]) -> dict:
    """What the traffic is made of: counts by kind, channel and language."""
    by = Counter(f"{it.channel}:{it.kind}" for it in items)
    return {"total": len(items), "by_kind": dict(sorted(Counter(it.kind for it in items).items())),
            "by_channel_kind": dict(sorted(by.items())),
            "by_language": dict(sorted(Counter(it.lang for it in items).items())),
            "html_mail": sum(1 for it in items if it.channel == "email" and b"text/html" in it.raw),
            "corpus": corpus_hash()}


# ---------------------------------------------------------------------------------------------------------
# database
# ---------------------------------------------------------------------------------------------------------

def sa_url(url: str) -> str:
    """A SQLAlchemy URL for PostgreSQL with the psycopg (3) driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise SystemExit(f"--database-url must name a PostgreSQL database (postgresql://...), not {url.split(':')[0]}")


def _admin(url: str):
    import psycopg
    from sqlalchemy.engine import make_url
    u = make_url(url)
    return psycopg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username or "postgres",
                           password=u.password, dbname=u.database or "postgres", autocommit=True, connect_timeout=5)


def pg_reachable(url: str = DEFAULT_URL) -> str | None:
    """None when the database answers; else why not."""
    try:
        with _admin(sa_url(url)):
            return None
    except Exception as e:  # noqa: BLE001 - any failure: the reason
        return f"{type(e).__name__}: {e}"


class Schema:
    """A throwaway schema in the database of the URL; .url(app) names it through search_path."""

    def __init__(self, base_url: str, keep: bool = False) -> None:
        self.base, self.keep = sa_url(base_url), keep
        self.name = f"lb_{uuid.uuid4().hex[:10]}"
        with _admin(self.base) as c:
            c.execute(f'CREATE SCHEMA "{self.name}"')

    def url(self, app: str = "load_bench") -> str:
        """A URL whose connections use this schema, named `app` in pg_stat_activity."""
        from sqlalchemy.engine import make_url
        u = make_url(self.base).update_query_dict({"options": f"-csearch_path={self.name}", "application_name": app})
        return u.render_as_string(hide_password=False)

    def drop(self) -> None:
        """Drop the schema and everything in it (unless kept)."""
        if self.keep:
            print(f"  (schema {self.name} kept)")
            return
        with _admin(self.base) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')


def open_schema(schema: Schema):
    """An engine and session factory on the schema, migrated to the newest schema."""
    from triagebot.db.engine import make_engine, migrate
    from sqlalchemy.orm import sessionmaker
    engine = make_engine(schema.url())
    migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


# ---------------------------------------------------------------------------------------------------------
# enqueue: the listeners' own code
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Enqueued:
    """What handing the deliveries to the listener code gave: intake ids, refusals, timings."""

    ids: dict[int, int]            # item idx -> intake id
    refused: set[int]              # Slack deliveries take_in refused as already stored
    problems: list[str]
    seconds: float
    slack_seconds: float
    arrival_lag_p99_ms: float = 0.0   # paced: how late the feeder was against the schedule


def schedule(items: list[Item], rate: float, burst_factor: float) -> list[float]:
    """Arrival offsets in seconds: one every 1/rate, burst messages burst_factor times closer together."""
    t, out = 0.0, []
    for it in items:
        out.append(t)
        t += 1.0 / (rate * (burst_factor if it.kind == "burst" else 1.0))
    return out


def enqueue(items: list[Item], engine, sessions, settings, arrivals: list[float] | None = None) -> Enqueued:
    """Hand every item to the listener code: mail to the SMTP GroupCommitWriter, Slack to take_in."""
    from triagebot.agents.slack_app import take_in
    from triagebot.intake.smtp import GroupCommitWriter
    writer = GroupCommitWriter(engine)
    futures, ids, refused, problems, lags = {}, {}, set(), [], []
    slack_s = 0.0
    t0 = time.perf_counter()
    try:
        for n, it in enumerate(items):
            if arrivals is not None:
                due = t0 + arrivals[n]
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                lags.append(max(0.0, time.perf_counter() - due))
            if it.channel == "email":
                futures[it.idx] = writer.submit(it.raw, "smtp:127.0.0.1")
            else:
                s0 = time.perf_counter()
                res = take_in(settings, sessions, it.body)
                slack_s += time.perf_counter() - s0
                if res.startswith("queued "):
                    ids[it.idx] = int(res.split()[1])
                elif res == "duplicate delivery":
                    refused.add(it.idx)
                else:
                    problems.append(f"item {it.idx} ({it.kind}): take_in said {res!r}")
        for idx, fut in futures.items():
            try:
                ids[idx] = fut.result(timeout=300)
            except Exception as e:  # noqa: BLE001 - a listener would have said 451
                problems.append(f"item {idx}: storing failed: {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - t0
    finally:
        writer.shutdown(wait=True)
    lag99 = _pct([x * 1000 for x in lags], 99) if lags else 0.0
    return Enqueued(ids, refused, problems, elapsed, slack_s, lag99)


# ---------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------

def worker_env(url: str, settings: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: ours without any TRIAGEBOT_/SLACK_ setting, plus the database and the
    settings asked for (--worker-setting worker_batch=1 becomes TRIAGEBOT_WORKER_BATCH=1)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRIAGEBOT_", "SLACK_")) and k not in ("AGENT_CHANNEL",)}
    env.update({f"TRIAGEBOT_{k.upper()}": v for k, v in (settings or {}).items()})
    env["TRIAGEBOT_DATABASE_URL"] = url
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def triagebot_cmd() -> list[str]:
    """The `triagebot` command of this virtualenv."""
    exe = Path(sys.executable).parent / "triagebot"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("triagebot")
    return [found] if found else [sys.executable, "-m", "triagebot.cli"]


def _die_with_parent() -> None:
    """In a worker before exec (Linux): SIGTERM when the benchmark dies, however it dies."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: stop() still ends them on any exit that runs finally
        pass


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:   # no CONFIG_PROC_CHILDREN: look at every process's parent
        out = []
        for d in Path("/proc").iterdir():
            st = _proc_stat(int(d.name)) if d.name.isdigit() else None
            if st and int(st[1]) == pid:
                out.append(int(d.name))
        return out


class Workers:
    """The worker processes on one schema.

    launch "processes": N separate `triagebot worker` processes (each loads its own models);
    launch "supervisor": one `triagebot worker --concurrency N`, whose supervisor forks the N workers.
    """

    def __init__(self, schema: Schema, n: int, logdir: Path, launch: str = "processes",
                 settings: dict[str, str] | None = None) -> None:
        self.schema, self.n, self.logdir, self.launch = schema, n, logdir, launch
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.started = time.time()
        commands = ([["worker"]] * n if launch == "processes" else [["worker", "--concurrency", str(n)]])
        for i, args in enumerate(commands):
            log = logdir / f"worker{i}.log"
            self.logs.append(log)
            with open(log, "wb") as fh:
                self.procs.append(subprocess.Popen(triagebot_cmd() + args, stdout=fh, stderr=subprocess.STDOUT,
                                                   env=worker_env(schema.url(f"{schema.name}_w{i}"), settings),
                                                   cwd=str(ROOT), start_new_session=True,
                                                   preexec_fn=_die_with_parent))

    def pids(self) -> list[int]:
        """The processes that claim rows (the supervisor's children, when it has any)."""
        if self.launch == "supervisor" and self.n > 1:
            return _children(self.procs[0].pid)
        return [p.pid for p in self.procs]

    def alive(self) -> int:
        """How many of the started processes still run."""
        return sum(1 for p in self.procs if p.poll() is None)

    def wait_ready(self, timeout: float = 600.0) -> float:
        """Until every worker sits in its idle claim loop; the seconds since the start.

        An idle worker claims nothing, sleeps half a second in time.sleep and claims again: its main thread is
        seen in the kernel's nanosleep (/proc/PID/wchan) poll after poll. Where wchan says nothing, a worker
        counts as ready once its CPU time has stood still for a second.
        """
        end = time.monotonic() + timeout
        streak: dict[int, int] = defaultdict(int)
        cpu_seen: dict[int, tuple[int, float]] = {}
        while True:
            pids = self.pids()
            ready = 0
            for pid in pids:
                try:
                    wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
                except OSError:
                    wchan = ""
                if wchan and wchan != "0":
                    # three polls in a row in the idle sleep: not a passing sleep while starting up
                    streak[pid] = streak[pid] + 1 if "nanosleep" in wchan else 0
                else:
                    st = _proc_stat(pid)
                    ticks = int(st[11]) + int(st[12]) if st else -1
                    last = cpu_seen.get(pid)
                    if last is None or ticks - last[0] > 1:
                        cpu_seen[pid] = (ticks, time.monotonic())
                    streak[pid] = 3 if time.monotonic() - cpu_seen[pid][1] >= 1.0 else 0
                ready += streak[pid] >= 3
            if ready >= self.n and len(pids) >= self.n:
                return time.time() - self.started
            if self.alive() < len(self.procs):
                raise RuntimeError("a worker exited while starting:\n" + self.tails())
            if time.monotonic() > end:
                raise RuntimeError(f"workers not ready after {timeout}s:\n" + self.tails())
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU seconds the worker processes (and a supervisor) have used so far."""
        tick = os.sysconf("SC_CLK_TCK")
        pids = {p.pid for p in self.procs} | set(self.pids())
        return sum((int(st[11]) + int(st[12])) / tick for st in map(_proc_stat, pids) if st)

    def stop(self) -> None:
        """SIGTERM (each finishes its message), then SIGKILL what still runs after 90 s."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 90
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)   # its own session: the supervisor and its workers
                p.wait()

    def tails(self, lines: int = 15) -> str:
        """The last lines of every worker log."""
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def errors(self) -> Counter:
        """Kinds of processing failures the workers logged ("intake N failed (attempt ...): Kind")."""
        kinds: Counter = Counter()
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
                if " failed (attempt " in line:
                    kinds[line.rsplit("): ", 1)[-1].strip()] += 1
                elif "deadlock detected" in line.lower():
                    kinds["deadlock detected"] += 1
        return kinds


def wait_drained(engine, workers: Workers, timeout: float, released_only: bool = False) -> None:
    """Until no row is queued or being processed (released_only: none that a worker may take now)."""
    from sqlalchemy import text
    where = ("state = 'processing' OR (state = 'queued' AND not_before <= now())" if released_only
             else "state IN ('queued', 'processing')")
    end = time.monotonic() + timeout
    while True:
        with engine.connect() as c:
            left = c.execute(text(f"SELECT count(*) FROM intake WHERE {where}")).scalar()
        if not left:
            return
        if workers.alive() == 0:
            raise RuntimeError(f"every worker exited with {left} rows left:\n" + workers.tails())
        if time.monotonic() > end:
            raise RuntimeError(f"{left} rows still queued or processing after {timeout}s")
        time.sleep(0.2)


def busy_workers(engine) -> int:
    """How many workers have finished a row: each names itself in claimed_by."""
    from sqlalchemy import text
    with engine.connect() as c:
        return c.execute(text("SELECT count(DISTINCT claimed_by) FROM intake WHERE state = 'done'")).scalar() or 0


# ---------------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Check:
    """The exactly-once check of one run: passed, what failed, and the counts behind it."""

    ok: bool
    problems: list[str]
    counts: dict


def _repeats_a_stored_message(engine, it: Item, intake_id: int) -> bool:
    from sqlalchemy import text
    from triagebot import threading as thr
    from triagebot.normalize import from_raw as normalize
    m = normalize(it.channel, it.raw)
    with engine.connect() as c:
        return c.execute(text("SELECT 1 FROM messages WHERE intake_id <> :i AND (message_id = :mid OR "
                              "(content_hash = :h AND sender = :s)) LIMIT 1"),
                         {"i": intake_id, "mid": m.message_id, "h": thr.message_hash(m), "s": m.sender}
                         ).first() is not None


def check(engine, items: list[Item], enq: Enqueued) -> Check:
    """Every delivery ended exactly once: in one case, ignored, a duplicate of a stored one, or refused at intake."""
    from sqlalchemy import text
    problems: list[str] = []
    with engine.connect() as c:
        intake = {r.id: r for r in c.execute(text("SELECT id, state, attempts, last_error FROM intake"))}
        msgs = {}
        per_intake = Counter()
        for r in c.execute(text("SELECT id, intake_id, case_id, action, message_id FROM messages")):
            msgs[r.intake_id] = r
            per_intake[r.intake_id] += 1
        cases = {r.id: r for r in c.execute(text("SELECT id, kind, parent_id FROM cases"))}
        empty = c.execute(text("SELECT count(*) FROM cases c WHERE c.kind = 'case' AND NOT EXISTS "
                               "(SELECT 1 FROM messages m WHERE m.case_id = c.id)")).scalar()
        childless = c.execute(text("SELECT count(*) FROM cases p WHERE p.kind = 'incident' AND NOT EXISTS "
                                   "(SELECT 1 FROM cases c WHERE c.parent_id = p.id)")).scalar()
        split = c.execute(text("SELECT count(*) FROM (SELECT message_id FROM messages WHERE case_id IS NOT NULL "
                               "AND message_id IS NOT NULL GROUP BY message_id "
                               "HAVING count(DISTINCT case_id) > 1) x")).scalar()
    states = Counter(r.state for r in intake.values())
    n = Counter()
    outcome: dict[int, str] = {}
    for it in items:
        iid = enq.ids.get(it.idx)
        if it.expect == "refused":
            if it.idx in enq.refused:
                n["refused"] += 1
                outcome[it.idx] = "refused"
            else:
                n["redelivery_stored"] += 1
                outcome[it.idx] = "stored twice"
            continue
        if iid is None:
            n["not_stored"] += 1
            outcome[it.idx] = "not stored"
            continue
        row = intake.get(iid)
        if row is None or row.state != "done":
            outcome[it.idx] = f"intake {row.state if row else 'missing'}"
            continue
        if per_intake[iid] > 1:
            n["several_message_rows"] += 1
        m = msgs.get(iid)
        if m is None:
            outcome[it.idx] = "duplicate"
        elif m.action == "ignored":
            outcome[it.idx] = "ignored" if m.case_id is None else "ignored-with-case"
        elif m.action in ("created", "threaded"):
            outcome[it.idx] = "case" if m.case_id in cases and cases[m.case_id].kind == "case" else "case missing"
        else:
            outcome[it.idx] = f"action {m.action}"
    # a delivery and its repeats: exactly one of them is stored as a message (unless all are ignored)
    groups: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        if it.channel == "email":
            groups[it.dup_of if it.dup_of is not None else it.idx].append(it)
    group_case: dict[int, int | None] = {}
    missed_dups = 0
    kept_group: set[int] = set()         # groups one of whose copies is stored as a message
    for first, members in groups.items():
        stored = [m for m in members if outcome.get(m.idx) == "case"]
        if len(stored) > 1:
            missed_dups += len(stored) - 1
        if any(outcome.get(m.idx) in ("case", "ignored") for m in members):
            kept_group.add(first)
        row = msgs.get(enq.ids.get(stored[0].idx, -1)) if stored else None
        group_case[first] = row.case_id if row is not None else None
    # any other delivery without a message row must repeat a stored message (same Message-ID, or the same
    # content from the same sender: threading's duplicate rule); else the worker finished it and stored nothing
    unexplained = judged = 0
    for it in items:
        if outcome.get(it.idx) != "duplicate":
            continue
        if it.channel == "email" and (it.dup_of if it.dup_of is not None else it.idx) in kept_group:
            continue
        if _repeats_a_stored_message(engine, it, enq.ids[it.idx]):
            judged += 1
        else:
            unexplained += 1
    for it in items:
        if it.channel == "slack" and it.kind in ("new", "burst"):
            m = msgs.get(enq.ids.get(it.idx, -1))
            group_case[it.idx] = m.case_id if m is not None else None
    # thread replies: in the case of their root
    replies = Counter()
    for it in items:
        if it.kind != "reply":
            continue
        m = msgs.get(enq.ids.get(it.idx, -1))
        want = group_case.get(it.root)
        # a mail reply delivered twice: whichever copy was stored counts
        got = group_case.get(it.idx) if it.channel == "email" else (m.case_id if m is not None else None)
        if want is None:
            replies["root_not_a_case"] += 1
        elif outcome.get(it.idx) == "ignored":
            replies["reply_ignored"] += 1
        elif got is None:
            replies["reply_not_a_case"] += 1
        elif got == want:
            replies["in_root_case"] += 1
        else:
            replies["elsewhere"] += 1
    # what the pipeline decided differently from the generator's intent (not an exactly-once matter)
    disagree = Counter()
    for it in items:
        o = outcome.get(it.idx)
        if it.expect == "ignored" and o == "case":
            disagree[f"{it.kind} became a case"] += 1
        elif it.expect == "case" and o == "ignored":
            disagree[f"{it.kind} ignored"] += 1
    if judged:
        disagree["judged a duplicate of another stored message"] = judged
    bad_outcomes = {k: v for k, v in Counter(outcome.values()).items()
                    if k not in ("case", "ignored", "duplicate", "refused")}
    if bad_outcomes:
        problems.append("rows without an outcome: " + ", ".join(f"{k} {v}" for k, v in sorted(bad_outcomes.items())))
    if states.get("failed"):
        problems.append(f"{states['failed']} intake rows failed")
    if len(intake) != len(enq.ids):
        problems.append(f"{len(intake)} intake rows for {len(enq.ids)} stored deliveries")
    if enq.problems:
        problems.append(f"{len(enq.problems)} deliveries not stored (e.g. {enq.problems[0]})")
    if n["several_message_rows"]:
        problems.append(f"{n['several_message_rows']} intake rows with more than one message row")
    if unexplained:
        problems.append(f"{unexplained} rows finished without a message row while no stored message is their "
                        "original (lost)")
    if missed_dups:
        problems.append(f"{missed_dups} repeated deliveries stored as messages of their own")
    if split:
        problems.append(f"{split} Message-IDs in more than one case")
    if empty:
        problems.append(f"{empty} cases without messages")
    if childless:
        problems.append(f"{childless} outage parents without children")
    if replies["elsewhere"] or replies["reply_not_a_case"]:
        problems.append(f"{replies['elsewhere']} thread replies in another case than their root's, "
                        f"{replies['reply_not_a_case']} not in a case")
    counts = {"intake_states": dict(states), "outcomes": dict(Counter(outcome.values())),
              "replies": dict(replies), "empty_cases": empty, "parents_without_children": childless,
              "message_ids_in_several_cases": split, "duplicates_unexplained": unexplained,
              "duplicates_missed": missed_dups, "retried_rows": sum(1 for r in intake.values() if r.attempts > 1),
              "pipeline_disagrees_with_generator": dict(disagree)}
    return Check(not problems, problems, counts)


# ---------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------

def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _stats(engine, items: list[Item], enq: Enqueued, since: float | None, warm: set[int] = frozenset()) -> dict:
    """Timings from the intake rows (warm-up rows left out): finished_at is written in the transaction that
    stored the message and its case (queue.mark_done), so finished_at - received_at is intake -> case."""
    from sqlalchemy import text
    with engine.connect() as c:
        rows = c.execute(text("SELECT id, received_at, claimed_at, finished_at, claimed_by, state FROM intake")).all()
        cases = c.execute(text("SELECT count(*) FILTER (WHERE kind = 'case'), "
                               "count(*) FILTER (WHERE kind = 'incident') FROM cases")).one()
        ignored = c.execute(text("SELECT count(*) FROM messages WHERE action = 'ignored'")).scalar()
        burst_ids = [enq.ids[it.idx] for it in items if it.kind == "burst" and it.idx in enq.ids]
        burst = c.execute(text("SELECT count(*), count(DISTINCT c.parent_id), "
                               "count(*) FILTER (WHERE c.parent_id IS NULL) "
                               "FROM messages m JOIN cases c ON c.id = m.case_id WHERE m.intake_id = ANY(:ids)"),
                          {"ids": burst_ids}).one()
    all_rows = rows
    rows = [r for r in rows if r.id not in warm]
    done = [r for r in rows if r.finished_at is not None]
    start = since if since is not None else min(r.received_at.timestamp() for r in rows)
    lat = [(r.finished_at.timestamp() - max(r.received_at.timestamp(), since or 0.0)) * 1000 for r in done]
    burst_set = set(burst_ids)
    # where the time goes: waiting to be claimed (idle polling, backlog), and claimed -> committed (the
    # message's own processing, after those claimed before it in the same batch)
    waits = [(r.claimed_at.timestamp() - max(r.received_at.timestamp(), since or 0.0)) * 1000
             for r in done if r.claimed_at is not None]
    work = [(r.finished_at - r.claimed_at).total_seconds() * 1000 for r in done if r.claimed_at is not None]
    lat_burst = [(r.finished_at.timestamp() - max(r.received_at.timestamp(), since or 0.0)) * 1000
                 for r in done if r.id in burst_set]
    last = max(r.finished_at.timestamp() for r in done) if done else start
    wall = max(1e-9, last - start)
    # throughput by quarter of the rows, in finishing order: does it hold up as the tables grow?
    fin = sorted(r.finished_at.timestamp() for r in done)
    quarters = []
    for q in range(4):
        a, b = len(fin) * q // 4, len(fin) * (q + 1) // 4 - 1
        if b > a:
            t0 = start if q == 0 else fin[a - 1]
            quarters.append(round((b - a + 1) / max(1e-9, fin[b] - t0), 1))
    per_worker = Counter((r.claimed_by or "?").rsplit(":", 1)[-1] for r in done)
    return {"rows": len(rows), "wall_s": wall, "msg_per_s": len(done) / wall,
            "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90), "p99_ms": _pct(lat, 99), "max_ms": max(lat, default=0),
            "claim_wait_p50_ms": _pct(waits, 50), "claim_wait_p99_ms": _pct(waits, 99),
            "claimed_to_done_p50_ms": _pct(work, 50), "claimed_to_done_p99_ms": _pct(work, 99),
            "burst_p50_ms": _pct(lat_burst, 50), "burst_p99_ms": _pct(lat_burst, 99),
            "cases": cases[0], "incident_parents": cases[1], "ignored": ignored,
            "failed": sum(1 for r in all_rows if r.state == "failed"),
            "burst_cases": burst[0], "burst_parents": burst[1], "burst_unlinked": burst[2],
            "msg_per_s_by_quarter": quarters, "rows_per_worker": sorted(per_worker.values(), reverse=True)}


def run_once(mode: str, n_workers: int, items: list[Item], base_url: str, *, rate: float = 0.0,
             burst_factor: float = 4.0, timeout: float = 3600.0, keep: bool = False, quiet: bool = False,
             launch: str = "processes", worker_settings: dict[str, str] | None = None) -> dict:
    """One fresh schema, one mode, one worker count: the row of the table and everything behind it."""
    from sqlalchemy import text
    from triagebot.settings import Settings
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    schema = Schema(base_url, keep=keep)
    logdir = Path(tempfile.mkdtemp(prefix=f"{schema.name}_"))
    engine = workers = None
    load_before = os.getloadavg()
    code_at_start = code_version()   # the workers run what the tree holds when they start
    try:
        engine, sessions = open_schema(schema)
        settings = Settings(database_url=schema.url())
        step = 10 * n_workers    # a claim takes up to 10 rows (worker_batch)
        if mode == "batch":
            enq = enqueue(items, engine, sessions, settings)
            say(f"  enqueued {len(enq.ids)} rows in {enq.seconds:.1f} s = {len(enq.ids) / enq.seconds:.0f} msg/s "
                f"(Slack take_in {enq.slack_seconds:.1f} s of it), {len(enq.refused)} Slack redeliveries refused")
            with engine.begin() as c:   # hold the queue while the workers start
                c.execute(text("UPDATE intake SET not_before = now() + interval '1 day'"))
            workers = Workers(schema, n_workers, logdir, launch, worker_settings)
            startup = workers.wait_ready()
            # warm-up: the pipeline loads part of its models on a worker's first message (seconds); release the
            # first rows until every worker has processed one, and keep them out of the figures
            order = sorted(enq.ids.values())
            warm: list[int] = []
            while len(warm) < len(order) and (not warm or busy_workers(engine) < n_workers) and len(warm) < 50 * step:
                chunk = order[len(warm):len(warm) + step]
                warm += chunk
                with engine.begin() as c:
                    c.execute(text("UPDATE intake SET not_before = received_at WHERE id = ANY(:ids)"), {"ids": chunk})
                wait_drained(engine, workers, timeout, released_only=True)
            warm_ids = set(warm)
            cpu0 = workers.cpu_seconds()
            with engine.begin() as c:
                c.execute(text("UPDATE intake SET not_before = received_at WHERE not_before > now()"))
                released = time.time()
            wait_drained(engine, workers, timeout)
            since = released
        else:
            workers = Workers(schema, n_workers, logdir, launch, worker_settings)
            startup = workers.wait_ready()
            parts, k = [], 0
            while k < len(items) and (k == 0 or busy_workers(engine) < n_workers) and k < 50 * step:
                chunk = items[k:k + step]
                k += len(chunk)
                parts.append(enqueue(chunk, engine, sessions, settings,
                                     arrivals=schedule(chunk, rate, burst_factor)))
                wait_drained(engine, workers, timeout)
            warm_ids = {i for e in parts for i in e.ids.values()}
            cpu0 = workers.cpu_seconds()
            since = None
            main = enqueue(items[k:], engine, sessions, settings, arrivals=schedule(items[k:], rate, burst_factor))
            say(f"  warm-up {len(warm_ids)} rows, then fed {len(main.ids)} rows over {main.seconds:.1f} s "
                f"(feeder behind schedule p99 {main.arrival_lag_p99_ms:.0f} ms)")
            wait_drained(engine, workers, timeout)
            enq = Enqueued({k2: v for e in parts + [main] for k2, v in e.ids.items()},
                           set().union(*(e.refused for e in parts + [main])),
                           [x for e in parts + [main] for x in e.problems], main.seconds, main.slack_seconds,
                           main.arrival_lag_p99_ms)
        cpu = workers.cpu_seconds() - cpu0
        workers.stop()
        errors = workers.errors()
        result = _stats(engine, items, enq, since, warm_ids)
        chk = check(engine, items, enq)
        result.update(mode=mode, workers=n_workers, launch=launch, worker_settings=worker_settings or {},
                      rate=rate if mode == "paced" else None, startup_s=startup,
                      enqueue_s=enq.seconds, enqueue_msg_per_s=len(enq.ids) / enq.seconds if enq.seconds else 0,
                      enqueue_slack_s=enq.slack_seconds, refused=len(enq.refused),
                      worker_cpu_s=cpu, worker_cpu_ms_per_msg=cpu * 1000 / max(1, result["rows"]),
                      warmup_rows=len(warm_ids), worker_errors=dict(errors), exactly_once=chk.ok,
                      problems=chk.problems, check=chk.counts,
                      loadavg_before=load_before, loadavg_after=os.getloadavg(), schema=schema.name,
                      code=code_at_start)
        if errors or not chk.ok:
            result["worker_log_tails"] = workers.tails()
        return result
    finally:
        if workers is not None:
            workers.stop()
        if engine is not None:
            engine.dispose()
        schema.drop()
        if not keep:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"  (worker logs kept in {logdir})")


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------

COLUMNS = ["mode", "workers", "msgs", "wall s", "msg/s", "p50 ms", "p99 ms", "cases", "ignored", "dups", "failed",
           "start s", "exactly-once OK"]


def table_rows(results: list[dict]) -> list[list[str]]:
    """One row of cells per run, in COLUMNS order."""
    rows = []
    for r in results:
        mode = "batch" if r["mode"] == "batch" else f"paced {r['rate']:g}/s"
        if r.get("launch") == "supervisor":
            mode += " (--concurrency)"
        rows.append([mode, str(r["workers"]), str(r["rows"]), f"{r['wall_s']:.1f}", f"{r['msg_per_s']:.1f}",
                     f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", str(r["cases"]), str(r["ignored"]),
                     str(r["check"]["outcomes"].get("duplicate", 0)), str(r["failed"]), f"{r['startup_s']:.1f}",
                     "yes" if r["exactly_once"] else "NO"])
    return rows


def format_table(results: list[dict]) -> str:
    """The runs as a Markdown table."""
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def describe(r: dict) -> str:
    """The check and the details of one run, for under its heading."""
    c = r["check"]
    o, rep = c["outcomes"], c["replies"]
    total = sum(c["intake_states"].values())
    s = (f"  check {'OK' if r['exactly_once'] else 'FAILED'}: {total} intake rows ({r['warmup_rows']} warm-up) -> "
         f"{o.get('case', 0)} in a case, "
         f"{o.get('ignored', 0)} ignored, {o.get('duplicate', 0)} duplicates; {r['refused']} Slack redeliveries "
         f"refused at intake; states {c['intake_states']}; replies in root's case {rep.get('in_root_case', 0)}, "
         f"elsewhere {rep.get('elsewhere', 0)}, root not a case {rep.get('root_not_a_case', 0)}; "
         f"empty cases {c['empty_cases']}; retried rows {c['retried_rows']}")
    if r["problems"]:
        s += "\n  PROBLEMS: " + "; ".join(r["problems"])
    if r["worker_errors"]:
        s += "\n  worker errors: " + ", ".join(f"{k} x{v}" for k, v in r["worker_errors"].items())
    s += (f"\n  latency parts p50/p99: waiting to be claimed {r['claim_wait_p50_ms']:.0f}/"
          f"{r['claim_wait_p99_ms']:.0f} ms, claimed -> committed {r['claimed_to_done_p50_ms']:.0f}/"
          f"{r['claimed_to_done_p99_ms']:.0f} ms")
    s += (f"\n  outage burst: {r['burst_cases']} cases under {r['burst_parents']} parent(s), {r['burst_unlinked']} "
          f"unlinked; burst p50/p99 {r['burst_p50_ms']:.0f}/{r['burst_p99_ms']:.0f} ms; {r['cases']} cases + "
          f"{r['incident_parents']} outage parents; msg/s by quarter {r['msg_per_s_by_quarter']}; rows per worker "
          f"{r['rows_per_worker']}; worker CPU {r['worker_cpu_ms_per_msg']:.1f} ms/msg")
    if c["pipeline_disagrees_with_generator"]:
        s += "\n  pipeline vs generator (not an exactly-once matter): " + ", ".join(
            f"{k} {v}" for k, v in sorted(c["pipeline_disagrees_with_generator"].items()))
    return s


def machine() -> dict:
    """Cores, load and code version of this machine and tree."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    return {"cpu_count": os.cpu_count(), "usable_cores": affinity, "loadavg": os.getloadavg(),
            "python": sys.version.split()[0], "code": code_version()}


def code_version() -> str:
    """The commit, and a hash of uncommitted changes under triagebot/ when there are any."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "triagebot"], cwd=ROOT, capture_output=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f" + uncommitted triagebot/ changes {hashlib.sha1(diff).hexdigest()[:10]}" if diff else "")


def run_benchmark(messages: int = 20000, workers: list[int] | None = None, base_url: str = DEFAULT_URL,
                  modes: tuple[str, ...] = ("batch", "paced"), rate: float | None = None,
                  paced_messages: int | None = None, burst_factor: float = 4.0, seed: int = 7,
                  reply_min_gap: int = 100, timeout: float = 3600.0, keep: bool = False,
                  quiet: bool = False, launch: str = "processes",
                  worker_settings: dict[str, str] | None = None) -> dict:
    """Every run of the benchmark; returns {"machine", "traffic", "results", "table"}."""
    workers = workers or [1, 2, 4]
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    why = pg_reachable(base_url)
    if why:
        raise SystemExit(f"PostgreSQL at {base_url} is not reachable: {why}")
    m = machine()
    say(f"machine: {m['usable_cores']} usable cores (cpu_count {m['cpu_count']}), load average "
        f"{' '.join(f'{x:.2f}' for x in m['loadavg'])}; workers {workers} as "
        + ("separate `triagebot worker` processes" if launch == "processes" else "`triagebot worker --concurrency N`")
        + (" (more than the cores: oversubscribed)" if max(workers) > m["usable_cores"] else "")
        + f"; code {m['code']}"
        + (f"; worker settings {worker_settings}" if worker_settings else ""))
    t0 = time.perf_counter()
    items = generate(messages, seed, reply_min_gap)
    comp = composition(items)
    say(f"traffic: {messages} deliveries generated in {time.perf_counter() - t0:.1f} s: {comp['by_kind']}; "
        f"languages {comp['by_language']}; {comp['html_mail']} mails with HTML; texts {comp['corpus']}")
    results = []
    if "batch" in modes:
        for n in workers:
            say(f"batch, {n} worker(s):")
            r = run_once("batch", n, items, base_url, timeout=timeout, keep=keep, quiet=quiet, launch=launch,
                         worker_settings=worker_settings)
            say(describe(r))
            results.append(r)
    paced_items = None
    if "paced" in modes:
        if not rate:
            batch = [r["msg_per_s"] for r in results if r["mode"] == "batch"]
            if not batch:
                raise SystemExit("the paced mode needs --rate when the batch mode does not run")
            rate = round(max(1.0, 0.5 * min(batch)), 1)
        pm = paced_messages or min(messages, max(200, int(rate * 60)))
        paced_items = items if pm == messages else generate(pm, seed, reply_min_gap)
        say(f"paced: {pm} deliveries arriving at {rate:g}/s (the burst at {rate * burst_factor:g}/s)")
        for n in workers:
            say(f"paced, {n} worker(s):")
            r = run_once("paced", n, paced_items, base_url, rate=rate, burst_factor=burst_factor, timeout=timeout,
                         keep=keep, quiet=quiet, launch=launch, worker_settings=worker_settings)
            say(describe(r))
            results.append(r)
    table = format_table(results)
    say("")
    say(f"Load benchmark on PostgreSQL, {m['usable_cores']} cores (load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; shared machine: figures are noisy)")
    say("batch: all enqueued first, released at once; wall s = release -> last finished; p50/p99 = queue wait.")
    say("paced: arriving at the rate; p50/p99 = intake received_at -> commit of message + case (finished_at).")
    say("start s = worker processes' start until all sit in their claim loop; not in wall s. Before the")
    say("clock starts, the first 10 x workers rows warm the workers up (a worker's first message loads models,")
    say("seconds) until each has done one; msgs, msg/s, p50/p99 leave them out; cases, ignored, dups and the check")
    say("count them. Batch mode's arrivals all fall in one outage window (60 min): outage clustering then compares")
    say("each incident with every open one, so batch msg/s falls as the run goes on (msg/s by quarter above).")
    batch_enq = [r["enqueue_msg_per_s"] for r in results if r["mode"] == "batch"]
    if batch_enq:
        say(f"enqueue through the listener code (SMTP GroupCommitWriter + Slack take_in): "
            f"{statistics.median(batch_enq):.0f} msg/s (median of {len(batch_enq)})")
    say(table)
    return {"machine": m, "traffic": comp, "paced_traffic": composition(paced_items) if paced_items else None,
            "config": {"messages": messages, "workers": workers, "modes": list(modes), "rate": rate,
                       "burst_factor": burst_factor, "seed": seed, "reply_min_gap": reply_min_gap, "launch": launch,
                       "worker_settings": worker_settings or {}},
            "results": results, "table": table}


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 1 when a run fails its exactly-once check."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20000, help="deliveries in the batch runs (default 20000)")
    p.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated (default 1,2,4)")
    p.add_argument("--database-url", default=DEFAULT_URL,
                   help="the PostgreSQL database; each run makes and drops its own schema in it (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write every figure and check result as JSON")
    p.add_argument("--modes", default="batch,paced", help="batch, paced or both (default batch,paced)")
    p.add_argument("--rate", type=float, default=None,
                   help="paced arrivals per second (default: half the lowest batch throughput; 0 = no paced runs)")
    p.add_argument("--paced-messages", type=int, default=None,
                   help="deliveries in the paced runs (default: a minute's worth at the rate, at most --messages)")
    p.add_argument("--burst-factor", type=float, default=4.0, help="the outage burst arrives this much faster")
    p.add_argument("--reply-min-gap", type=int, default=100,
                   help="a thread reply comes at least this many messages after its root (default 100)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take to drain the queue")
    p.add_argument("--launch", choices=("processes", "supervisor"), default="processes",
                   help="N separate `triagebot worker` processes (default), or one `triagebot worker --concurrency N`")
    p.add_argument("--worker-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a Settings field for the workers, e.g. worker_batch=1 (TRIAGEBOT_WORKER_BATCH); repeatable")
    p.add_argument("--keep", action="store_true", help="keep the schemas and worker logs (to look into a failure)")
    args = p.parse_args(argv)

    def interrupted(signum, _frame):   # stop the workers and drop the schema on the way out
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if any("=" not in x for x in args.worker_setting):
        p.error("--worker-setting takes NAME=VALUE")
    worker_settings = dict(x.split("=", 1) for x in args.worker_setting)
    modes = tuple(x.strip() for x in args.modes.split(",") if x.strip())
    if args.rate == 0:
        modes = tuple(x for x in modes if x != "paced")
    if not set(modes) <= {"batch", "paced"} or not modes or not workers or min(workers) < 1:
        p.error("--modes takes batch and/or paced; --workers positive integers")
    try:
        out = run_benchmark(args.messages, workers, args.database_url, modes, args.rate, args.paced_messages,
                            args.burst_factor, args.seed, args.reply_min_gap, args.timeout, args.keep,
                            launch=args.launch, worker_settings=worker_settings)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'}): workers stopped, schema dropped", file=sys.stderr)
        return 130
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if all(r["exactly_once"] for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
