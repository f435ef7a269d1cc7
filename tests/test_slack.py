"""Slack: the real Bolt app in the real web process, signed requests, a fake Slack Web API on loopback.

The fake answers like Slack (auth.test, chat.postMessage, chat.update, chat.postEphemeral, views.open,
users.info, response_url posts) and records every call, so tests check exactly what would reach Slack.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from wsgiref.simple_server import make_server

import pytest
from sqlalchemy import select

from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Case, CaseEvent, Feedback, Intake, MessageRow, Outbox, ThreadKey
from triagebot.model import SERVICES, SEVERITIES, Triage
from triagebot.pipeline import Pipeline
from triagebot.settings import Settings
from triagebot.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
TOKEN = "xoxb-0000-test"
OUR_TEAM, CUSTOMER_TEAM = "T0OURS", "T0CUSTOMER"
BOT_USER, BOT_ID = "U0TRIAGEBOT", "B0TRIAGEBOT"
AGENTS = "C0AGENTS"
CUSTOMER_CHANNEL = "C0CUSTOMER"
CUSTOMER, SWEDE, AGENT = "U0CUSTOMER", "U0SVEN", "U0AGENT"
OK, UNAUTHORIZED = 200, 401
WAIT = 30.0                 # seconds to wait for lazy listeners (the first /triage loads the models)


class FakeSlack:
    """A local Slack Web API: answers like Slack and records each call (method, arguments)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.next_ts = 1_700_000_000
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _args(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8") if length else ""
                args: dict = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                if "json" in (self.headers.get("Content-Type") or ""):
                    args.update(json.loads(raw or "{}"))
                elif raw:
                    args.update(urllib.parse.parse_qsl(raw))
                for key in ("blocks", "view"):
                    if isinstance(args.get(key), str):
                        args[key] = json.loads(args[key])
                return args

            def _answer(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                args = self._args()
                if path.startswith("/response/"):
                    fake.record("response_url", args, path)
                    self._send(b"ok", "text/plain")
                    return
                method = path.rsplit("/", 1)[-1]
                self._send(json.dumps(fake.record(method, args, self.headers.get("Authorization"))).encode(),
                           "application/json; charset=utf-8")

            def _send(self, body: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def record(self, method: str, args: dict, auth: str | None) -> dict:
        with self.lock:
            self.calls.append({"method": method, "args": args, "auth": auth})
            self.next_ts += 1
            ts = f"{self.next_ts}.000100"
        if method == "auth.test":
            return {"ok": True, "url": "https://ours.slack.com/", "team": "Ours", "user": "triagebot",
                    "team_id": OUR_TEAM, "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False}
        if method == "chat.postMessage":
            return {"ok": True, "channel": args.get("channel"), "ts": ts,
                    "message": {"type": "message", "text": args.get("text"), "ts": ts, "bot_id": BOT_ID}}
        if method == "chat.update":
            return {"ok": True, "channel": args.get("channel"), "ts": args.get("ts"), "text": args.get("text")}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": ts}
        if method == "views.open":
            return {"ok": True, "view": {"id": "V0MODAL", **(args.get("view") or {})}}
        if method == "users.info":
            locale = "sv-SE" if args.get("user") == SWEDE else "en-US"
            return {"ok": True, "user": {"id": args.get("user"), "name": "someone", "locale": locale}}
        return {"ok": False, "error": "unknown_method"}

    def of(self, method: str) -> list[dict]:
        with self.lock:
            return [c["args"] for c in self.calls if c["method"] == method]

    def wait_for(self, method: str, n: int = 1) -> list[dict]:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            got = self.of(method)
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"fake Slack saw {len(self.of(method))} {method} calls, expected {n}")

    def wait_until(self, method: str, predicate) -> dict:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            for args in self.of(method):
                if predicate(args):
                    return args
            time.sleep(0.05)
        raise AssertionError(f"no {method} call as expected among {len(self.of(method))}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Env:
    """The web process with the Slack app, its database, the fake Slack and the worker."""

    def __init__(self, settings: Settings, fake: FakeSlack, base: str) -> None:
        self.settings, self.fake, self.base = settings, fake, base
        _engine, self.sessions = open_db(settings.database_url)
        self.ts = 1_763_000_000

    def new_ts(self) -> str:
        self.ts += 1
        return f"{self.ts}.000200"

    def post(self, path: str, body: bytes, ctype: str, *, secret: str = SECRET, timestamp: int | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sig = "v0=" + hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(self.base + path.lstrip("/"), data=body, method="POST", headers={
            "Content-Type": ctype, "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def event(self, envelope: dict, **kw) -> int:
        return self.post("/slack/events", json.dumps(envelope).encode(), "application/json", **kw)[0]

    def interact(self, payload: dict) -> tuple[int, bytes]:
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        return self.post("/slack/events", body, "application/x-www-form-urlencoded")

    def command(self, name: str, text: str) -> tuple[int, bytes]:
        body = urllib.parse.urlencode({
            "token": "x", "team_id": OUR_TEAM, "team_domain": "ours", "channel_id": AGENTS, "channel_name": "agents",
            "user_id": AGENT, "user_name": "agent", "command": name, "text": text, "api_app_id": "A0APP",
            "response_url": f"{self.fake.base}response/{name.strip('/')}", "trigger_id": "1.2.abc"}).encode()
        return self.post("/slack/commands", body, "application/x-www-form-urlencoded")

    def work(self, pipeline: Pipeline | None = None) -> None:
        worker = Worker(self.settings)
        if pipeline is not None:
            worker.processor.pipeline = pipeline
        worker.run(until_empty=True)

    def case(self, reference: str = "CASE-000001") -> Case:
        with self.sessions() as s:
            return s.scalars(select(Case).where(Case.reference == reference)).one()

    def count(self, table) -> int:
        with self.sessions() as s:
            return len(s.scalars(select(table)).all())

    def agent_payload(self, action: dict, case: Case) -> dict:
        return {"type": "block_actions", "team": {"id": OUR_TEAM, "domain": "ours"},
                "user": {"id": AGENT, "username": "agent", "team_id": OUR_TEAM}, "api_app_id": "A0APP",
                "token": "x", "trigger_id": "1.2.trigger", "channel": {"id": AGENTS, "name": "agents"},
                "container": {"type": "message", "message_ts": case.agent_post_ts, "channel_id": AGENTS},
                "message": {"type": "message", "ts": case.agent_post_ts, "bot_id": BOT_ID},
                "response_url": f"{self.fake.base}response/action", "actions": [action]}


def envelope(text: str, ts: str, *, channel: str = CUSTOMER_CHANNEL, user: str = CUSTOMER,
             thread_ts: str | None = None, event_id: str | None = None, **extra) -> dict:
    """A message event as Slack delivers it from a Slack Connect channel."""
    ev = {"type": "message", "channel": channel, "user": user, "text": text, "ts": ts, "team": CUSTOMER_TEAM,
          "user_team": CUSTOMER_TEAM, "channel_type": "channel", "event_ts": ts, **extra}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return {"token": "x", "team_id": OUR_TEAM, "api_app_id": "A0APP", "type": "event_callback",
            "event_id": event_id or f"Ev{ts.replace('.', '')}", "event_time": int(float(ts)), "event": ev,
            "authorizations": [{"team_id": OUR_TEAM, "user_id": BOT_USER, "is_bot": True}],
            "is_ext_shared_channel": True}


@pytest.fixture
def fake():
    f = FakeSlack()
    yield f
    f.close()


@pytest.fixture
def env(tmp_path, fake):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'triagebot.db'}", rules_dir=rules,
                        slack_signing_secret=SECRET, slack_bot_token=TOKEN, slack_api_url=fake.base + "api/",
                        agent_channel=AGENTS)
    from triagebot.web import _QuietHandler, _Server, build_app, slack_wsgi
    slack = slack_wsgi(settings)
    assert slack is not None, "the web process did not mount the Slack app"
    server = make_server("127.0.0.1", 0, build_app(settings, slack), server_class=_Server,
                         handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Env(settings, fake, f"http://127.0.0.1:{server.server_port}/")
    server.shutdown()
    server.server_close()


def all_text(payload: object) -> list[str]:
    """Every string inside a recorded payload."""
    if isinstance(payload, str):
        return [payload]
    if isinstance(payload, dict):
        return [s for v in payload.values() for s in all_text(v)]
    if isinstance(payload, list):
        return [s for v in payload for s in all_text(v)]
    return []


def mrkdwn_objects(payload: object) -> list[dict]:
    if isinstance(payload, dict):
        own = [payload] if payload.get("type") == "mrkdwn" else []
        return own + [o for v in payload.values() for o in mrkdwn_objects(v)]
    if isinstance(payload, list):
        return [o for v in payload for o in mrkdwn_objects(v)]
    return []


def new_case(env: Env, text: str = "Hi, the tracker on truck 12 has had no data since this morning. "
                                    "ICCID 8946071234567890147. Can you check?") -> Case:
    ts = env.new_ts()
    assert env.event(envelope(text, ts)) == OK
    env.work()
    with env.sessions() as s:
        row = s.scalars(select(MessageRow).where(MessageRow.slack_ts == ts)).one()
        return s.get(Case, row.case_id)


# -- intake -------------------------------------------------------------------------------------------------

def test_customer_message_becomes_a_case_and_an_agent_suggestion(env):
    ts = env.new_ts()
    assert env.event(envelope("Hej! Våra larm har slutat skicka data sedan i natt, 40 enheter berörs. "
                              "Kan ni kolla?", ts, user=SWEDE)) == OK
    with env.sessions() as s:   # stored before the 200, with the whole envelope and the user's locale
        row = s.scalars(select(Intake)).one()
        stored = json.loads(row.raw)
        assert (row.channel, row.delivery_key) == ("slack", f"slack:{OUR_TEAM}:{CUSTOMER_CHANNEL}:{ts}")
        assert stored["team_id"] == OUR_TEAM and stored["event_id"] and stored["event"]["user_locale"] == "sv-SE"
    env.work()
    with env.sessions() as s:
        msg = s.scalars(select(MessageRow)).one()
        case = s.get(Case, msg.case_id)
        assert msg.action == "created" and msg.source == "slack" and msg.slack_ts == ts
        assert s.scalars(select(CaseEvent).where(CaseEvent.case_id == case.id,
                                                 CaseEvent.kind == "agent_posted")).one().detail["channel"] == AGENTS
    posts = env.fake.of("chat.postMessage")
    assert len(posts) == 1
    post = posts[0]
    assert post["channel"] == AGENTS and case.agent_post_ts
    text = "\n".join(all_text(post["blocks"]))
    assert case.reference in text and "40 enheter" in text
    actions = {el["action_id"] for b in post["blocks"] if b["type"] == "actions" for el in b["elements"]}
    assert {"tb_accept", "tb_category", "tb_service", "tb_severity", "tb_escalate", "tb_merge"} <= actions
    assert "Suggested reply" in text and "Hej" in text          # the reply is in the customer's language
    # Bolt learnt who we are from auth.test on the fake API, with our token
    assert any(c["method"] == "auth.test" and c["auth"] == f"Bearer {TOKEN}" for c in env.fake.calls)


def test_a_retried_event_is_stored_once(env):
    ts = env.new_ts()
    ev = envelope("Our meters in Malmö are offline, none of them report.", ts, event_id="Ev0RETRY")
    assert env.event(ev) == OK
    assert env.event(ev, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}) == OK
    assert env.event(ev, headers={"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_error"}) == OK
    assert env.count(Intake) == 1
    env.work()
    assert env.count(MessageRow) == 1 and env.count(Case) == 1
    assert len(env.fake.of("chat.postMessage")) == 1


@pytest.mark.parametrize("how", ["wrong secret", "stale", "unsigned"])
def test_a_forged_or_stale_request_is_refused(env, how):
    body = json.dumps(envelope("<!channel> free SIMs, click here", env.new_ts())).encode()
    if how == "wrong secret":
        status, _ = env.post("/slack/events", body, "application/json", secret="not-the-secret")
    elif how == "stale":   # a correctly signed request replayed ten minutes later
        status, _ = env.post("/slack/events", body, "application/json", timestamp=int(time.time()) - 600)
    else:
        req = urllib.request.Request(env.base + "slack/events", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            status = urllib.request.urlopen(req, timeout=WAIT).status
        except urllib.error.HTTPError as e:
            status = e.code
    assert status == UNAUTHORIZED
    assert env.count(Intake) == 0
    # a forged action is refused as well, and changes nothing
    forged = urllib.parse.urlencode({"payload": json.dumps({"type": "block_actions", "actions": []})}).encode()
    assert env.post("/slack/events", forged, "application/x-www-form-urlencoded", secret="nope")[0] == UNAUTHORIZED


def test_url_verification_is_answered(env):
    status, body = env.post("/slack/events", json.dumps({"type": "url_verification", "token": "x",
                                                          "challenge": "c0ffee"}).encode(), "application/json")
    assert status == OK and b"c0ffee" in body


def test_bot_messages_our_own_posts_agents_and_agent_channels_are_ignored(env):
    cases = [
        envelope("I am a bot", env.new_ts(), bot_id="B0OTHER", subtype="bot_message"),
        envelope("another app's post", env.new_ts(), user="U0OTHERAPP", bot_id="B0OTHERAPP", app_id="A0OTHER"),
        envelope("our own suggestion", env.new_ts(), user=BOT_USER),                   # Bolt: our own bot user
        envelope("posted by our app", env.new_ts(), bot_id=BOT_ID),
        envelope("whoever writes in the agents' channel", env.new_ts(), channel=AGENTS, user="U0GUEST"),
        envelope("an agent in the customer channel", env.new_ts(), user=AGENT, user_team=OUR_TEAM, team=OUR_TEAM),
        envelope("", env.new_ts(), subtype="channel_join"),
    ]
    for ev in cases:
        assert env.event(ev) == OK
    assert env.count(Intake) == 0


def test_a_thread_reply_threads_by_thread_ts(env):
    case = new_case(env)
    root_ts = case.slack_thread_ts
    assert env.event(envelope("Still nothing, now the whole fleet is down", env.new_ts(), thread_ts=root_ts)) == OK
    env.work()
    with env.sessions() as s:
        rows = s.scalars(select(MessageRow).order_by(MessageRow.id)).all()
        assert [r.action for r in rows] == ["created", "threaded"]
        assert rows[1].case_id == case.id and rows[1].slack_thread_ts == root_ts
    assert env.count(Case) == 1


class _Labels:
    """A stub step: labels from markers in the text, so a test can make a reply raise the severity."""

    name = "stub"

    def __call__(self, message, triage: Triage) -> Triage:
        severity = "critical" if "EVERYTHING" in message.text else "medium"
        return triage.with_(disposition="case", language="en", category="incident", service="data",
                            severity=severity).note(self.name, severity)


def test_a_significant_update_updates_the_suggestion_in_place_and_notes_it_in_its_thread(env):
    stub = Pipeline((_Labels(),))
    ts = env.new_ts()
    assert env.event(envelope("One tracker has no data.", ts)) == OK
    env.work(stub)
    case = env.case()
    assert env.event(envelope("Just a thank you.", env.new_ts(), thread_ts=ts)) == OK
    env.work(stub)
    assert env.fake.of("chat.update") == []          # nothing significant: no noise for the agents
    assert env.event(envelope("Now EVERYTHING is down, <!here> help", env.new_ts(), thread_ts=ts)) == OK
    env.work(stub)
    update = env.fake.wait_for("chat.update")[-1]
    assert (update["channel"], update["ts"]) == (AGENTS, case.agent_post_ts)
    assert "critical" in "\n".join(all_text(update["blocks"]))
    note = env.fake.of("chat.postMessage")[-1]
    assert note["thread_ts"] == case.agent_post_ts
    note_text = "\n".join(all_text(note["blocks"]))
    with env.sessions() as s:   # the note says what changed, as the trail has it (repeat contacts may raise it too)
        ev = s.scalars(select(CaseEvent).where(CaseEvent.kind == "threaded").order_by(CaseEvent.id.desc())).first()
        before, after = ev.detail["changes"]["severity"]
    assert after == "critical" and f"severity {before} → *critical*" in note_text and "<!here>" not in note_text
    assert len(env.fake.of("chat.postMessage")) == 2  # the suggestion and one note, no second suggestion


def test_routes_send_a_case_to_its_desk_whose_channel_is_then_no_customer_channel(env):
    (env.settings.rules_dir / "routing.yaml").write_text("routes:\n  - service: [data]\n    channel: C0DATADESK\n")
    stub = Pipeline((_Labels(),))
    assert env.event(envelope("One tracker has no data.", env.new_ts())) == OK
    env.work(stub)
    assert [p["channel"] for p in env.fake.of("chat.postMessage")] == ["C0DATADESK"]
    assert env.event(envelope("agents on the data desk", env.new_ts(), channel="C0DATADESK")) == OK
    assert env.count(Intake) == 1


def test_an_outage_of_several_customers_gets_its_own_suggestion(env):
    stub = Pipeline((_Labels(),))
    for user in ("U0FIRST", "U0SECOND"):
        assert env.event(envelope("All our trackers lost data connection at 10:00 today", env.new_ts(),
                                  user=user)) == OK
    env.work(stub)
    with env.sessions() as s:
        parent = s.scalars(select(Case).where(Case.kind == "incident")).one()
        children = s.scalars(select(Case).where(Case.parent_id == parent.id)).all()
    assert len(children) == 2 and parent.agent_post_ts
    outage = [p for p in env.fake.of("chat.postMessage") if parent.reference in json.dumps(p["blocks"])
              and p["blocks"][0]["text"]["text"].startswith(parent.reference)]
    assert len(outage) == 1
    assert all(c.reference in json.dumps(outage[0]["blocks"]) for c in children)


def test_edits_and_deletions_are_recorded_on_the_message(env):
    case = new_case(env)
    with env.sessions() as s:
        row = s.scalars(select(MessageRow).where(MessageRow.case_id == case.id)).one()
    edit = {"type": "message", "subtype": "message_changed", "channel": CUSTOMER_CHANNEL, "hidden": True,
            "ts": env.new_ts(), "event_ts": env.new_ts(),
            "message": {"type": "message", "user": CUSTOMER, "text": "Correction: *two* trackers, not one",
                        "ts": row.slack_ts, "edited": {"user": CUSTOMER, "ts": env.new_ts()}},
            "previous_message": {"type": "message", "user": CUSTOMER, "text": row.text, "ts": row.slack_ts}}
    body = {**envelope("", row.slack_ts), "event": edit, "event_id": "Ev0EDIT"}
    assert env.event(body) == OK
    assert env.event(body, headers={"X-Slack-Retry-Num": "1"}) == OK
    deletion = {"type": "message", "subtype": "message_deleted", "channel": CUSTOMER_CHANNEL, "hidden": True,
                "ts": env.new_ts(), "deleted_ts": row.slack_ts, "event_ts": env.new_ts(),
                "previous_message": {"type": "message", "user": CUSTOMER, "text": "x", "ts": row.slack_ts}}
    assert env.event({**envelope("", row.slack_ts), "event": deletion, "event_id": "Ev0DEL"}) == OK
    assert env.count(Intake) == 1                       # neither is a new message
    with env.sessions() as s:
        row = s.get(MessageRow, row.id)
        assert row.edited_text == "Correction: two trackers, not one" and row.deleted
        kinds = [e.kind for e in s.scalars(select(CaseEvent).where(CaseEvent.case_id == case.id)
                                           .order_by(CaseEvent.id))]
        assert kinds.count("message_edited") == 1 and kinds.count("message_deleted") == 1
        assert all(e.actor == f"slack:{CUSTOMER}" for e in s.scalars(select(CaseEvent).where(
            CaseEvent.kind.in_(("message_edited", "message_deleted")))))
    # the suggestion is re-rendered (in a lazy listener, after Slack has its 200) without the deleted text
    env.fake.wait_until("chat.update", lambda u: "deleted by the customer" in "\n".join(all_text(u["blocks"])))


def test_an_edit_that_overtakes_its_message_is_applied_when_the_message_is_stored(env):
    ts = env.new_ts()
    assert env.event(envelope("one modem is down", ts)) == OK       # still in the queue
    edit = {"type": "message", "subtype": "message_changed", "channel": CUSTOMER_CHANNEL, "ts": env.new_ts(),
            "message": {"type": "message", "user": CUSTOMER, "text": "three modems are down", "ts": ts}}
    assert env.event({**envelope("", ts), "event": edit, "event_id": "Ev0EARLY"}) == OK
    env.work()
    with env.sessions() as s:
        row = s.scalars(select(MessageRow)).one()
        assert row.text == "one modem is down" and row.edited_text == "three modems are down"


# -- escaping -------------------------------------------------------------------------------------------------

HOSTILE = ("<!channel> <!here> <!everyone> urgent!! ping <@U0CEO> see <#C0GENERAL|general> and "
           "<https://evil.example/login|click to fix your SIMs> *bold* _it_ ~x~ ``` break out ``` "
           "and literally &lt;!channel&gt; &lt;https://evil.example|link&gt; &amp; @here @channel")
FORBIDDEN = ("<!channel>", "<!here>", "<!everyone>", "<@U0CEO>", "<#C0GENERAL", "<https://evil", "|link>")


def assert_harmless(payload: dict) -> None:
    texts = all_text(payload.get("blocks")) + [payload.get("text") or ""]
    for t in texts:
        for bad in FORBIDDEN:
            assert bad not in t, f"{bad!r} reached Slack in {t!r}"
        for word in ("@channel", "@here", "@everyone"):
            assert word not in t.lower(), f"{word} reached Slack unbroken in {t!r}"
    for obj in mrkdwn_objects(payload.get("blocks")):
        assert obj.get("verbatim") is True
        assert obj["text"].count("```") % 2 == 0        # no code block left open or closed early


def test_a_hostile_slack_message_is_posted_harmlessly(env):
    case = new_case(env, HOSTILE)
    post = env.fake.of("chat.postMessage")[0]
    assert_harmless(post)
    shown = "\n".join(all_text(post["blocks"]))
    # the customer's words are still there for the agent, escaped
    assert "&lt;!channel&gt;" in shown and "&lt;https://evil.example|link&gt;" in shown and "&amp;" in shown
    assert case.reference in shown


def test_a_hostile_mail_is_posted_harmlessly(env):
    mail = EmailMessage()
    mail["From"], mail["To"] = "Mallory <mallory@evil.example>", "support@support.example.net"
    mail["Subject"] = "<!channel> *URGENT* <https://evil.example|invoice>"
    mail["Message-ID"] = "<hostile-1@evil.example>"
    mail.set_content(HOSTILE.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    queue.enqueue(env.sessions, "email", bytes(mail), origin="test")
    env.work()
    post = env.fake.wait_for("chat.postMessage")[0]
    assert_harmless(post)
    shown = "\n".join(all_text(post["blocks"]))
    assert "&lt;!channel&gt;" in shown and "&lt;https://evil.example/login|click to fix your SIMs&gt;" in shown


# -- agents' actions -----------------------------------------------------------------------------------------

def test_a_correction_updates_the_case_its_trail_the_message_and_feedback(env):
    case = new_case(env)
    with env.sessions() as s:
        msg = s.scalars(select(MessageRow).where(MessageRow.case_id == case.id)).one()
    new = "sms" if case.service != "sms" else "voice"
    action = {"type": "static_select", "action_id": "tb_service", "block_id": f"tb_labels:{case.id}",
              "selected_option": {"text": {"type": "plain_text", "text": new}, "value": new}, "action_ts": "1.2"}
    status, _ = env.interact(env.agent_payload(action, case))
    assert status == OK
    after = env.case()
    assert after.service == new
    with env.sessions() as s:
        ev = s.scalars(select(CaseEvent).where(CaseEvent.case_id == case.id, CaseEvent.kind == "relabelled")).one()
        assert ev.actor == f"slack:{AGENT}" and ev.detail == {"field": "service", "old": case.service, "new": new}
        fb = s.scalars(select(Feedback)).one()
        assert (fb.field, fb.old_value, fb.new_value, fb.actor) == ("service", case.service, new, f"slack:{AGENT}")
        assert (fb.message_id, fb.case_id, fb.channel, fb.text) == (msg.id, case.id, "slack", msg.text)
        assert fb.language == msg.language
    update = env.fake.wait_for("chat.update")[-1]
    assert (update["channel"], update["ts"]) == (AGENTS, case.agent_post_ts)
    service_select = [el for b in update["blocks"] if b["type"] == "actions" for el in b["elements"]
                      if el["action_id"] == "tb_service"][0]
    assert service_select["initial_option"]["value"] == new
    assert f"<@{AGENT}>" in "\n".join(all_text(update["blocks"]))   # who changed it, on the message

    from triagebot.agents.feedback import feedback_examples
    examples = feedback_examples(env.sessions, partial=True)   # partial: labels of a model-less bot are unknown
    assert len(examples) == 1
    assert examples[0]["labels"]["service"] == new and examples[0]["body"] == msg.text


def test_accept_and_escalate(env):
    case = new_case(env)
    accept = {"type": "button", "action_id": "tb_accept", "block_id": "b", "value": str(case.id), "action_ts": "1"}
    assert env.interact(env.agent_payload(accept, case))[0] == OK
    with env.sessions() as s:
        confirmed = {f.field: (f.old_value, f.new_value) for f in s.scalars(select(Feedback))}
    assert confirmed == {k: (getattr(case, k), getattr(case, k)) for k in ("category", "service", "severity")
                         if getattr(case, k) is not None}
    escalate = {**accept, "action_id": "tb_escalate"}
    assert env.interact(env.agent_payload(escalate, case))[0] == OK
    after = env.case()
    expected = {"low": "medium", "medium": "high", "high": "critical", "critical": "critical", None: "high"}
    assert after.severity == expected[case.severity]
    with env.sessions() as s:
        kinds = [(e.kind, e.actor) for e in s.scalars(select(CaseEvent).where(CaseEvent.actor.like("slack:U0AGENT")))]
        assert kinds == [("accepted", f"slack:{AGENT}"), ("escalated", f"slack:{AGENT}")]
        last = s.scalars(select(Feedback).order_by(Feedback.id.desc())).first()
        assert (last.field, last.new_value) == ("severity", after.severity)
    assert len(env.fake.wait_for("chat.update", 2)) == 2


def test_merge_through_the_modal(env):
    first = new_case(env, "The SIM in alarm panel 7 does not register.")
    second = new_case(env, "Alarm panel 7 is still offline, same SIM as before.")
    assert first.id != second.id
    merge = {"type": "button", "action_id": "tb_merge", "block_id": "b", "value": str(second.id), "action_ts": "1"}
    assert env.interact(env.agent_payload(merge, second))[0] == OK
    modal = env.fake.wait_for("views.open")[0]
    assert modal["trigger_id"] == "1.2.trigger" and modal["view"]["callback_id"] == "tb_merge_modal"

    def submit(reference: str) -> tuple[int, bytes]:
        view = {**modal["view"], "id": "V0MODAL", "state": {"values": {"tb_merge_target": {
            "tb_merge_reference": {"type": "plain_text_input", "value": reference}}}}}
        return env.interact({"type": "view_submission", "team": {"id": OUR_TEAM}, "api_app_id": "A0APP",
                             "user": {"id": AGENT, "team_id": OUR_TEAM}, "token": "x", "trigger_id": "1.3",
                             "view": view})

    status, body = submit("CASE-999999")
    assert status == OK and json.loads(body)["response_action"] == "errors"
    status, body = submit(second.reference)
    assert json.loads(body)["response_action"] == "errors"          # not into itself
    status, body = submit(first.reference.lower())
    assert status == OK and not body.strip(b"{} ")
    merged = env.case(second.reference)
    assert merged.status == "closed"
    with env.sessions() as s:
        ev = s.scalars(select(CaseEvent).where(CaseEvent.case_id == second.id, CaseEvent.kind == "merged")).one()
        assert ev.actor == f"slack:{AGENT}" and ev.detail["into"] == first.reference
        keys = s.scalars(select(ThreadKey)).all()
        assert keys and all(k.case_id == first.id for k in keys)   # later replies land in the surviving case
    update = [u for u in env.fake.wait_for("chat.update") if u["ts"] == second.agent_post_ts][-1]
    assert f"Merged into {first.reference}" in "\n".join(all_text(update["blocks"]))


def test_send_the_suggested_reply_in_the_customers_slack_thread(env):
    case = new_case(env, "How do I set the APN on our routers?")
    send = {"type": "button", "action_id": "tb_send_reply", "block_id": "b", "value": str(case.id),
            "action_ts": "1"}
    assert env.interact(env.agent_payload(send, case))[0] == OK
    posts = [p for p in env.fake.of("chat.postMessage") if p["channel"] == CUSTOMER_CHANNEL]
    assert len(posts) == 1 and posts[0]["thread_ts"] == case.slack_thread_ts
    assert case.reference in posts[0]["text"]
    with env.sessions() as s:
        ev = s.scalars(select(CaseEvent).where(CaseEvent.kind == "reply_sent")).one()
        assert ev.actor == f"slack:{AGENT}" and ev.detail["via"] == "slack"
    # the button is gone from the updated message, and a second click sends nothing
    update = env.fake.wait_for("chat.update")[-1]
    assert "tb_send_reply" not in json.dumps(update["blocks"])
    assert env.interact(env.agent_payload(send, case))[0] == OK
    assert len([p for p in env.fake.of("chat.postMessage") if p["channel"] == CUSTOMER_CHANNEL]) == 1
    # our own reply, coming back as an event, is not a customer message
    assert env.event(envelope(posts[0]["text"], env.new_ts(), user=BOT_USER, bot_id=BOT_ID,
                              thread_ts=case.slack_thread_ts)) == OK
    assert env.count(Intake) == 1


@pytest.mark.parametrize("relay", [None, "127.0.0.1"])
def test_send_the_suggested_reply_to_a_mail_customer(env, relay):
    env.settings = replace(env.settings, relay_host=relay)
    mail = EmailMessage()
    mail["From"], mail["To"] = "Ana <ana@cliente.example.es>", "support@support.example.net"
    mail["Subject"], mail["Message-ID"] = "Factura de octubre", "<fact-1@cliente.example.es>"
    mail.set_content("Hola, ¿qué es el cargo de roaming en la factura de octubre?")
    queue.enqueue(env.sessions, "email", bytes(mail), origin="test")
    env.work()
    case = env.case()
    from triagebot.agents import actions
    result = actions.send_reply(env.settings, env.sessions, None, case.id, AGENT)
    assert result.ok
    with env.sessions() as s:
        outbox = s.scalars(select(Outbox).where(Outbox.kind == "reply")).all()
        kind = s.scalars(select(CaseEvent.kind).where(CaseEvent.kind.like("reply_%"))).one()
    if relay:
        assert kind == "reply_queued" and len(outbox) == 1 and outbox[0].recipient == "ana@cliente.example.es"
        assert b"In-Reply-To: <fact-1@cliente.example.es>" in outbox[0].raw and case.reference.encode() in outbox[0].raw
        with env.sessions() as s:   # the customer's answer to it threads into the case
            assert s.get(ThreadKey, f"msgid:{outbox[0].message_id.lower()}").case_id == case.id
    else:
        assert kind == "reply_recorded" and outbox == []
    from triagebot.db.tables import Audit
    with env.sessions() as s:
        [row] = s.scalars(select(Audit)).all()
    assert (row.actor, row.action, row.target) == (f"slack:{AGENT}", "send_reply", case.reference)
    assert row.detail["reply_via"] == ("email" if relay else "recorded")


def test_every_agent_access_is_in_the_audit_trail(env):
    """Viewing a case, correcting its labels, accepting, escalating, merging and replying: one audit row each,
    by the agent, naming the case (data protection: who saw or changed what, and when)."""
    from triagebot.db.tables import Audit
    first = new_case(env, "The SIM in alarm panel 7 does not register.")
    case = new_case(env, "How do I set the APN on our routers?")
    actor = f"slack:{AGENT}"

    def audited() -> list[tuple]:
        with env.sessions() as s:
            return [(a.actor, a.action, a.target) for a in s.scalars(select(Audit).order_by(Audit.id))]

    assert audited() == []                                          # the bot's own work is no agent access
    assert env.command("/case", case.reference)[0] == OK
    assert audited() == [(actor, "view_case", case.reference)]
    assert env.command("/case", "CASE-424242")[0] == OK              # no case: nothing was seen
    assert len(audited()) == 1

    new = "sms" if case.service != "sms" else "voice"
    select_service = {"type": "static_select", "action_id": "tb_service", "block_id": f"tb_labels:{case.id}",
                      "selected_option": {"text": {"type": "plain_text", "text": new}, "value": new}, "action_ts": "1"}
    button = {"type": "button", "block_id": "b", "value": str(case.id), "action_ts": "1"}
    for payload in (select_service, {**button, "action_id": "tb_accept"}, {**button, "action_id": "tb_escalate"},
                    {**button, "action_id": "tb_send_reply"}):
        assert env.interact(env.agent_payload(payload, case))[0] == OK
    merge = {"type": "button", "action_id": "tb_merge", "block_id": "b", "value": str(first.id), "action_ts": "1"}
    assert env.interact(env.agent_payload(merge, first))[0] == OK
    modal = env.fake.wait_for("views.open")[0]
    view = {**modal["view"], "id": "V0MODAL", "state": {"values": {"tb_merge_target": {
        "tb_merge_reference": {"type": "plain_text_input", "value": case.reference}}}}}
    assert env.interact({"type": "view_submission", "team": {"id": OUR_TEAM}, "api_app_id": "A0APP",
                         "user": {"id": AGENT, "team_id": OUR_TEAM}, "token": "x", "trigger_id": "1.3",
                         "view": view})[0] == OK
    assert audited() == [(actor, "view_case", case.reference), (actor, "relabel", case.reference),
                         (actor, "accept", case.reference), (actor, "escalate", case.reference),
                         (actor, "send_reply", case.reference), (actor, "merge", first.reference)]
    with env.sessions() as s:
        rows = list(s.scalars(select(Audit).order_by(Audit.id)))
    assert rows[0].detail == {"via": "/case"}
    assert rows[1].detail == {"via": "slack", "field": "service", "old": case.service, "new": new}
    assert rows[4].detail["via"] == "slack" and rows[4].detail["reply_via"] == "slack"
    assert rows[5].detail["into"] == case.reference


# -- slash commands -----------------------------------------------------------------------------------------

def test_slash_case_shows_a_case_and_slash_triage_explains_a_decision(env):
    case = new_case(env)
    status, body = env.command("/case", case.reference)
    answer = json.loads(body)
    assert status == OK and answer["response_type"] == "ephemeral"
    assert case.reference in json.dumps(answer["blocks"])
    assert not any(b["type"] == "actions" for b in answer["blocks"])
    status, body = env.command("/case", "CASE-424242")
    assert status == OK and "No case" in json.loads(body)["text"]

    status, _ = env.command("/triage", "<!channel> none of our 300 meters send SMS since the update")
    assert status == OK
    reply = env.fake.wait_for("response_url")[-1]
    assert reply["response_type"] == "ephemeral"
    shown = "\n".join(all_text(reply["blocks"]))
    assert "Why" in shown and "<!channel>" not in shown and "disposition" in shown.lower()


def test_without_a_bot_token_messages_are_still_taken_in(tmp_path, fake):
    # `triagebot run --demo` sets only the signing secret: intake works, nothing is posted
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'demo.db'}", slack_signing_secret=SECRET)
    from triagebot.web import _QuietHandler, _Server, build_app, slack_wsgi
    server = make_server("127.0.0.1", 0, build_app(settings, slack_wsgi(settings)), server_class=_Server,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        env = Env(settings, fake, f"http://127.0.0.1:{server.server_port}/")
        assert env.event(envelope("no data on our meters", env.new_ts())) == OK
        assert env.event(envelope("forged", env.new_ts()), secret="wrong") == UNAUTHORIZED
        assert env.count(Intake) == 1 and fake.calls == []
    finally:
        server.shutdown()
        server.server_close()


# -- Socket Mode and the command line ------------------------------------------------------------------------

def test_socket_mode_is_wired_but_needs_an_app_token(env):
    from slack_bolt.adapter.socket_mode import SocketModeHandler
    assert callable(SocketModeHandler)
    from triagebot.agents.slack_app import socket_mode
    from triagebot.cli import build_parser
    with pytest.raises(SystemExit, match="SLACK_APP_TOKEN"):
        socket_mode(env.settings)
    args = build_parser().parse_args(["slack"])
    assert args.func.__name__ == "cmd_slack"


# -- feedback as training data --------------------------------------------------------------------------------

def test_feedback_examples_newest_correction_wins_and_fit_the_training_schema(tmp_path):
    from triagebot.agents.feedback import feedback_examples
    from triagebot.train.dataset import load_file
    _e, sessions = open_db(f"sqlite:///{tmp_path / 'fb.db'}")
    with sessions() as s, s.begin():
        case = Case(reference="CASE-000001", status="open", category="incident", service="data", severity="low")
        s.add(case)
        s.flush()
        msg = MessageRow(case_id=case.id, source="email", content_hash="h", subject="No data",
                         text="No data on 40 SIMs",
                         disposition="case", action="created", language="en", category="incident", service="data",
                         severity="low", blast_estimate=40, blast_tier="many")
        untouched = MessageRow(case_id=case.id, source="slack", content_hash="h2", text="hej", disposition="case",
                               action="threaded", language="sv", category="incident", service="data", severity="low")
        s.add_all([msg, untouched])
        s.flush()
        for old, new in (("low", "medium"), ("medium", "high")):
            s.add(Feedback(message_id=msg.id, case_id=case.id, actor="slack:U1", field="severity", old_value=old,
                           new_value=new, channel="email", language="en", subject="No data", text="No data on 40 SIMs"))
        s.add(Feedback(message_id=msg.id, case_id=case.id, actor="slack:U2", field="service", old_value="data",
                       new_value="nonsense", channel="email", language="en", subject="No data", text="x"))
        unlabelled = MessageRow(case_id=case.id, source="slack", content_hash="h3", text="sms down", disposition="case",
                                action="threaded", language="en")      # came in while no model was promoted
        s.add(unlabelled)
        s.flush()
        s.add(Feedback(message_id=unlabelled.id, case_id=case.id, actor="slack:U3", field="service", old_value=None,
                       new_value="sms", channel="slack", language="en", subject=None, text="sms down"))
    examples = feedback_examples(sessions)
    assert len(examples) == 1
    ex = examples[0]
    partial = feedback_examples(sessions, partial=True)
    assert partial[0] == ex and partial[1]["labels"] == {"service": "sms", "estimate": None}
    assert ex["labels"] == {"category": "incident", "service": "data", "severity": "high", "tier": "many",
                            "estimate": 40}
    assert (ex["channel"], ex["language"], ex["subject"]) == ("email", "en", "No data")
    assert ex["body"] == "No data on 40 SIMs"
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    loaded, errors = load_file(path)
    assert errors == [] and loaded[0].labels["severity"] == "high"


def test_every_taxonomy_value_is_offered(env):
    case = new_case(env)
    post = env.fake.of("chat.postMessage")[0]
    selects = {el["action_id"]: [o["value"] for o in el["options"]]
               for b in post["blocks"] if b["type"] == "actions" for el in b["elements"] if "options" in el}
    assert selects["tb_service"] == list(SERVICES) and selects["tb_severity"] == list(SEVERITIES)
    assert case.reference
