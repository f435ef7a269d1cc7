"""Acknowledgements: a mail to the customer for each new case, queued in the outbox for the relay.

An after-commit hook of the Processor (triagebot/ingest.py). It follows RFC 3834: only a new case from
a person gets one (never auto-replies, bounces, mailing lists or no-reply addresses), it is marked
Auto-Submitted: auto-replied and leaves with a null envelope sender (triagebot/outbound/relay.py). The
subject carries the case reference in brackets and our Message-ID is registered as a thread key, so a
reply threads into the case by its headers or, when a client drops them, by its subject.
"""
from __future__ import annotations

import logging
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, time, timezone
from email.charset import QP, Charset
from email.header import Header
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formataddr, formatdate
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from triagebot.db.tables import Case, Outbox, ThreadKey, utcnow
from triagebot.model import Message
from triagebot.rules_loader import RuleError, load_yaml, load_yaml_items, require, rules_path
from triagebot.settings import Settings

if TYPE_CHECKING:  # ingest imports this module from its hook table
    from triagebot.ingest import Outcome

log = logging.getLogger(__name__)

TEMPLATE_FILE = "ack_templates.yaml"
FIELDS = ("language", "from_name", "subject", "subject_without_original", "greeting", "greeting_without_name",
          "body")
PLACEHOLDERS = {"subject": {"reference", "subject"}, "subject_without_original": {"reference"},
                "greeting": {"name"}, "greeting_without_name": set(), "body": {"greeting", "reference"},
                "from_name": set()}
DEFAULT_LANGUAGE = "en"
MAX_SUBJECT = 150
MAX_NAME = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# an address we will put on an envelope: no spaces, brackets, quotes or control characters, one @, a dotted domain
_ADDRESS = re.compile(r"^[^\s<>()\[\]\\,;:\"@\x00-\x1f\x7f]{1,64}@[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?"
                      r"(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)+$", re.IGNORECASE)
_MSGID = re.compile(r"^<[^<>\s]{1,500}>$")
WIRE = compat32.clone(linesep="\r\n")


@dataclass(frozen=True)
class Template:
    """The acknowledgement text of one language."""

    language: str
    from_name: str
    subject: str
    subject_without_original: str
    greeting: str
    greeting_without_name: str
    body: str


@dataclass(frozen=True)
class AckRules:
    """Templates by language and who never gets an acknowledgement."""

    templates: dict[str, Template]
    local_parts: tuple[re.Pattern, ...]
    headers: tuple[tuple[str, re.Pattern], ...]
    max_per_sender_per_day: int

    def template(self, language: str | None) -> Template:
        return self.templates.get(language or "", self.templates[DEFAULT_LANGUAGE])


def _compile(path: Path, line: int | None, pattern: str, what: str, whole: bool = False) -> re.Pattern:
    try:
        return re.compile(f"(?:{pattern})" + ("$" if whole else ""), re.IGNORECASE)
    except re.error as e:
        raise RuleError(path, line, f"{what}: not a valid regular expression: {e}") from None


def _suppress_lines(path: Path) -> dict[str, int]:
    """Line numbers (1-based) of the suppress entries and the cap, for error messages."""
    root = yaml.compose(path.read_text(encoding="utf-8"))
    lines: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key, value in root.value:
        lines[key.value] = key.start_mark.line + 1
        if key.value != "suppress" or not isinstance(value, yaml.MappingNode):
            continue
        for k, v in value.value:
            if k.value == "local_parts" and isinstance(v, yaml.SequenceNode):
                for i, item in enumerate(v.value):
                    lines[f"local_parts.{i}"] = item.start_mark.line + 1
            elif k.value == "headers" and isinstance(v, yaml.MappingNode):
                for hk, hv in v.value:
                    lines[f"headers.{hk.value}"] = hv.start_mark.line + 1
    return lines


@lru_cache(maxsize=4)
def load_rules(rules_dir: Path | None = None) -> AckRules:
    """Read and check rules/ack_templates.yaml; RuleError names the file and line of a mistake."""
    path = rules_path(TEMPLATE_FILE, rules_dir)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RuleError(path, 1, "expected a mapping with templates, suppress and max_per_sender_per_day")
    templates: dict[str, Template] = {}
    for item in load_yaml_items(path, "templates"):
        value = require(item, path, {f: str for f in FIELDS})
        unknown = set(value) - set(FIELDS)
        if unknown:
            raise RuleError(path, item.line, f"unknown field(s) {', '.join(sorted(unknown))}")
        for f, allowed in PLACEHOLDERS.items():
            try:
                used = {name for _lit, name, _spec, _conv in string.Formatter().parse(value[f]) if name is not None}
            except ValueError as e:
                raise RuleError(path, item.line, f"{f}: {e}") from None
            if used - allowed:
                raise RuleError(path, item.line, f"{f} uses {', '.join(sorted(used - allowed))}; "
                                                 f"allowed: {', '.join(sorted(allowed)) or 'none'}")
        for f in ("subject", "subject_without_original"):
            if "[{reference}]" not in value[f]:
                raise RuleError(path, item.line, f"{f} must contain [{{reference}}] so replies thread")
        if value["language"] in templates:
            raise RuleError(path, item.line, f"a second template for language {value['language']!r}")
        templates[value["language"]] = Template(**{f: value[f] for f in FIELDS})
    if DEFAULT_LANGUAGE not in templates:
        raise RuleError(path, None, f"no template for {DEFAULT_LANGUAGE!r}, the language of last resort")
    lines = _suppress_lines(path)
    suppress = data.get("suppress") or {}
    if not isinstance(suppress, dict):
        raise RuleError(path, lines.get("suppress"), "suppress must be a mapping with local_parts and headers")
    local_parts = tuple(_compile(path, lines.get(f"local_parts.{i}"), str(p), "suppress.local_parts", whole=True)
                        for i, p in enumerate(suppress.get("local_parts") or []))
    headers = tuple((str(name).lower(), _compile(path, lines.get(f"headers.{name}"), str(p),
                                                 f"suppress.headers.{name}"))
                    for name, p in (suppress.get("headers") or {}).items())
    cap = data.get("max_per_sender_per_day", 20)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise RuleError(path, lines.get("max_per_sender_per_day"),
                        "max_per_sender_per_day must be a whole number of at least 1")
    return AckRules(templates, local_parts, headers, cap)


def one_line(text: str | None, limit: int) -> str:
    """Text fit for a header: control characters (CR and LF above all) become spaces, runs collapse, cut to limit."""
    s = " ".join(_CONTROL.sub(" ", text or "").split())
    return s if len(s) <= limit else s[:limit - 1].rstrip() + "…"


def suppression(message: Message, rules: AckRules, settings: Settings) -> str | None:
    """Why this message's sender must not get an acknowledgement, or None when they may."""
    sender = (message.sender or "").strip()
    if not sender:
        return "no sender address"
    if not _ADDRESS.match(sender):
        return "the sender address is not one we send to"
    local, _, domain = sender.lower().rpartition("@")
    ours = {d.lower() for d in settings.mail_domains} | {settings.support_address.lower().rpartition("@")[2]}
    if domain in ours or any(domain.endswith("." + d) for d in ours):
        return "the sender is one of our own addresses"
    for pattern in rules.local_parts:
        if pattern.match(local):
            return f"no-reply style address ({pattern.pattern})"
    for name, pattern in rules.headers:
        for k, v in message.headers:
            if k.lower() == name and pattern.search(v or ""):
                return f"header {k}: {one_line(v, 60)}"
    return None


def _subject_header(subject: str) -> str | Header:
    """The subject as a header: the bracketed reference stays plain ASCII, the customer's words RFC 2047 encoded."""
    if subject.isascii():
        return subject
    ref, sep, rest = subject.partition("] ")
    if not (sep and ref.startswith("[") and ref.isascii()):
        return Header(subject, "utf-8")
    h = Header(ref + sep, "us-ascii")
    h.append(rest, "utf-8")
    return h


def build(settings: Settings, template: Template, reference: str, message: Message) -> MIMEText:
    """The acknowledgement mail for a case; every header value from the customer is cleaned to one line."""
    name = one_line(message.sender_name, MAX_NAME)
    if "@" in name:  # a display name that is an address says nothing and may mislead
        name = ""
    subject = one_line(message.subject, MAX_SUBJECT)
    ack_subject = (template.subject.format(reference=reference, subject=subject) if subject
                   else template.subject_without_original.format(reference=reference))
    greeting = template.greeting.format(name=name) if name else template.greeting_without_name
    # quoted-printable UTF-8: readable, and 7-bit safe through any relay, 8BITMIME or not
    charset = Charset("utf-8")
    charset.body_encoding = QP
    msg = MIMEText(template.body.format(greeting=greeting, reference=reference), "plain", charset)
    # The legacy (compat32) header API on purpose: email.policy's folder splits non-ASCII words across
    # encoded-words and loses the spaces between them ("på våra" -> "påvåra").
    msg["From"] = formataddr((one_line(template.from_name, MAX_NAME), settings.support_address), charset="utf-8")
    msg["To"] = formataddr((name, message.sender or ""), charset="utf-8")
    msg["Subject"] = _subject_header(one_line(ack_subject, 250))
    msg["Date"] = formatdate(usegmt=True)
    # short enough not to be folded; random so that it is unique without asking the database
    domain = settings.support_address.rpartition("@")[2] or "triagebot.invalid"
    msg["Message-ID"] = f"<ack.{reference.lower()}.{secrets.token_hex(8)}@{domain}>"
    original = message.message_id if message.message_id and _MSGID.match(message.message_id) else None
    if original:
        refs = [r for r in message.references if _MSGID.match(r)][-10:]
        msg["In-Reply-To"] = original
        msg["References"] = " ".join([*refs, original])
    msg["Auto-Submitted"] = "auto-replied"          # RFC 3834 §5
    msg["X-Auto-Response-Suppress"] = "All"         # asks Exchange not to answer this with an out-of-office
    return msg


def as_bytes(msg: MIMEText) -> bytes:
    """The mail as it goes on the wire: CRLF line ends."""
    return msg.as_bytes(policy=WIRE)


def _day_start(now: datetime) -> datetime:
    return datetime.combine(now.date(), time.min, tzinfo=timezone.utc)


def queue_acknowledgement(settings: Settings, sessions: sessionmaker[Session], outcome: Outcome) -> int | None:
    """After-commit hook: queue the acknowledgement of a new e-mail case; the outbox id, or None when none is due."""
    m, t = outcome.message, outcome.triage
    if outcome.action != "created" or m is None or m.source != "email" or outcome.case_id is None:
        return None
    if t is not None and t.disposition != "case":
        return None
    rules = load_rules(settings.rules_dir)
    why = suppression(m, rules, settings)
    if why:
        log.info("no acknowledgement for %s: %s", outcome.case, why)
        return None
    sender = (m.sender or "").lower()
    now = utcnow()
    with sessions() as s, s.begin():
        case = s.get(Case, outcome.case_id)
        if case is None or not case.reference:
            return None
        sent_today = s.scalar(select(func.count()).select_from(Outbox).where(
            Outbox.kind == "ack", Outbox.recipient == sender, Outbox.created_at >= _day_start(now))) or 0
        if sent_today >= rules.max_per_sender_per_day:
            log.warning("no acknowledgement for %s: %d already sent to that address today", case.reference, sent_today)
            return None
        msg = build(settings, rules.template(t.language if t else None), case.reference, m)
        row = Outbox(case_id=case.id, kind="ack", recipient=sender, message_id=msg["Message-ID"],
                     raw=as_bytes(msg), dedupe_key=f"ack:{case.id}:{sender}:{now.date().isoformat()}",
                     state="queued", attempts=0, not_before=now, created_at=now)
        try:
            with s.begin_nested():
                s.add(row)
                s.flush()
        except IntegrityError:
            log.info("acknowledgement for %s to this sender today is already queued", case.reference)
            return None
        # replies quoting our Message-ID in In-Reply-To/References thread into this case
        s.add(ThreadKey(key=f"msgid:{msg['Message-ID'].strip().lower()}", case_id=case.id))
        row_id = row.id
    log.info("acknowledgement for %s queued (outbox %s)", outcome.case, row_id)
    return row_id
