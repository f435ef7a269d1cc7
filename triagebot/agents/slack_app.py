"""The Slack app (Bolt): customer messages in, agents' actions and slash commands; over HTTP (WSGI) or Socket Mode.

The message listener only takes in and stores, like the SMTP listener: a customer's message event is
committed to the intake table (channel "slack", the whole envelope as JSON) before Slack gets its 200,
under the delivery key slack:<team>:<channel>:<ts>, so Slack's retries (X-Slack-Retry-Num) and a second
event for the same message are no-ops. The worker turns it into a case like mail. Edits and deletions
of a stored message are recorded on that message (MessageRow.edited_text / deleted and a CaseEvent).
Ignored: bot messages, our own posts, the agents' channels, and members of our own workspace.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triagebot.agents import actions, suggest
from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Case, Intake, MessageRow
from triagebot.settings import Settings

if TYPE_CHECKING:
    from slack_bolt import App
    from slack_sdk import WebClient

log = logging.getLogger(__name__)

PATHS = ("/slack/events", "/slack/interactive", "/slack/commands")
# message subtypes that are a person's new message; every other subtype is a channel event, not a message
NEW_MESSAGE_SUBTYPES = (None, "file_share", "thread_broadcast", "me_message")
MAX_BODY = 1024 * 1024          # Slack's payloads are a few kB; refuse anything far larger before reading it
LOCALE_TTL = 3600.0             # seconds a user's locale is remembered


def delivery_key(team: str | None, channel: str, ts: str) -> str:
    """The intake key of one Slack message: the same for every delivery of it."""
    return f"slack:{team or ''}:{channel}:{ts}"


class LocaleCache:
    """Users' Slack locales (users.info include_locale), remembered for an hour; None when unknown."""

    def __init__(self, client: "WebClient | None") -> None:
        self.client = client
        self._seen: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, user: str | None) -> str | None:
        if not user or self.client is None or not self.client.token:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(user)
            if hit and now - hit[0] < LOCALE_TTL:
                return hit[1]
        try:
            resp = self.client.users_info(user=user, include_locale=True)
            locale = (resp.get("user") or {}).get("locale")
        except Exception as e:  # noqa: BLE001 - the locale is a hint; intake must not depend on it
            log.info("users.info for a Slack user failed: %s", type(e).__name__)
            return None
        with self._lock:
            self._seen[user] = (now, locale)
        return locale


def _is_bot(ev: dict, bot_user_id: str | None, bot_id: str | None) -> bool:
    return bool(ev.get("bot_id") or ev.get("subtype") == "bot_message" or ev.get("app_id") and not ev.get("user")
                or (bot_user_id and ev.get("user") == bot_user_id) or (bot_id and ev.get("bot_id") == bot_id))


def take_in(settings: Settings, sessions: sessionmaker[Session], body: dict, *, bot_user_id: str | None = None,
            bot_id: str | None = None, locale_of: Callable[[str | None], str | None] | None = None) -> str:
    """Store one message event (or record an edit/deletion); returns what was done, for the log and tests."""
    routing = suggest.load_routing(settings.rules_dir)
    event = body.get("event") if isinstance(body.get("event"), dict) else None
    if body.get("type") != "event_callback" or event is None or event.get("type") != "message":
        return "ignored: not a message event"
    channel = event.get("channel")
    if not channel:
        return "ignored: no channel"
    if channel in routing.agent_channels(settings) or channel in routing.internal_channels:
        return "ignored: agents' or internal channel"
    team = body.get("team_id")
    subtype = event.get("subtype")
    if subtype == "message_changed":
        inner = event.get("message") if isinstance(event.get("message"), dict) else {}
        if _is_bot(inner, bot_user_id, bot_id):
            return "ignored: bot message"
        from triagebot.normalize.slack import mrkdwn_to_text
        return record_change(sessions, team, channel, str(inner.get("ts") or ""), "edited",
                             mrkdwn_to_text(inner.get("text") or "").strip(), inner.get("user"), event.get("event_ts"))
    if subtype == "message_deleted":
        prev = event.get("previous_message") if isinstance(event.get("previous_message"), dict) else {}
        if _is_bot(prev, bot_user_id, bot_id):
            return "ignored: bot message"
        return record_change(sessions, team, channel, str(event.get("deleted_ts") or prev.get("ts") or ""),
                             "deleted", None, prev.get("user"), event.get("event_ts"))
    if subtype not in NEW_MESSAGE_SUBTYPES:
        return f"ignored: subtype {subtype}"
    if _is_bot(event, bot_user_id, bot_id):
        return "ignored: bot message"
    author_team = event.get("user_team") or event.get("team")
    if routing.ignore_own_team_members and team and author_team == team:
        return "ignored: a member of our own workspace"
    ts = event.get("ts")
    if not ts:
        return "ignored: no ts"
    stored = dict(body)
    if locale_of is not None and not event.get("user_locale"):
        locale = locale_of(event.get("user"))
        if locale:
            stored["event"] = {**event, "user_locale": locale}   # parse_slack reads it as Message.user_locale
    raw = json.dumps(stored, ensure_ascii=False, sort_keys=True).encode("utf-8")
    intake_id = queue.enqueue(sessions, "slack", raw, origin=f"slack:{body.get('event_id') or ''}",
                              delivery_key=delivery_key(team, channel, ts))
    return f"queued {intake_id}" if intake_id is not None else "duplicate delivery"


def record_change(sessions: sessionmaker[Session], team: str | None, channel: str, ts: str, kind: str,
                  text: str | None, user: str | None, event_ts: str | None) -> str:
    """An edit or deletion: on the stored message, or kept for it while it waits in the intake queue."""
    if not ts:
        return "ignored: change without ts"
    with sessions() as s, s.begin():
        row = s.scalars(select(MessageRow).where(MessageRow.slack_channel == channel, MessageRow.slack_ts == ts)
                        .order_by(MessageRow.id)).first()
        if row is not None:
            changed = actions.apply_message_change(s, row, kind, text, user, event_ts)
            return f"{kind} message {row.id}" if changed else f"{kind}: no change"
        if s.scalars(select(Intake.id).where(Intake.delivery_key == delivery_key(team, channel, ts))).first() is None:
            return f"ignored: {kind} of a message we never received"
        suggest.add_pending(s, channel, ts, {"kind": kind, "text": text, "user": user, "event_ts": event_ts})
        return f"{kind}: pending until the message is stored"


def _tokenless_authorize(enterprise_id: str | None, team_id: str | None, user_id: str | None) -> Any:
    """Without a bot token the app still takes messages in (the demo); it just cannot post."""
    from slack_bolt.authorization import AuthorizeResult
    return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id, user_id=user_id)


def build_app(settings: Settings, sessions: sessionmaker[Session]) -> "App":
    """The Bolt app: message intake, agents' actions, the merge modal, /triage and /case."""
    from slack_bolt import App
    suggest.load_routing(settings.rules_dir)   # a broken routing.yaml stops the start, with file and line
    client = suggest.web_client(settings)
    common: dict[str, Any] = {
        "name": "triagebot", "signing_secret": settings.slack_signing_secret or "", "client": client,
        # Listeners finish before the HTTP answer: a message is committed to the intake table before Slack
        # gets its 200 (as the SMTP listener says 250 only after the commit). Slow work is a lazy listener.
        "process_before_response": True,
    }
    if settings.slack_bot_token:
        # No auth.test at construction: the web process (/healthz, /metrics) must start even when Slack's
        # API is unreachable; Bolt calls auth.test on the first request instead and keeps the answer.
        app = App(token_verification_enabled=False, **common)
    else:
        app = App(authorize=_tokenless_authorize, **common)
    locale_of = LocaleCache(client if settings.slack_bot_token else None)

    def on_message(body: dict, context: Any, request: Any) -> None:
        retry = request.headers.get("x-slack-retry-num", [None])[0] if request is not None else None
        done = take_in(settings, sessions, body, bot_user_id=context.bot_user_id, bot_id=context.bot_id,
                       locale_of=locale_of)
        log.info("slack event %s%s: %s", body.get("event_id"), f" (retry {retry})" if retry else "", done)

    def after_change(body: dict, client: "WebClient") -> None:
        # an edit or deletion of a case's first message changes what its suggestion shows
        event = body.get("event") or {}
        if event.get("subtype") not in ("message_changed", "message_deleted") or not settings.slack_bot_token:
            return
        ts = (event.get("message") or {}).get("ts") or event.get("deleted_ts")
        with sessions() as s:
            row = s.scalars(select(MessageRow).where(MessageRow.slack_channel == event.get("channel"),
                                                     MessageRow.slack_ts == ts)).first()
            case = s.get(Case, row.case_id) if row is not None and row.case_id else None
            first = suggest.first_message(s, case.id) if case is not None else None
        if case is not None and first is not None and first.id == row.id:
            suggest.refresh(settings, sessions, client, case.id)

    app.event("message")(ack=on_message, lazy=[after_change])

    lock = threading.Lock()
    cache: dict[str, Any] = {}

    def pipeline() -> Any:
        with lock:
            if "p" not in cache:
                from triagebot.pipeline import Pipeline
                cache["p"] = Pipeline.default(settings)
            return cache["p"]

    actions.register(app, settings, sessions, pipeline)
    return app


def wsgi_app(settings: Settings) -> Callable[[dict, Callable], Iterable[bytes]]:
    """The Slack endpoints as WSGI for the web process: /slack/events, /slack/interactive, /slack/commands."""
    from slack_bolt.adapter.wsgi import SlackRequestHandler
    _engine, sessions = open_db(settings.database_url)
    app = build_app(settings, sessions)
    handlers = {path: SlackRequestHandler(app, path=path) for path in PATHS}

    def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
        handler = handlers.get(environ.get("PATH_INFO", ""))
        if handler is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            start_response("413 Payload Too Large", [("Content-Type", "text/plain")])
            return [b"too large\n"]
        return handler(environ, start_response)

    return application


def socket_mode(settings: Settings) -> None:
    """Run the same app over Socket Mode (no public URL needed); needs SLACK_APP_TOKEN (xapp-...)."""
    if not settings.slack_app_token:
        raise SystemExit("Socket Mode needs SLACK_APP_TOKEN (an app-level token with connections:write)")
    if not settings.slack_bot_token:
        raise SystemExit("Socket Mode needs SLACK_BOT_TOKEN")
    from slack_bolt.adapter.socket_mode import SocketModeHandler
    _engine, sessions = open_db(settings.database_url)
    app = build_app(settings, sessions)
    log.warning("Slack Socket Mode connecting")
    SocketModeHandler(app, settings.slack_app_token).start()
