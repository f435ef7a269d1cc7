"""Data protection: retention (`purge`), data-subject requests (`export`, `forget`) and the audit trail.

Personal data lives in: intake raw bytes (the whole mail or Slack event, attachments included) and origin;
messages' sender, sender name, subject, texts, Message-ID, identifiers and the trail's details; cases' subject,
identifiers, outage features (word counts) and the customer when it is an individual's address; case events'
details (triage records, texts, addresses); feedback texts; outgoing mail in the outbox; Message-ID thread keys.

The anonymised statistics that stay: every row and its dates, channel, source, disposition, action, language,
category, service, severity, blast estimate and tier (identifier lists keep their length, not their values),
confidences, model versions, case status, kind, customer organisation and tier, SLA due, events' kind and actor,
feedback's labels. Detail values that look like labels (lower-case words such as `incident`, `reply_headers`)
stay; every other string becomes "[purged]".
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import String, cast, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from triagebot import crypto
from triagebot.db.tables import (Audit, Case, CaseEvent, Feedback, Intake, MessageRow, Outbox, ThreadKey,
                                 utcnow)
from triagebot.logs import redact

PURGED, FORGOTTEN = "purged", "forgotten"
MASK = "[purged]"
FORGOTTEN_MASK = "[forgotten]"
INDIVIDUAL = "individual"          # the customer of a case whose customer was a private person's address
BATCH = 500
# a detail value kept by anonymise(): a label, a rule or model name; never an address or an identifier
_LABEL = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_LONG_DIGITS = re.compile(r"\d{6,}")
_AGE = re.compile(r"^\s*(\d+)\s*([dhw]?)\s*$", re.IGNORECASE)
_AGE_UNITS = {"": "days", "d": "days", "h": "hours", "w": "weeks"}


# -- small helpers ----------------------------------------------------------------------------------------

def parse_age(text: str) -> timedelta:
    """An age like `90d`, `12w`, `36h` or `90` (days); ValueError when it is not one or not positive."""
    m = _AGE.match(text or "")
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"not an age: {text!r} (use e.g. 90d, 12w or 36h)")
    return timedelta(**{_AGE_UNITS[m.group(2).lower()]: int(m.group(1))})


def admin_actor(explicit: str | None = None) -> str:
    """The audit actor of a CLI command: --actor, else the login name ($USER)."""
    name = explicit or os.environ.get("USER") or os.environ.get("LOGNAME")
    if not name:
        try:
            name = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry in a container: still audit, as unknown
            name = "unknown"
    return name if ":" in name else f"admin:{name}"


def pseudonym(contact: str) -> str:
    """How the audit trail names a forgotten contact: a hash, so the request is provable but the address is gone."""
    return "contact:sha256:" + hashlib.sha256(contact.strip().lower().encode("utf-8")).hexdigest()[:16]


def anonymise(value: Any, mask: str = MASK) -> Any:
    """A JSON value with every string that is not label-like masked; numbers, booleans, keys and shapes stay."""
    if isinstance(value, str):
        return value if _LABEL.match(value) and not _LONG_DIGITS.search(value) else mask
    if isinstance(value, dict):
        return {k: anonymise(v, mask) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [anonymise(v, mask) for v in value]
    return value


def anonymise_identifiers(ids: dict | None, mask: str = MASK) -> dict:
    """Identifier lists by kind with their values masked: the counts stay, the SIMs are no longer named."""
    return {k: [mask] * len(v) if isinstance(v, list) else v for k, v in (ids or {}).items()}


def _trail(entries: list | None) -> list:
    # a trail entry is "step: decision (detail)"; details quote the message (counts, matched words, the address)
    return [redact(str(e).split(" (", 1)[0]) for e in entries or []]


def _with_flag(flags: list | None, flag: str) -> list:
    flags = list(flags or [])
    return flags if flag in flags else flags + [flag]


def _origin_kind(origin: str | None) -> str | None:
    # "smtp:10.0.0.7:51234", "cli:/home/x/mail.eml" -> "smtp", "cli": the channel stays, the peer and path go
    return origin.split(":", 1)[0] if origin else origin


# -- the audit trail --------------------------------------------------------------------------------------

def record_access(session: Session, actor: str, action: str, target: str | None = None,
                  detail: dict | None = None) -> Audit:
    """Add an audit row to the caller's session (committed with the caller's work).

    For agents (actor "slack:U123") viewing or changing a case (target "CASE-000123") and for admin commands.
    String values in detail are redacted (addresses, phone numbers, identifiers): the trail records accesses,
    it must not become one more copy of the data.
    """
    row = Audit(actor=actor[:128], action=action[:32], target=target[:255] if target else None,
                detail=_redacted(detail or {}), at=utcnow())
    session.add(row)
    return row


def audit(sessions: sessionmaker[Session], actor: str, action: str, target: str | None = None,
          detail: dict | None = None) -> int:
    """Record one access in its own transaction; returns the audit row's id."""
    with sessions() as s, s.begin():
        row = record_access(s, actor, action, target, detail)
        s.flush()
        return row.id


def _finish_audit(sessions: sessionmaker[Session], audit_id: int, detail: dict) -> None:
    with sessions() as s, s.begin():
        row = s.get(Audit, audit_id)
        row.detail = {**(row.detail or {}), **_redacted(detail)}


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


# -- purge ------------------------------------------------------------------------------------------------

def _in_batches(sessions: sessionmaker[Session], ids_query, model, change: Callable[[Any], bool],
                batch: int = BATCH) -> int:
    """Apply `change` to the rows the id query names, a transaction per batch (writers are not held up)."""
    with sessions() as s:
        ids = list(s.scalars(ids_query))
    changed = 0
    for i in range(0, len(ids), batch):
        with sessions() as s, s.begin():
            for row in s.scalars(select(model).where(model.id.in_(ids[i:i + batch]))):
                changed += bool(change(row))
    return changed


def _purge_message(m: MessageRow, flag: str = PURGED) -> bool:
    m.sender = m.sender_name = m.subject = m.edited_text = m.message_id = None
    m.text = m.quoted = m.content_hash = ""
    m.identifiers = anonymise_identifiers(m.identifiers)
    m.trail = _trail(m.trail)
    m.flags = _with_flag(m.flags, flag)
    return True


def _purge_intake(r: Intake, flag: str = PURGED) -> bool:
    r.raw, r.content_hash = b"", ""
    r.origin = _origin_kind(r.origin)
    r.last_error = redact(r.last_error) if r.last_error else r.last_error
    r.flags = _with_flag(r.flags, flag)
    return True


def _anonymise_event(e: CaseEvent) -> bool:
    new = anonymise(e.detail or {})
    if new == (e.detail or {}):
        return False
    e.detail = new
    return True


def _purge_feedback(f: Feedback) -> bool:
    f.text, f.subject = "", None
    return True


def _customer_of(customer: str | None) -> str | None:
    return INDIVIDUAL if customer and "@" in customer else customer


def purge(sessions: sessionmaker[Session], older_than: timedelta, actor: str, *,
          now: datetime | None = None) -> dict[str, Any]:
    """Remove raw messages and personal data older than the age; keep the anonymised statistics.

    Old intake rows still queued or processing are left alone (they have not been worked on yet). A case is
    old when it and all its messages are. Idempotent: a second run changes nothing.
    """
    now = now or utcnow()
    cutoff = now - older_than
    audit_id = audit(sessions, actor, "purge", None,
                     {"older_than_hours": older_than.total_seconds() / 3600, "cutoff": cutoff.isoformat()})
    report: dict[str, Any] = {"cutoff": cutoff.isoformat()}
    report["intake"] = _in_batches(
        sessions, select(Intake.id).where(Intake.received_at < cutoff, Intake.state.in_(("done", "failed")),
                                          func.length(Intake.raw) > 0), Intake, _purge_intake)
    report["messages"] = _in_batches(
        sessions, select(MessageRow.id).where(
            MessageRow.received_at < cutoff,
            or_(MessageRow.sender.is_not(None), MessageRow.sender_name.is_not(None), MessageRow.subject.is_not(None),
                MessageRow.text != "", MessageRow.quoted != "", MessageRow.edited_text.is_not(None),
                MessageRow.message_id.is_not(None), MessageRow.content_hash != "")),
        MessageRow, _purge_message)
    report["events"] = _in_batches(sessions, select(CaseEvent.id).where(CaseEvent.at < cutoff), CaseEvent,
                                   _anonymise_event)
    report["feedback"] = _in_batches(
        sessions, select(Feedback.id).where(Feedback.created_at < cutoff,
                                            or_(Feedback.text != "", Feedback.subject.is_not(None))),
        Feedback, _purge_feedback)
    recent = exists().where(MessageRow.case_id == Case.id, MessageRow.received_at >= cutoff)
    with sessions() as s:
        old_cases = list(s.scalars(select(Case.id).where(Case.updated_at < cutoff, ~recent)))
    report["cases"] = report["thread_keys"] = 0
    for i in range(0, len(old_cases), BATCH):
        chunk = old_cases[i:i + BATCH]
        with sessions() as s, s.begin():
            for c in s.scalars(select(Case).where(Case.id.in_(chunk))):
                values = {"subject": None, "features": {}, "identifiers": anonymise_identifiers(c.identifiers),
                          "customer": _customer_of(c.customer)}
                if any(getattr(c, k) != v for k, v in values.items()):
                    _update_case(s, c.id, values)
                    report["cases"] += 1
            # a late reply still finds its case by the reference in its subject; Message-IDs may name people
            report["thread_keys"] += s.execute(delete(ThreadKey).where(ThreadKey.case_id.in_(chunk))).rowcount or 0
    with sessions() as s, s.begin():
        report["outbox"] = s.execute(delete(Outbox).where(Outbox.created_at < cutoff, Outbox.state != "queued")
                                     ).rowcount or 0
    with sessions() as s:
        report["intake_still_queued"] = s.scalar(
            select(func.count()).select_from(Intake).where(Intake.received_at < cutoff,
                                                           Intake.state.in_(("queued", "processing")))) or 0
    _finish_audit(sessions, audit_id, {"result": report})
    return report


def _update_case(s: Session, case_id: int, values: dict) -> None:
    # a Core UPDATE naming updated_at keeps its value: the ORM's onupdate would make an old case look active
    s.execute(update(Case).where(Case.id == case_id).values(**values, updated_at=Case.updated_at))


# -- export -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    """What `export --customer` matches: case customers, sender addresses and domains, Slack channels."""

    names: frozenset[str]
    domains: frozenset[str]
    contacts: frozenset[str]
    channels: frozenset[str]


def selector(customer: str, rules_dir: Path | None = None) -> Selector:
    """The selector of a customer name, a domain or an address, widened by the customer registry when it knows it."""
    low = customer.strip().lower()
    names, domains, contacts, channels = {low}, set(), set(), set()
    if "@" in low:
        contacts.add(low)
    elif "." in low and " " not in low:
        domains.add(low)
    try:
        from triagebot.customers import CustomerRegistry
        known = CustomerRegistry.load(rules_dir).get(customer.strip())
    except Exception:  # noqa: BLE001 - no or broken registry: the name, domain or address alone still selects
        known = None
    if known is not None:
        names.add(known.name.lower())
        domains.update(d.lower() for d in known.domains)
        contacts.update(c.lower() for c in known.contacts)
        channels.update(known.slack_channels)
    return Selector(frozenset(names), frozenset(domains), frozenset(contacts), frozenset(channels))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    return v


def row_dict(row: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """A table row as a JSON-ready dict of its columns."""
    return {c.key: _jsonable(getattr(row, c.key)) for c in row.__table__.columns if c.key not in skip}


def _raw_fields(raw: bytes) -> dict[str, Any]:
    try:
        plain = crypto.unseal(raw)
    except crypto.CryptoError as e:
        return {"raw_error": str(e)}
    try:
        return {"raw": plain.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(plain).decode("ascii")}


def export(sessions: sessionmaker[Session], customer: str, actor: str, *,
           rules_dir: Path | None = None) -> dict[str, Any]:
    """Everything stored about a customer (name, domain or address): cases, messages with their raw bytes
    (decrypted), case events, feedback and outgoing mail. The access is audited before any data is read."""
    sel = selector(customer, rules_dir)
    audit_id = audit(sessions, actor, "export", customer, {"selector": {
        "names": sorted(sel.names), "domains": sorted(sel.domains), "contacts": len(sel.contacts),
        "channels": sorted(sel.channels)}})
    with sessions() as s:
        sender = func.lower(MessageRow.sender)
        who = [sender.in_(sorted(sel.contacts))] if sel.contacts else []
        for d in sorted(sel.domains):
            who += [sender.like(f"%@{d}"), sender.like(f"%.{d}")]
        if sel.channels:
            who.append(MessageRow.slack_channel.in_(sorted(sel.channels)))
        case_ids = set(s.scalars(select(Case.id).where(
            func.lower(Case.customer).in_(sorted(sel.names | sel.domains | sel.contacts)))))
        if who:
            case_ids |= {c for c in s.scalars(select(MessageRow.case_id).where(or_(*who))) if c is not None}
        where_msg = [MessageRow.case_id.in_(sorted(case_ids))] + who
        messages = list(s.scalars(select(MessageRow).where(or_(*where_msg)).order_by(MessageRow.id)))
        message_ids = [m.id for m in messages]
        intake = {r.id: r for r in s.scalars(select(Intake).where(
            Intake.id.in_([m.intake_id for m in messages if m.intake_id is not None])))}
        cases = list(s.scalars(select(Case).where(Case.id.in_(sorted(case_ids))).order_by(Case.id)))
        events = list(s.scalars(select(CaseEvent).where(CaseEvent.case_id.in_(sorted(case_ids)))
                                .order_by(CaseEvent.id)))
        feedback = list(s.scalars(select(Feedback).where(or_(Feedback.case_id.in_(sorted(case_ids)),
                                                              Feedback.message_id.in_(message_ids)))
                                  .order_by(Feedback.id)))
        outbox_where = [Outbox.case_id.in_(sorted(case_ids))]
        if sel.contacts:
            outbox_where.append(func.lower(Outbox.recipient).in_(sorted(sel.contacts)))
        outbox = list(s.scalars(select(Outbox).where(or_(*outbox_where)).order_by(Outbox.id)))
        out_messages = []
        for m in messages:
            d = row_dict(m)
            r = intake.get(m.intake_id) if m.intake_id is not None else None
            if r is not None:
                d["intake"] = {**row_dict(r, skip=("raw",)), **_raw_fields(r.raw)}
            out_messages.append(d)
        data = {
            "format": "triagebot-export/1",
            "customer": customer,
            "generated_at": utcnow().isoformat(),
            "cases": [row_dict(c) for c in cases],
            "messages": out_messages,
            "events": [row_dict(e) for e in events],
            "feedback": [row_dict(f) for f in feedback],
            "outbox": [{**row_dict(o, skip=("raw",)), **_raw_fields(o.raw)} for o in outbox],
        }
    _finish_audit(sessions, audit_id, {"result": {k: len(data[k]) for k in
                                                   ("cases", "messages", "events", "feedback", "outbox")}})
    return data


# -- forget -----------------------------------------------------------------------------------------------

def _pattern(needles: Iterable[str]) -> re.Pattern[str] | None:
    # whole addresses and names only: forgetting bob@x.example must not touch jbob@x.example or x.example.org
    alts = sorted({n for n in needles if n}, key=len, reverse=True)
    if not alts:
        return None
    return re.compile(r"(?<![\w.+-])(?:" + "|".join(map(re.escape, alts)) + r")(?![\w-]|\.\w)", re.IGNORECASE)


def _replace(text: str | None, pattern: re.Pattern[str]) -> str | None:
    return pattern.sub(FORGOTTEN_MASK, text) if text else text


def _mentions(value: Any, pattern: re.Pattern[str]) -> bool:
    return bool(pattern.search(json.dumps(value, ensure_ascii=False, default=str)))


def _replace_in(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(FORGOTTEN_MASK, value)
    if isinstance(value, dict):
        return {k: _replace_in(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_in(v, pattern) for v in value]
    return value


def forget(sessions: sessionmaker[Session], contact: str, actor: str) -> dict[str, Any]:
    """Remove or anonymise everything personal about one contact (an e-mail address or a Slack user id).

    Their messages lose sender, name, subject, texts, Message-ID and identifiers; the raw bytes of their
    messages, and of any processed intake row that names them, are removed; case events about their messages
    or naming them keep only labels; their feedback texts go; mail to them in the outbox is deleted; other
    messages, cases and audit rows that name them get "[forgotten]" instead. Statistics stay. Intake rows
    still waiting in the queue are not touched but counted: run `forget` again once the worker has run.
    """
    addr = contact.strip()
    low = addr.lower()
    if not low:
        raise ValueError("an address or Slack user id is needed")
    who = pseudonym(addr)
    report: dict[str, Any] = {}
    with sessions() as s, s.begin():
        audit_row = record_access(s, actor, "forget", who)
        mine = list(s.scalars(select(MessageRow).where(func.lower(MessageRow.sender) == low)))
        mine_ids = {m.id for m in mine}
        names = {m.sender_name for m in mine if m.sender_name and len(m.sender_name.strip()) >= 4}
        message_ids = {m.message_id for m in mine if m.message_id}
        intake_ids = {m.intake_id for m in mine if m.intake_id is not None}
        case_ids = {m.case_id for m in mine if m.case_id is not None}
        pattern = _pattern([addr, *names])
        # their own lines, as others quote them ("> ..."): whole lines only, short ones say too little to matter
        lines = {ln.strip() for m in mine for t in (m.text, m.edited_text) for ln in (t or "").splitlines()
                 if len(ln.strip()) >= 12}
        quoted = re.compile("|".join(map(re.escape, sorted(lines, key=len, reverse=True)))) if lines else None
        event_pattern = _pattern([addr, *names, *message_ids])
        first_of_case = {cid: s.scalar(select(func.min(MessageRow.id)).where(MessageRow.case_id == cid))
                         for cid in case_ids}
        for m in mine:
            _purge_message(m, FORGOTTEN)
        report["messages"] = len(mine)
        # what others wrote in the same cases may quote them ("On ..., Alice <alice@x> wrote:")
        others = 0
        if case_ids:
            for m in s.scalars(select(MessageRow).where(MessageRow.case_id.in_(sorted(case_ids)),
                                                        MessageRow.id.not_in(sorted(mine_ids)))):
                new = {f: _replace(_replace(getattr(m, f), quoted) if quoted else getattr(m, f), pattern)
                       for f in ("text", "quoted", "subject", "edited_text")}
                if any(getattr(m, f) != v for f, v in new.items()):
                    for f, v in new.items():
                        setattr(m, f, v)
                    others += 1
        report["other_messages"] = others
        cases = 0
        for c in s.scalars(select(Case).where(or_(Case.id.in_(sorted(case_ids)), func.lower(Case.customer) == low))):
            values: dict[str, Any] = {"subject": _replace(c.subject, pattern)}
            if first_of_case.get(c.id) in mine_ids:
                # the subject, identifiers and outage features came from their message
                values.update(subject=None, features={}, identifiers=anonymise_identifiers(c.identifiers))
            if c.customer and c.customer.lower() == low:
                values["customer"] = INDIVIDUAL
            if any(getattr(c, k) != v for k, v in values.items()):
                _update_case(s, c.id, values)
                cases += 1
        report["cases"] = cases
        events = 0
        named = cast(CaseEvent.detail, String).ilike(f"%{_like(low)}%", escape="\\")
        candidates = list(s.scalars(select(CaseEvent).where(or_(CaseEvent.case_id.in_(sorted(case_ids)), named))))
        for e in candidates:
            d = e.detail or {}
            if (event_pattern and _mentions(d, event_pattern)) or d.get("message") in mine_ids:
                new = anonymise(d)
                if new != d:
                    e.detail = new
                    events += 1
        report["events"] = events
        fb = 0
        for f in s.scalars(select(Feedback).where(or_(Feedback.message_id.in_(sorted(mine_ids)),
                                                       Feedback.case_id.in_(sorted(case_ids))))):
            if f.message_id in mine_ids or _mentions([f.text, f.subject], pattern):
                if f.text or f.subject is not None:
                    _purge_feedback(f)
                    fb += 1
        report["feedback"] = fb
        report["outbox"] = s.execute(delete(Outbox).where(func.lower(Outbox.recipient) == low)).rowcount or 0
        keys = [f"msgid:{i.strip().lower()}" for i in message_ids]
        report["thread_keys"] = s.execute(delete(ThreadKey).where(ThreadKey.key.in_(keys))).rowcount or 0 \
            if keys else 0
        audits = 0
        for a in s.scalars(select(Audit).where(or_(func.lower(Audit.target).contains(low, autoescape=True),
                                                   cast(Audit.detail, String).ilike(f"%{_like(low)}%",
                                                                                    escape="\\")))):
            a.target = _pattern([addr]).sub(who, a.target) if a.target else a.target
            a.detail = _replace_in(a.detail or {}, _pattern([addr]))
            audits += 1
        report["audit_rows"] = audits
        linked = 0
        if intake_ids:
            for r in s.scalars(select(Intake).where(Intake.id.in_(sorted(intake_ids)))):
                if r.raw or r.origin or r.content_hash:
                    _purge_intake(r, FORGOTTEN)
                    linked += 1
        s.flush()
        audit_id = audit_row.id
    scanned = _forget_in_intake(sessions, addr, intake_ids)
    report["intake"] = linked + scanned["removed"]
    report["intake_still_queued"] = scanned["queued"]
    report["intake_unreadable"] = scanned["unreadable"]
    _finish_audit(sessions, audit_id, {"result": report})
    return report


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _forget_in_intake(sessions: sessionmaker[Session], addr: str, done: set[int]) -> dict[str, int]:
    """Remove the raw bytes of every other intake row that names the contact (duplicates, unreadable mail)."""
    needle = re.compile(rb"(?<![\w.+-])" + re.escape(addr.encode("utf-8")) + rb"(?![\w-]|\.\w)", re.IGNORECASE)
    out = {"removed": 0, "queued": 0, "unreadable": 0}
    with sessions() as s:
        ids = [i for i in s.scalars(select(Intake.id).where(func.length(Intake.raw) > 0).order_by(Intake.id))
               if i not in done]
    for i in range(0, len(ids), BATCH):
        with sessions() as s, s.begin():
            for r in s.scalars(select(Intake).where(Intake.id.in_(ids[i:i + BATCH]))):
                try:
                    plain = crypto.unseal(r.raw)
                except crypto.CryptoError:
                    out["unreadable"] += 1
                    continue
                if not needle.search(plain):
                    continue
                if r.state in ("queued", "processing"):
                    out["queued"] += 1
                    continue
                _purge_intake(r, FORGOTTEN)
                out["removed"] += 1
    return out
