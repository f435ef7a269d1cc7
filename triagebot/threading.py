"""Threading: does a message belong to an existing case? A chain of small rules, tried in order.

1. duplicate: the same message delivered twice (same Message-ID, or same content from the same sender);
2. reply headers: In-Reply-To / References naming a message of a case (or one of our acknowledgements), or a
   case already holding a reply to this message (replies can be processed before their root);
3. subject reference: [CASE-000123] in the subject, only when the sender belongs to that case's customer;
4. slack thread: the thread_ts of a case's Slack thread (or a case already holding a reply in this root's thread);
otherwise a new case. Each rule's hit or miss goes into the trail.

Many workers may process one thread's messages at the same moment: `serialize` makes them take turns.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from triagebot.db.tables import Case, MessageRow, ThreadKey
from triagebot.model import Message, Triage

REFERENCE = re.compile(r"\bCASE-(\d{6,})\b", re.IGNORECASE)
# Re:, SV:, Sv:, Vs:, AW:, RV:, Fwd:, VB:, FW:, RE[2]: ... in any number and order (en/sv/es/de/nl clients).
PREFIX = re.compile(r"^\s*(?:(?:re|sv|vs|aw|rv|fw|fwd|vb|tr|wg|enc|r)\s*(?:\[\d+\])?\s*[:：]\s*)+", re.IGNORECASE)


def clean_subject(subject: str | None) -> str:
    """The subject without reply/forward prefixes and case tags, lower-cased, for display and comparison."""
    s = subject or ""
    prev = None
    while prev != s:
        prev = s
        s = PREFIX.sub("", s)
        s = re.sub(r"^\s*\[[^\]]*CASE-\d+[^\]]*\]\s*", "", s, flags=re.IGNORECASE)
    return " ".join(s.split())


def message_hash(m: Message) -> str:
    """A hash of what the sender wrote, so a redelivery with other transport headers is still a duplicate."""
    h = hashlib.sha256()
    for part in (m.source, m.sender or "", clean_subject(m.subject), m.text, m.quoted,
                 "|".join(a.filename or "" for a in m.attachments)):
        h.update(part.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()


def thread_keys(m: Message) -> list[str]:
    """The keys under which later messages can find this message's case: its own Message-ID and Slack ts, and
    the messages it replies to — so a reply that comes before its root, or replies to a root never seen, and
    the root itself all meet in one case."""
    keys = [f"msgid:{i.strip().lower()}" for i in (m.message_id, *m.in_reply_to, *m.references) if i and i.strip()]
    if m.source == "slack" and m.channel and m.ts:
        keys.append(f"slack:{m.channel}:{m.ts}")
        if m.thread_ts and m.thread_ts != m.ts:
            keys.append(f"slack:{m.channel}:{m.thread_ts}")
    return list(dict.fromkeys(keys))


def serialize(s: Session, m: Message) -> None:
    """Make workers take turns on a thread: on PostgreSQL, a transaction advisory lock per key this message
    could find or claim a case under (its thread keys, and its content for the duplicate rule), taken in one
    global order so two workers never deadlock. The second worker then sees what the first stored. SQLite needs
    nothing: every writing transaction there is BEGIN IMMEDIATE, one at a time."""
    if s.get_bind().dialect.name != "postgresql":
        return
    names = set(thread_keys(m))
    if m.sender:
        names.add(f"content:{m.sender}:{message_hash(m)}")
    ids = sorted({int.from_bytes(hashlib.sha256(n.encode("utf-8", "replace")).digest()[:8], "big", signed=True)
                  for n in names})
    if ids:
        s.execute(text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:ids AS bigint[])) AS k"),
                  {"ids": ids})


@dataclass(frozen=True)
class Decision:
    """What threading decided: the action and, unless created, the case."""

    action: str                      # duplicate | threaded | created
    case_id: int | None
    rule: str
    detail: str = ""


class Context(Protocol):
    """What a rule may ask about the sender's organisation."""

    def same_customer(self, message: Message, triage: Triage, case: Case) -> bool: ...


class Rule(Protocol):
    name: str

    def __call__(self, s: Session, m: Message, t: Triage, ctx: Context) -> Decision | None: ...


class Duplicate:
    """The same message delivered twice: same Message-ID, or the same content from the same sender."""

    name = "duplicate"

    def __call__(self, s: Session, m: Message, t: Triage, ctx: Context) -> Decision | None:
        if m.message_id:
            row = s.scalars(select(MessageRow).where(MessageRow.message_id == m.message_id).limit(1)).first()
            if row is not None:
                return Decision("duplicate", row.case_id, self.name, f"Message-ID {m.message_id} seen as message {row.id}")
        if m.sender:
            row = s.scalars(select(MessageRow).where(MessageRow.content_hash == message_hash(m),
                                                     MessageRow.sender == m.sender).limit(1)).first()
            if row is not None:
                return Decision("duplicate", row.case_id, self.name, f"same content from the same sender as message {row.id}")
        return None


class ReplyHeaders:
    """In-Reply-To / References naming a message of a case."""

    name = "reply_headers"

    def __call__(self, s: Session, m: Message, t: Triage, ctx: Context) -> Decision | None:
        ids = [i for i in (*m.in_reply_to, *reversed(m.references)) if i]
        for ref in ids:
            key = s.get(ThreadKey, f"msgid:{ref.strip().lower()}")
            if key is not None:
                return Decision("threaded", key.case_id, self.name, f"replies to {ref}")
        if m.message_id:   # a reply to this very message came first
            key = s.get(ThreadKey, f"msgid:{m.message_id.strip().lower()}")
            if key is not None:
                return Decision("threaded", key.case_id, self.name, f"a reply to {m.message_id} is in the case")
        return None


class SubjectReference:
    """A case reference in the subject, accepted only from the case's own customer organisation."""

    name = "subject_reference"

    def __call__(self, s: Session, m: Message, t: Triage, ctx: Context) -> Decision | None:
        match = REFERENCE.search(m.subject or "")
        if not match:
            return None
        ref = f"CASE-{int(match.group(1)):06d}"
        case = s.scalars(select(Case).where(Case.reference == ref)).first()
        if case is None:
            return Decision("created", None, self.name, f"{ref} in the subject names no case; new case notes it")
        if not ctx.same_customer(m, t, case):
            return Decision("created", None, self.name,
                            f"{ref} belongs to another customer ({case.customer}); new case notes the reference")
        return Decision("threaded", case.id, self.name, f"{ref} in the subject, sender belongs to {case.customer}")


class SlackThread:
    """A Slack reply in the thread of a case."""

    name = "slack_thread"

    def __call__(self, s: Session, m: Message, t: Triage, ctx: Context) -> Decision | None:
        if m.source != "slack" or not m.channel:
            return None
        if m.thread_ts and m.thread_ts != m.ts:
            key = s.get(ThreadKey, f"slack:{m.channel}:{m.thread_ts}")
            if key is not None:
                return Decision("threaded", key.case_id, self.name, f"in Slack thread {m.thread_ts}")
        if m.ts:           # the root of a thread whose replies came first
            key = s.get(ThreadKey, f"slack:{m.channel}:{m.ts}")
            if key is not None:
                return Decision("threaded", key.case_id, self.name, f"replies in thread {m.ts} came first")
        return None


RULES: tuple[Rule, ...] = (Duplicate(), ReplyHeaders(), SubjectReference(), SlackThread())


def decide(s: Session, m: Message, t: Triage, ctx: Context) -> tuple[Decision, list[str]]:
    """Run the rules in order; the first that decides wins. Returns the decision and the trail of hits/misses."""
    trail = []
    pending: Decision | None = None
    for rule in RULES:
        d = rule(s, m, t, ctx)
        if d is None:
            trail.append(f"thread.{rule.name}: no")
            continue
        trail.append(f"thread.{rule.name}: {d.action} ({d.detail})")
        if d.action == "created":   # a reference we refused: note it, but let later rules (Slack thread) try
            pending = d
            continue
        return d, trail
    d = pending or Decision("created", None, "new_case", "no rule matched an existing case")
    if pending is None:
        trail.append("thread.new_case: created")
    return d, trail
