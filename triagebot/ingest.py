"""From a claimed intake row to a stored message in a case: normalize, triage, thread, store — in one transaction."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from triagebot import outage
from triagebot import threading as thr
from triagebot.db import queue
from triagebot.db.tables import Case, CaseEvent, Intake, MessageRow, ThreadKey, utcnow
from triagebot.errors import InputError
from triagebot.model import Message, Triage, case_reference
from triagebot.normalize import from_raw
from triagebot.pipeline import Pipeline, triage_record
from triagebot.settings import Settings

log = logging.getLogger(__name__)
SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}
TIER_RANK = {"none": 0, "single": 1, "few": 2, "many": 3, "mass": 4, "fleet": 5}


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: the contract's ingest answer."""

    action: str                  # created | threaded | duplicate | ignored | error
    case: str | None
    message: Message | None
    triage: Triage | None
    error: str | None = None
    case_id: int | None = None
    message_row_id: int | None = None


# Called after a message's transaction has committed (Slack suggestions, acknowledgements): (settings, sessions, outcome).
AfterCommit = Callable[[Settings, "sessionmaker[Session]", Outcome], None]


class CustomerContext:
    """Answers whether a sender belongs to a case's customer organisation."""

    def same_customer(self, message: Message, triage: Triage, case: Case) -> bool:
        if triage.customer and case.customer and triage.customer == case.customer:
            return True
        return bool(message.sender_domain and case.customer and message.sender_domain == case.customer)


class Processor:
    """Processes intake rows: the worker's and `triagebot ingest`'s one way of doing it."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], pipeline: Pipeline | None = None,
                 after_commit: tuple[AfterCommit, ...] | None = None):
        self.settings, self.sessions = settings, sessions
        self.pipeline = pipeline or Pipeline.default(settings)
        self.ctx = CustomerContext()
        self.after_commit = default_after_commit(settings) if after_commit is None else after_commit

    # -- hints -----------------------------------------------------------------------------------
    def language_hint(self, s: Session, m: Message) -> str | None:
        """The language of the thread this message replies to, else the language this sender used last."""
        keys = [f"msgid:{i.strip().lower()}" for i in (*m.in_reply_to, *m.references) if i]
        if m.source == "slack" and m.thread_ts and m.channel:
            keys.append(f"slack:{m.channel}:{m.thread_ts}")
        for k in keys:
            tk = s.get(ThreadKey, k)
            if tk is not None:
                case = s.get(Case, tk.case_id)
                if case is not None and case.language in ("en", "sv", "es"):
                    return case.language
        if m.sender:
            lang = s.scalars(select(MessageRow.language).where(MessageRow.sender == m.sender,
                                                               MessageRow.language.in_(("en", "sv", "es")))
                             .order_by(MessageRow.id.desc()).limit(1)).first()
            return lang
        return None

    # -- the work ----------------------------------------------------------------------------------
    def process(self, item: queue.Claimed) -> Outcome:
        """Process one claimed row. Content errors park it as failed at once; other errors propagate."""
        try:
            message = from_raw(item.channel, item.raw)
        except InputError as e:
            with self.sessions() as s, s.begin():
                row = s.get(Intake, item.id)
                row.state, row.last_error, row.finished_at = queue.FAILED, f"input: {e}", utcnow()
                row.flags = list(row.flags or []) + ["unreadable"]
            log.info("intake %s unreadable: %s", item.id, e)
            return Outcome("error", None, None, None, str(e))
        for attempt in range(3):
            try:
                outcome = self._store(item, message)
                break
            except IntegrityError:
                # another worker stored the same thread key a moment ago: run again, it is now a duplicate/reply
                log.info("intake %s raced on a thread key, retrying (%d)", item.id, attempt + 1)
        else:
            outcome = self._store(item, message)
        for hook in self.after_commit:
            try:
                hook(self.settings, self.sessions, outcome)
            except Exception:  # a notification failing must not undo or repeat the stored work
                log.error("after-commit hook %s failed for intake %s", getattr(hook, "__name__", hook), item.id,
                          exc_info=True)
        return outcome

    def _store(self, item: queue.Claimed, message: Message) -> Outcome:
        with self.sessions() as s, s.begin():
            queue.hold(s, item)           # still our claim; locked, so no other worker takes it over meanwhile
            thr.serialize(s, message)     # workers take turns on a thread: one case per thread
            hint = self.language_hint(s, message)
            if hint and not message.language_hint:
                from dataclasses import replace
                message = replace(message, language_hint=hint)
            t = self.pipeline.run(message)
            if t.disposition != "case":
                row = self._message_row(s, item, message, t, None, "ignored", [])
                queue.mark_done(s, item.id)
                return Outcome("ignored", None, message, t, message_row_id=row.id)
            decision, trail = thr.decide(s, message, t, self.ctx)
            if decision.action == "duplicate":
                case = s.get(Case, decision.case_id) if decision.case_id else None
                queue.mark_done(s, item.id)
                return Outcome("duplicate", case.reference if case else None, message, t,
                               case_id=case.id if case else None)
            if decision.action == "threaded":
                # locked and read afresh: two replies counted into one case at once see each other
                case = s.get(Case, decision.case_id, with_for_update=True, populate_existing=True)
                self._thread(s, case, message, t, decision)
            else:
                case = self._create(s, message, t, decision, reported_at=item.received_at)
            row = self._message_row(s, item, message, t, case.id, decision.action, trail)
            for key in thr.thread_keys(message):
                if s.get(ThreadKey, key) is None:
                    s.add(ThreadKey(key=key, case_id=case.id))
            s.flush()
            queue.mark_done(s, item.id)
            log.info("intake %s -> %s %s (message %s)", item.id, decision.action, case.reference, row.id)
            return Outcome(decision.action, case.reference, message, t, case_id=case.id, message_row_id=row.id)

    def _message_row(self, s: Session, item: queue.Claimed, m: Message, t: Triage, case_id: int | None,
                     action: str, trail: list[str]) -> MessageRow:
        row = MessageRow(
            intake_id=item.id, case_id=case_id, source=m.source, message_id=m.message_id,
            content_hash=thr.message_hash(m), sender=m.sender, sender_name=m.sender_name, subject=m.subject,
            text=m.text, quoted=m.quoted, slack_channel=m.channel, slack_ts=m.ts, slack_thread_ts=m.thread_ts,
            disposition=t.disposition, action=action, language=t.language, category=t.category,
            service=t.service, severity=t.severity, blast_estimate=t.blast_radius.estimate,
            blast_tier=t.blast_radius.tier, identifiers=t.blast_radius.identifiers.as_dict(),
            confidence={k: float(v) for k, v in t.confidence.items()},
            trail=[str(e) for e in t.trail] + trail, model_versions=dict(t.model_versions),
            flags=list(m.flags), received_at=item.received_at)
        s.add(row)
        s.flush()
        return row

    def _create(self, s: Session, m: Message, t: Triage, d: thr.Decision,
                reported_at: datetime | None = None) -> Case:
        now = utcnow()
        case = Case(customer=t.customer or m.sender_domain or m.sender, customer_tier=t.customer_tier,
                    status="open", subject=thr.clean_subject(m.subject) or _first_line(m.text),
                    language=t.language, category=t.category, service=t.service, severity=t.severity,
                    blast_estimate=t.blast_radius.estimate, blast_tier=t.blast_radius.tier,
                    identifiers=t.blast_radius.identifiers.as_dict(),
                    sla_due=sla_due(t, now, self.settings.rules_dir),
                    slack_channel=m.channel, slack_thread_ts=m.thread_ts or m.ts, created_at=now, updated_at=now)
        s.add(case)
        s.flush()
        case.reference = case_reference(case.id)
        s.add(CaseEvent(case_id=case.id, actor="bot", kind="created",
                        detail={"rule": d.rule, "why": d.detail, "triage": triage_record(m, t)}))
        sig = outage.signature(m.subject, m.text, t.service, self.settings.rules_dir)
        case.features = sig.as_json()
        outage.link(s, case, sig, self.settings, reported_at=reported_at)
        return case

    def _thread(self, s: Session, case: Case, m: Message, t: Triage, d: thr.Decision) -> None:
        changes = {}
        contacts = 1 + (s.scalar(select(func.count()).select_from(MessageRow)
                                 .where(MessageRow.case_id == case.id, MessageRow.action != "ignored")) or 0)
        if case.severity and case.status not in ("resolved", "closed"):
            from triagebot.steps.severity import SeverityPolicy
            raised, why = SeverityPolicy.load(self.settings.rules_dir).raise_for_repeats(case.severity, contacts)
            if why:
                changes["severity"] = (case.severity, raised)
                s.add(CaseEvent(case_id=case.id, actor="bot", kind="severity_raised",
                                detail={"from": case.severity, "to": raised, "why": why}))
                case.severity = raised
        if t.severity and SEVERITY_RANK.get(t.severity, -1) > SEVERITY_RANK.get(case.severity or "", -1):
            changes["severity"] = (case.severity, t.severity)
            case.severity = t.severity
        if TIER_RANK.get(t.blast_radius.tier, 0) > TIER_RANK.get(case.blast_tier, 0) or (
                (t.blast_radius.estimate or 0) > (case.blast_estimate or 0)):
            changes["blast"] = ([case.blast_estimate, case.blast_tier],
                                [t.blast_radius.estimate, t.blast_radius.tier])
            case.blast_estimate = max(t.blast_radius.estimate or 0, case.blast_estimate or 0) or None
            if TIER_RANK.get(t.blast_radius.tier, 0) > TIER_RANK.get(case.blast_tier, 0):
                case.blast_tier = t.blast_radius.tier
        if case.status in ("resolved", "closed"):
            changes["status"] = (case.status, "open")
            case.status = "open"
        if "blast" in changes or "severity" in changes:
            outage.child_updated(s, case, self.settings)  # an outage's blast radius is the sum of its children's
        case.updated_at = utcnow()
        s.add(CaseEvent(case_id=case.id, actor="bot", kind="threaded",
                        detail={"rule": d.rule, "why": d.detail, "message_id": m.message_id,
                                "changes": {k: list(v) for k, v in changes.items()}}))


def default_after_commit(settings: Settings) -> tuple[AfterCommit, ...]:
    """The hooks the configured deployment wants: Slack suggestions, mail acknowledgements."""
    hooks: list[AfterCommit] = []
    if settings.slack_bot_token and settings.agent_channel:
        try:
            from triagebot.agents.suggest import post_suggestion
            hooks.append(post_suggestion)
        except ImportError:  # pragma: no cover
            log.warning("Slack is configured but triagebot.agents.suggest is missing")
    if settings.relay_host:
        try:
            from triagebot.outbound.ack import queue_acknowledgement
            hooks.append(queue_acknowledgement)
        except ImportError:  # pragma: no cover
            log.warning("a relay is configured but triagebot.outbound.ack is missing")
    return tuple(hooks)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def sla_due(t: Triage, start: datetime, rules_dir=None) -> datetime | None:
    """The SLA due time for the case's category and severity, from the business calendar in rules/."""
    if not t.category or not t.severity:
        return None
    try:
        from triagebot.sla import due
    except ImportError:  # pragma: no cover - the SLA module is part of the package
        return None
    return due(t.category, t.severity, start, language=t.language, rules_dir=rules_dir)
