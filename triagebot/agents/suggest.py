"""Suggestions for agents: after a message is stored, post (or update in place) a Block Kit message about its case.

Runs as the worker's after-commit hook `post_suggestion(settings, sessions, outcome)`: a new case gets a
message in the agents' channel of its route (rules/routing.yaml, else TRIAGEBOT_AGENT_CHANNEL); a threaded
message that raised severity or blast radius (or reopened the case) updates that message in place and adds
a note in its thread. The posted message's ts is kept on Case.agent_post_ts; its channel in the case's
"agent_posted" event.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triagebot.agents import blocks as bk
from triagebot.db.tables import Case, CaseEvent, MessageRow, State
from triagebot.model import CATEGORIES, SERVICES, SEVERITIES
from triagebot.rules_loader import RuleError, load_yaml, load_yaml_items, rules_path
from triagebot.settings import Settings

if TYPE_CHECKING:
    from slack_sdk import WebClient

    from triagebot.ingest import Outcome

log = logging.getLogger(__name__)

ROUTING_FILE = "routing.yaml"
ROUTE_KEYS = {"customer_tier": None, "service": SERVICES, "category": CATEGORIES, "severity": SEVERITIES}
SIGNIFICANT = ("severity", "blast", "status")     # changes of a threaded message that agents must see
API_TIMEOUT = 10                                   # seconds; a slow Slack must not stall the worker for long
PENDING_PREFIX = "slack-pending:"                  # State keys of edits/deletions that came before their message
AGENT_ACTOR = "slack:"
_CASE_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


# -- routing -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """Cases matching all conditions go to `channel`."""

    channel: str
    conditions: tuple[tuple[str, tuple[str, ...]], ...]
    line: int

    def matches(self, case: Case) -> bool:
        return all(getattr(case, key) in values for key, values in self.conditions)


@dataclass(frozen=True)
class Routing:
    """rules/routing.yaml: routes to agents' channels and which channels are never customers."""

    routes: tuple[Route, ...] = ()
    internal_channels: frozenset[str] = frozenset()
    ignore_own_team_members: bool = True

    def agent_channels(self, settings: Settings) -> frozenset[str]:
        """Every channel suggestions go to: messages there are agents talking, not customers."""
        chans = {r.channel for r in self.routes}
        if settings.agent_channel:
            chans.add(settings.agent_channel)
        return frozenset(chans)


def load_routing(rules_dir: Path | None = None) -> Routing:
    """Load and validate rules/routing.yaml (absent: no routes); RuleError names file and line."""
    path = rules_path(ROUTING_FILE, rules_dir)
    if not path.exists():
        return Routing()
    return _routing(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _routing(path: Path, _mtime: int) -> Routing:
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise RuleError(path, 1, "expected a mapping with 'routes'")
    unknown = set(data) - {"routes", "internal_channels", "ignore_own_team_members"}
    if unknown:
        raise RuleError(path, 1, f"unknown key(s) {', '.join(sorted(unknown))}")
    routes = []
    for item in (load_yaml_items(path, "routes") if "routes" in data else []):
        v = item.value
        if not isinstance(v, dict) or not isinstance(v.get("channel"), str) or not v["channel"].strip():
            raise RuleError(path, item.line, "a route needs a 'channel' (a channel ID)")
        conds = []
        for key, value in v.items():
            if key == "channel":
                continue
            if key not in ROUTE_KEYS:
                raise RuleError(path, item.line, f"unknown condition {key!r}; use {', '.join(ROUTE_KEYS)}")
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(x, str) for x in values):
                raise RuleError(path, item.line, f"{key}: expected a list of values")
            allowed = ROUTE_KEYS[key]
            bad = [x for x in values if allowed is not None and x not in allowed]
            if bad:
                raise RuleError(path, item.line, f"{key}: {', '.join(bad)} not in TAXONOMY.md")
            conds.append((key, tuple(values)))
        routes.append(Route(v["channel"].strip(), tuple(conds), item.line))
    internal = data.get("internal_channels") or []
    if not isinstance(internal, list) or not all(isinstance(x, str) for x in internal):
        raise RuleError(path, 1, "internal_channels: expected a list of channel IDs")
    own = data.get("ignore_own_team_members", True)
    if not isinstance(own, bool):
        raise RuleError(path, 1, "ignore_own_team_members: expected true or false")
    return Routing(tuple(routes), frozenset(internal), own)


def route_channel(settings: Settings, case: Case) -> str | None:
    """The agents' channel for a case: the first matching route, else TRIAGEBOT_AGENT_CHANNEL."""
    for route in load_routing(settings.rules_dir).routes:
        if route.matches(case):
            return route.channel
    return settings.agent_channel


# -- Slack Web API ---------------------------------------------------------------------------------------

def web_client(settings: Settings) -> "WebClient":
    """A Web API client with the bot token, at TRIAGEBOT_SLACK_API_URL when set (tests run a fake there)."""
    from slack_sdk import WebClient
    from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
    kwargs: dict = {"token": settings.slack_bot_token, "timeout": API_TIMEOUT}
    if settings.slack_api_url:
        kwargs["base_url"] = settings.slack_api_url.rstrip("/") + "/"
    client = WebClient(**kwargs)
    # an outage storm means many posts and updates at once: wait out Slack's 429s instead of losing them
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
    return client


# -- reading a case for display --------------------------------------------------------------------------

def first_message(s: Session, case_id: int) -> MessageRow | None:
    """The message that opened a case (its labels are the bot's suggestion)."""
    return s.scalars(select(MessageRow).where(MessageRow.case_id == case_id).order_by(MessageRow.id).limit(1)).first()


def _agent_id(actor: str) -> str | None:
    return actor[len(AGENT_ACTOR):] if actor.startswith(AGENT_ACTOR) else None


def _history(events: list[CaseEvent]) -> tuple[tuple[str, ...], dict[str, str], str | None, bool]:
    """Agent actions as short mrkdwn lines; who last set each label; the case merged into; reply sent."""
    lines: list[str] = []
    set_by: dict[str, str] = {}
    merged_into = None
    reply_sent = False
    for ev in events:
        who = _agent_id(ev.actor)
        d = ev.detail or {}
        if ev.kind == "merged":
            merged_into = d.get("into")
        if ev.kind in ("reply_sent", "reply_queued", "reply_recorded"):
            reply_sent = True
        if who is None:
            continue
        by = bk.agent(who)
        at = ev.at.astimezone(timezone.utc).strftime("%H:%M") if ev.at and ev.at.tzinfo else ""
        if ev.kind == "relabelled":
            set_by[d.get("field", "")] = who
            lines.append(f"{bk.escape(d.get('field'))} {bk.escape(str(d.get('old')))} → "
                         f"{bk.escape(str(d.get('new')))} by {by}")
        elif ev.kind == "escalated":
            set_by["severity"] = who
            lines.append(f"escalated {bk.escape(str(d.get('old')))} → {bk.escape(str(d.get('new')))} by {by}")
        elif ev.kind == "accepted":
            lines.append(f"accepted by {by}")
        elif ev.kind == "merged":
            lines.append(f"merged into {bk.escape(str(d.get('into')))} by {by}")
        elif ev.kind == "merged_in":
            lines.append(f"{bk.escape(str(d.get('from')))} merged in by {by}")
        elif ev.kind in ("reply_sent", "reply_queued", "reply_recorded"):
            how = {"reply_sent": "sent in Slack", "reply_queued": "queued by mail",
                   "reply_recorded": "recorded (send it by mail)"}[ev.kind]
            lines.append(f"reply {how} by {by}")
        else:
            continue
        if at:
            lines[-1] += f" ({at} UTC)"
    return tuple(lines), set_by, merged_into, reply_sent


def load_view(s: Session, settings: Settings, case_id: int) -> bk.CaseView:
    """Everything the suggestion shows about a case, from the database."""
    case = s.get(Case, case_id)
    if case is None:
        raise LookupError(f"no case {case_id}")
    first = first_message(s, case.id)
    events = list(s.scalars(select(CaseEvent).where(CaseEvent.case_id == case.id).order_by(CaseEvent.id)))
    history, set_by, merged_into, reply_sent = _history(events)
    parent = s.get(Case, case.parent_id) if case.parent_id else None
    similar_q = None
    if parent is not None:
        similar_q = select(Case).where(Case.parent_id == parent.id, Case.id != case.id)
    elif case.kind == "incident":
        similar_q = select(Case).where(Case.parent_id == case.id)
    similar: tuple[bk.Similar, ...] = ()
    if similar_q is not None:
        similar = tuple(bk.Similar(c.reference or "", c.customer, c.subject)
                        for c in s.scalars(similar_q.where(Case.status == "open").order_by(Case.id).limit(10)))
    text = (first.edited_text or first.text) if first is not None else (case.subject or "")
    deleted = bool(first is not None and first.deleted)
    reply = reply_name = None
    if first is not None and not merged_into:
        try:
            from triagebot.agents.replies import suggest_reply
            sug = suggest_reply(case.language, case.category, case.service, case.subject, text,
                                case.reference or "", settings.rules_dir)
            reply, reply_name = sug.text, sug.answer
        except (RuleError, OSError) as e:
            log.error("no suggested reply for %s: %s", case.reference, e)
    return bk.CaseView(
        case_id=case.id, reference=case.reference or f"#{case.id}", status=case.status,
        source=first.source if first is not None else "email", customer=case.customer,
        customer_tier=case.customer_tier, sender=first.sender if first is not None else None,
        sender_name=first.sender_name if first is not None else None, slack_channel=case.slack_channel,
        subject=case.subject if (first is None or first.source != "slack") else None,
        text="[deleted by the customer]" if deleted else text,
        edited=bool(first is not None and first.edited_text), deleted=deleted, language=case.language,
        category=case.category, service=case.service, severity=case.severity,
        confidence=dict(first.confidence or {}) if first is not None else {}, set_by_agent=set_by,
        blast_estimate=case.blast_estimate, blast_tier=case.blast_tier or "none",
        identifiers=dict(case.identifiers or {}), sla_due=case.sla_due,
        parent=parent.reference if parent is not None else None,
        parent_customers=parent.customer if parent is not None else None, similar=similar,
        reply=reply, reply_name=reply_name, history=history, merged_into=merged_into, reply_sent=reply_sent)


def post_location(s: Session, case: Case) -> tuple[str, str] | None:
    """(channel, ts) of a case's suggestion message, when it has one."""
    if not case.agent_post_ts:
        return None
    ev = s.scalars(select(CaseEvent).where(CaseEvent.case_id == case.id, CaseEvent.kind == "agent_posted")
                   .order_by(CaseEvent.id.desc())).first()
    if ev is None or not (ev.detail or {}).get("channel"):
        return None
    return ev.detail["channel"], case.agent_post_ts


# -- posting ---------------------------------------------------------------------------------------------

def publish(settings: Settings, sessions: sessionmaker[Session], client: "WebClient", case_id: int,
            update: tuple[dict, str] | None = None) -> str | None:
    """Post a case's suggestion, or update it in place when posted before; returns the message ts.

    `update` = (changes, text): also add a note with the changes and the new text in the message's thread.
    """
    with sessions() as s:
        case = s.get(Case, case_id)
        if case is None:
            return None
        view = load_view(s, settings, case_id)
        where = post_location(s, case)
        channel = route_channel(settings, case)
    blocks, text = bk.suggestion_blocks(view), bk.fallback_text(view)
    if where is not None:
        channel, ts = where
        client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
        if update is not None:
            changes, new_text = update
            client.chat_postMessage(channel=channel, thread_ts=ts, text=bk.fallback_text(view),
                                    blocks=bk.update_blocks(view, changes, new_text), unfurl_links=False,
                                    unfurl_media=False)
        return ts
    if not channel:
        log.warning("no agents' channel for %s (set TRIAGEBOT_AGENT_CHANNEL)", view.reference)
        return None
    resp = client.chat_postMessage(channel=channel, text=text, blocks=blocks, unfurl_links=False, unfurl_media=False)
    ts, posted_in = resp["ts"], resp.get("channel") or channel   # Slack answers with the channel's ID
    with sessions() as s, s.begin():
        case = s.get(Case, case_id)
        case.agent_post_ts = ts
        s.add(CaseEvent(case_id=case_id, actor="bot", kind="agent_posted", detail={"channel": posted_in, "ts": ts}))
    return ts


def _case_lock(case_id: int) -> threading.Lock:
    with _LOCKS_GUARD:
        return _CASE_LOCKS.setdefault(case_id, threading.Lock())


def refresh(settings: Settings, sessions: sessionmaker[Session], client: "WebClient", case_id: int,
            channel: str | None = None, ts: str | None = None) -> None:
    """Re-render a case's suggestion in place (after an agent's action): at (channel, ts) or where it was posted."""
    # one re-render of a case at a time, each reading the database inside the lock: concurrent listeners
    # cannot leave an older state on the message than the newest they saw committed
    with _case_lock(case_id):
        _refresh(settings, sessions, client, case_id, channel, ts)


def _refresh(settings: Settings, sessions: sessionmaker[Session], client: "WebClient", case_id: int,
             channel: str | None, ts: str | None) -> None:
    with sessions() as s:
        case = s.get(Case, case_id)
        if case is None:
            return
        view = load_view(s, settings, case_id)
        where = (channel, ts) if channel and ts else post_location(s, case)
    if where is None:
        return
    client.chat_update(channel=where[0], ts=where[1], text=bk.fallback_text(view), blocks=bk.suggestion_blocks(view))


def _threaded_changes(s: Session, case_id: int, message_id: str | None) -> dict:
    q = (select(CaseEvent).where(CaseEvent.case_id == case_id, CaseEvent.kind == "threaded")
         .order_by(CaseEvent.id.desc()).limit(20))
    for ev in s.scalars(q):
        if message_id is None or (ev.detail or {}).get("message_id") == message_id:
            return dict((ev.detail or {}).get("changes") or {})
    return {}


def post_suggestion(settings: Settings, sessions: sessionmaker[Session], outcome: "Outcome") -> None:
    """After-commit hook: the suggestion for a new case, an in-place update and thread note for a significant one."""
    if outcome.message is not None and outcome.message.source == "slack" and outcome.message_row_id:
        apply_pending(sessions, outcome.message.channel, outcome.message.ts)
    if outcome.action not in ("created", "threaded") or outcome.case_id is None:
        return
    client = web_client(settings)
    update = None
    with sessions() as s:
        case = s.get(Case, outcome.case_id)
        if case is None:
            return
        parent_id = case.parent_id
        posted = post_location(s, case) is not None
        if outcome.action == "threaded":
            changes = _threaded_changes(s, case.id, outcome.message.message_id if outcome.message else None)
            significant = {k: v for k, v in changes.items() if k in SIGNIFICANT}
            if not significant and posted:
                return
            update = (significant, outcome.message.text if outcome.message else "")
    publish(settings, sessions, client, outcome.case_id, update if posted else None)
    if parent_id is not None and outcome.action == "created":
        # the outage this case joined: its message shows every customer's case and the summed blast radius
        publish(settings, sessions, client, parent_id)


# -- edits and deletions that arrived before their message was stored ----------------------------------------

def pending_key(channel: str, ts: str) -> str:
    return f"{PENDING_PREFIX}{channel}:{ts}"


def add_pending(s: Session, channel: str, ts: str, change: dict) -> None:
    """Remember an edit/deletion of a message still in the intake queue, to apply once it is stored."""
    key = pending_key(channel, ts)
    row = s.get(State, key)
    changes = json.loads(row.value) if row is not None else []
    changes.append(change)
    if row is None:
        s.add(State(key=key, value=json.dumps(changes)))
    else:
        row.value = json.dumps(changes)


def apply_pending(sessions: sessionmaker[Session], channel: str | None, ts: str | None) -> int:
    """Apply the remembered edits/deletions of a just-stored Slack message; returns how many."""
    if not channel or not ts:
        return 0
    from triagebot.agents.actions import apply_message_change
    with sessions() as s, s.begin():
        row = s.get(State, pending_key(channel, ts))
        if row is None:
            return 0
        msg = s.scalars(select(MessageRow).where(MessageRow.slack_channel == channel, MessageRow.slack_ts == ts)
                        .order_by(MessageRow.id)).first()
        if msg is None:
            return 0
        changes = json.loads(row.value)
        for ch in changes:
            apply_message_change(s, msg, ch["kind"], ch.get("text"), ch.get("user"), ch.get("event_ts"))
        s.delete(row)
        return len(changes)

