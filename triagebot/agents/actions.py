"""What agents do from Slack: accept, relabel, escalate, merge, send the suggested reply; and the Bolt wiring.

Every action changes the case in one transaction, writes it to the case's trail (CaseEvent, actor
"slack:<user id>"), stores label corrections as Feedback for retraining, and then re-renders the
suggestion message in place (chat.update). Every agent's access to a case (these actions, and /case showing
one) is also recorded in the data-protection audit trail (triagebot/privacy.py), in the same transaction.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triagebot import privacy
from triagebot.agents import blocks as bk
from triagebot.agents import suggest
from triagebot.db.tables import Case, CaseEvent, Feedback, MessageRow, Outbox, ThreadKey, utcnow
from triagebot.model import SEVERITIES
from triagebot.settings import Settings

if TYPE_CHECKING:
    from slack_bolt import App
    from slack_sdk import WebClient

log = logging.getLogger(__name__)

LABELS = ("category", "service", "severity")
ESCALATION = {"low": "medium", "medium": "high", "high": "critical", "critical": "critical"}
_REFERENCE = re.compile(r"^\s*(?:case[-\s]*)?0*(\d{1,12})\s*$", re.IGNORECASE)
_MSGID = re.compile(r"^<[^<>\s]{1,500}>$")
_ADDRESS = re.compile(r"^[^\s<>()\[\]\\,;:\"@\x00-\x1f\x7f]{1,64}@[^\s<>()\[\]\\,;:\"@\x00-\x1f\x7f]{1,253}$")


@dataclass(frozen=True)
class Result:
    """What an action did: ok, a line for the agent, and other cases whose messages must be re-rendered."""

    ok: bool
    message: str
    also: tuple[int, ...] = ()


def actor_of(user_id: str) -> str:
    """The trail's name for a Slack user."""
    return f"{suggest.AGENT_ACTOR}{user_id}"


def _audit(s: Session, actor: str, action: str, case: Case, **detail: Any) -> None:
    """An agent's access to a case in the audit trail, committed (or rolled back) with the caller's work."""
    privacy.record_access(s, actor, action, case.reference or f"case {case.id}", {"via": "slack", **detail})


def _feedback(s: Session, case: Case, field: str, old: str | None, new: str, actor: str) -> None:
    """A Feedback row for one label of the case's first message (the message the bot labelled)."""
    msg = suggest.first_message(s, case.id)
    if msg is None:
        return  # an outage parent has no message of its own: nothing to learn from
    s.add(Feedback(message_id=msg.id, case_id=case.id, actor=actor, field=field, old_value=old, new_value=new,
                   channel=msg.source, language=msg.language, subject=msg.subject,
                   text=msg.edited_text or msg.text, created_at=utcnow()))


def _resla(case: Case) -> None:
    """Recompute the SLA due time after category or severity changed (when the SLA module is there)."""
    if not case.category or not case.severity:
        return
    try:
        from triagebot.sla import due
    except ImportError:
        return
    case.sla_due = due(case.category, case.severity, case.created_at)


def relabel(sessions: sessionmaker[Session], case_id: int, field: str, value: str, user: str) -> Result:
    """An agent sets category, service or severity."""
    if field not in LABELS or value not in bk.LABEL_VALUES[field]:
        return Result(False, f"{field}={value} is not a label of the taxonomy")
    actor = actor_of(user)
    with sessions() as s, s.begin():
        case = s.get(Case, case_id)
        if case is None:
            return Result(False, f"case {case_id} does not exist")
        old = getattr(case, field)
        setattr(case, field, value)
        case.updated_at = utcnow()
        if field in ("category", "severity"):
            _resla(case)
        s.add(CaseEvent(case_id=case.id, actor=actor, kind="relabelled",
                        detail={"field": field, "old": old, "new": value}))
        _audit(s, actor, "relabel", case, field=field, old=old, new=value)
        _feedback(s, case, field, old, value, actor)
        return Result(True, f"{case.reference}: {field} {old} → {value}")


def accept(sessions: sessionmaker[Session], case_id: int, user: str) -> Result:
    """An agent confirms the labels: each becomes feedback with the same old and new value."""
    actor = actor_of(user)
    with sessions() as s, s.begin():
        case = s.get(Case, case_id)
        if case is None:
            return Result(False, f"case {case_id} does not exist")
        labels = {f: getattr(case, f) for f in LABELS}
        s.add(CaseEvent(case_id=case.id, actor=actor, kind="accepted", detail=labels))
        _audit(s, actor, "accept", case)
        for f, v in labels.items():
            if v is not None:
                _feedback(s, case, f, v, v, actor)
        return Result(True, f"{case.reference}: accepted")


def escalate(sessions: sessionmaker[Session], case_id: int, user: str) -> Result:
    """An agent raises the severity one step (the bot underrated it): a severity correction."""
    actor = actor_of(user)
    with sessions() as s, s.begin():
        case = s.get(Case, case_id)
        if case is None:
            return Result(False, f"case {case_id} does not exist")
        old = case.severity
        new = ESCALATION.get(old or "", SEVERITIES[1])
        case.severity = new
        case.status = "open" if case.status in ("resolved", "closed") else case.status
        case.updated_at = utcnow()
        _resla(case)
        s.add(CaseEvent(case_id=case.id, actor=actor, kind="escalated", detail={"old": old, "new": new}))
        _audit(s, actor, "escalate", case, old=old, new=new)
        _feedback(s, case, "severity", old, new, actor)
        return Result(True, f"{case.reference}: escalated {old} → {new}")


def find_case(s: Session, reference: str) -> Case | None:
    """A case by its reference (CASE-000123, case 123 or 123)."""
    m = _REFERENCE.match(reference or "")
    if not m:
        return None
    return s.scalars(select(Case).where(Case.reference == f"CASE-{int(m.group(1)):06d}")).first()


def merge(sessions: sessionmaker[Session], case_id: int, target_ref: str, user: str) -> Result:
    """Merge a case into another: it closes, and its thread keys lead later messages to the target."""
    actor = actor_of(user)
    with sessions() as s, s.begin():
        case = s.get(Case, case_id)
        if case is None:
            return Result(False, f"case {case_id} does not exist")
        target = find_case(s, target_ref)
        if target is None:
            return Result(False, f"no case {target_ref.strip()[:40]!r}")
        if target.id == case.id:
            return Result(False, "a case cannot be merged into itself")
        merged = s.scalars(select(CaseEvent).where(CaseEvent.case_id == target.id, CaseEvent.kind == "merged")).first()
        if merged is not None:
            return Result(False, f"{target.reference} was itself merged into {merged.detail.get('into')}")
        for key in s.scalars(select(ThreadKey).where(ThreadKey.case_id == case.id)):
            key.case_id = target.id
        before = case.status
        case.status = "closed"
        case.updated_at = target.updated_at = utcnow()
        s.add(CaseEvent(case_id=case.id, actor=actor, kind="merged",
                        detail={"into": target.reference, "into_id": target.id, "status_before": before}))
        s.add(CaseEvent(case_id=target.id, actor=actor, kind="merged_in",
                        detail={"from": case.reference, "from_id": case.id}))
        _audit(s, actor, "merge", case, into=target.reference)
        return Result(True, f"{case.reference} merged into {target.reference}", also=(target.id,))


def _reply_mail(settings: Settings, case: Case, last: MessageRow, to: str, text: str) -> EmailMessage:
    """The suggested reply as a mail answering the customer's last message (header values on one line)."""
    from triagebot.outbound.ack import one_line
    m = EmailMessage(policy=SMTP)
    m["From"] = settings.support_address
    m["To"] = to
    m["Subject"] = one_line(f"Re: [{case.reference}] {case.subject or ''}", 250)
    m["Date"] = format_datetime(utcnow())
    m["Message-ID"] = make_msgid(idstring=f"reply.{(case.reference or '').lower()}",
                                 domain=settings.support_address.rpartition("@")[2] or "triagebot.invalid")
    if last.message_id and _MSGID.match(last.message_id):
        m["In-Reply-To"] = last.message_id
        m["References"] = last.message_id
    m.set_content(text, cte="quoted-printable")   # 7-bit safe through any relay
    return m


def send_reply(settings: Settings, sessions: sessionmaker[Session], client: "WebClient", case_id: int,
               user: str) -> Result:
    """Send the suggested reply: in the customer's Slack thread, or as mail through the outbox.

    Mail is queued in the outbox only when a relay is configured (TRIAGEBOT_RELAY_HOST; the outbound
    sender, triagebot/outbound/relay.py, delivers it); otherwise the reply is recorded on the case for the
    agent to send by hand.
    """
    actor = actor_of(user)
    with sessions() as s:
        case = s.get(Case, case_id)
        if case is None:
            return Result(False, f"case {case_id} does not exist")
        view = suggest.load_view(s, settings, case_id)
        if not view.reply:
            return Result(False, f"{case.reference}: no suggested reply")
        if view.reply_sent:
            return Result(False, f"{case.reference}: the suggested reply was already sent")
        last = s.scalars(select(MessageRow).where(MessageRow.case_id == case.id).order_by(MessageRow.id.desc())
                         .limit(1)).first()
        slack_target = (case.slack_channel, case.slack_thread_ts) if view.source == "slack" else None
    if slack_target and slack_target[0]:
        resp = client.chat_postMessage(channel=slack_target[0], thread_ts=slack_target[1], text=bk.escape(view.reply),
                                       unfurl_links=False, unfurl_media=False)
        with sessions() as s, s.begin():
            s.add(CaseEvent(case_id=case_id, actor=actor, kind="reply_sent",
                            detail={"via": "slack", "channel": slack_target[0], "ts": resp.get("ts"),
                                    "answer": view.reply_name, "language": view.language, "text": view.reply}))
            _audit(s, actor, "send_reply", s.get(Case, case_id), reply_via="slack")
        return Result(True, f"{view.reference}: reply sent in the customer's thread")
    with sessions() as s, s.begin():
        case = s.get(Case, case_id)
        to = last.sender if last is not None else None
        if settings.relay_host and to and _ADDRESS.match(to):
            mail = _reply_mail(settings, case, last, to, view.reply)
            s.add(Outbox(case_id=case_id, kind="reply", recipient=to, message_id=mail["Message-ID"],
                         raw=mail.as_bytes(), dedupe_key=f"reply:{case_id}:{mail['Message-ID']}",
                         state="queued", attempts=0, not_before=utcnow(), created_at=utcnow()))
            # the customer's answer to our reply threads into this case by its headers
            s.add(ThreadKey(key=f"msgid:{mail['Message-ID'].strip().lower()}", case_id=case_id))
            s.add(CaseEvent(case_id=case_id, actor=actor, kind="reply_queued",
                            detail={"via": "email", "to": to, "message_id": mail["Message-ID"],
                                    "answer": view.reply_name, "text": view.reply}))
            _audit(s, actor, "send_reply", case, reply_via="email")
            return Result(True, f"{view.reference}: reply queued by mail")
        s.add(CaseEvent(case_id=case_id, actor=actor, kind="reply_recorded",
                        detail={"via": "email", "to": to, "answer": view.reply_name, "text": view.reply,
                                "why": "no mail relay configured: send it from the support mailbox"}))
        _audit(s, actor, "send_reply", case, reply_via="recorded")
        return Result(True, f"{view.reference}: no mail relay configured; the reply is recorded on the case")


def apply_message_change(s: Session, row: MessageRow, kind: str, text: str | None, user: str | None,
                         event_ts: str | None) -> bool:
    """Record a customer's edit or deletion on a stored message (and its case's trail); False when nothing changed."""
    actor = actor_of(user) if user else "slack"
    if kind == "edited":
        if text is None or text == (row.edited_text or row.text):
            return False
        old = row.edited_text or row.text
        row.edited_text = text
        detail = {"message": row.id, "ts": row.slack_ts, "event_ts": event_ts, "old": old[:4000], "new": text[:4000]}
    elif kind == "deleted":
        if row.deleted:
            return False
        row.deleted = True
        detail = {"message": row.id, "ts": row.slack_ts, "event_ts": event_ts}
    else:
        raise ValueError(f"unknown change {kind!r}")
    if row.case_id is not None:
        s.add(CaseEvent(case_id=row.case_id, actor=actor, kind=f"message_{kind}", detail=detail))
    return True


# -- Bolt wiring ------------------------------------------------------------------------------------------

def _case_id(action: dict) -> int | None:
    """Buttons carry the case id as their value; selects in their block id (tb_labels:<case id>)."""
    raw = action.get("value") if action.get("type") == "button" else str(action.get("block_id", "")).rpartition(":")[2]
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _where(body: dict) -> tuple[str | None, str | None]:
    """The suggestion message an action came from."""
    channel = (body.get("channel") or body.get("container") or {}).get("id") or (body.get("container") or {}).get(
        "channel_id")
    ts = (body.get("message") or {}).get("ts") or (body.get("container") or {}).get("message_ts")
    return channel, ts


def register(app: "App", settings: Settings, sessions: sessionmaker[Session],
             pipeline: Callable[[], Any]) -> None:
    """Attach the action, modal and slash-command listeners to a Bolt app."""

    def after(result: Result, body: dict, client: "WebClient", respond: Callable | None, case_id: int) -> None:
        channel, ts = _where(body)
        if result.ok:
            suggest.refresh(settings, sessions, client, case_id, channel, ts)
            for other in result.also:
                suggest.refresh(settings, sessions, client, other)
        elif respond is not None:
            respond(text=bk.escape(result.message), response_type="ephemeral", replace_original=False)
        log.info("slack action by %s: %s", body.get("user", {}).get("id"), result.message)

    def button(operation: Callable[[int, str], Result]) -> Callable:
        def handler(ack: Callable, body: dict, action: dict, client: "WebClient", respond: Callable) -> None:
            ack()
            case_id = _case_id(action)
            if case_id is None:
                return
            after(operation(case_id, body["user"]["id"]), body, client, respond, case_id)
        return handler

    app.action(bk.ACCEPT)(button(lambda cid, user: accept(sessions, cid, user)))
    app.action(bk.ESCALATE)(button(lambda cid, user: escalate(sessions, cid, user)))

    def on_send_reply(ack: Callable, body: dict, action: dict, client: "WebClient", respond: Callable) -> None:
        ack()
        case_id = _case_id(action)
        if case_id is not None:
            after(send_reply(settings, sessions, client, case_id, body["user"]["id"]), body, client, respond, case_id)

    app.action(bk.SEND_REPLY)(on_send_reply)

    def on_select(ack: Callable, body: dict, action: dict, client: "WebClient", respond: Callable) -> None:
        ack()
        case_id = _case_id(action)
        value = (action.get("selected_option") or {}).get("value")
        field = bk.LABEL_ACTIONS.get(action.get("action_id", ""))
        if case_id is None or field is None or value is None:
            return
        after(relabel(sessions, case_id, field, value, body["user"]["id"]), body, client, respond, case_id)

    for action_id in bk.LABEL_ACTIONS:
        app.action(action_id)(on_select)

    def on_merge(ack: Callable, body: dict, action: dict, client: "WebClient") -> None:
        ack()
        case_id = _case_id(action)
        if case_id is None:
            return
        with sessions() as s:
            case = s.get(Case, case_id)
            reference = case.reference if case is not None else str(case_id)
        channel, ts = _where(body)
        client.views_open(trigger_id=body["trigger_id"], view=bk.merge_modal(case_id, reference or "", channel, ts))

    app.action(bk.MERGE)(on_merge)

    def on_merge_submit(ack: Callable, body: dict, view: dict, client: "WebClient") -> None:
        meta = json.loads(view.get("private_metadata") or "{}")
        values = view.get("state", {}).get("values", {})
        target = (values.get(bk.MERGE_INPUT_BLOCK, {}).get(bk.MERGE_INPUT_ACTION) or {}).get("value") or ""
        result = merge(sessions, int(meta["case_id"]), target, body["user"]["id"])
        if not result.ok:
            ack(response_action="errors", errors={bk.MERGE_INPUT_BLOCK: result.message})
            return
        ack()
        suggest.refresh(settings, sessions, client, int(meta["case_id"]), meta.get("channel"), meta.get("ts"))
        for other in result.also:
            suggest.refresh(settings, sessions, client, other)

    app.view(bk.MERGE_MODAL)(on_merge_submit)

    def on_case(ack: Callable, command: dict) -> None:
        text = (command.get("text") or "").strip()
        with sessions() as s, s.begin():
            case = find_case(s, text)
            if case is None:
                ack(response_type="ephemeral", text=f"No case {bk.inline(text or '(empty)')}. Try /case CASE-000123.")
                return
            # audited in the transaction that reads the case: nobody sees it unless the audit row commits
            privacy.record_access(s, actor_of(command.get("user_id") or "?"), "view_case", case.reference,
                                  {"via": "/case"})
            view = suggest.load_view(s, settings, case.id)
        ack(response_type="ephemeral", text=bk.fallback_text(view), blocks=bk.case_summary_blocks(view))

    app.command("/case")(on_case)

    def triage_ack(ack: Callable, command: dict) -> None:
        if not (command.get("text") or "").strip():
            ack(response_type="ephemeral", text="Usage: /triage <a customer's message>")
            return
        ack()

    def triage_run(command: dict, respond: Callable) -> None:
        # lazy: classification may load models; Slack wants the acknowledgement within 3 seconds
        from triagebot.model import Message
        from triagebot.normalize.slack import mrkdwn_to_text
        from triagebot.pipeline import triage_record
        text = mrkdwn_to_text(command.get("text") or "").strip()
        if not text:
            return
        message = Message(source="slack", text=text, channel=command.get("channel_id"))
        t = pipeline().run(message)
        record = triage_record(message, t)
        respond(response_type="ephemeral", text=bk.escape(f"{t.category}/{t.service}/{t.severity}"),
                blocks=bk.triage_blocks(record, record["trail"]))

    app.command("/triage")(ack=triage_ack, lazy=[triage_run])
