"""The web process: /healthz, /metrics (Prometheus text format) and the Slack endpoints (/slack/*)."""
from __future__ import annotations

import json
import logging
import signal
import threading
from socketserver import ThreadingMixIn
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sqlalchemy import func, select, text

from triagebot.db.engine import open_db
from triagebot.db.tables import Case, Intake, MessageRow
from triagebot.settings import Settings

log = logging.getLogger(__name__)
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        log.debug("web: " + format, *args)


def metrics_text(settings: Settings) -> str:
    """Queue depth by state, intake totals, messages, cases and the promoted model versions."""
    _e, sessions = open_db(settings.database_url)
    lines = ["# HELP triagebot_intake_rows Intake rows by processing state.", "# TYPE triagebot_intake_rows gauge"]
    with sessions() as s:
        states = dict(s.execute(select(Intake.state, func.count()).group_by(Intake.state)).all())
        for state in ("queued", "processing", "done", "failed"):
            lines.append(f'triagebot_intake_rows{{state="{state}"}} {states.get(state, 0)}')
        lines += ["# HELP triagebot_messages_total Messages stored, by action.", "# TYPE triagebot_messages_total counter"]
        for action, n in s.execute(select(MessageRow.action, func.count()).group_by(MessageRow.action)):
            lines.append(f'triagebot_messages_total{{action="{action}"}} {n}')
        lines += ["# HELP triagebot_cases Cases by status.", "# TYPE triagebot_cases gauge"]
        for status, n in s.execute(select(Case.status, func.count()).group_by(Case.status)):
            lines.append(f'triagebot_cases{{status="{status}"}} {n}')
    try:
        from triagebot.train.registry import promoted_versions
        lines += ["# HELP triagebot_model_info The promoted model of each label.", "# TYPE triagebot_model_info gauge"]
        for label, version in promoted_versions(settings.models_dir).items():
            lines.append(f'triagebot_model_info{{label="{label}",version="{version}"}} 1')
    except Exception:  # noqa: BLE001 - metrics must answer even without models
        log.info("no model registry for /metrics", exc_info=True)
    return "\n".join(lines) + "\n"


def build_app(settings: Settings, slack_app: WSGIApp | None = None) -> WSGIApp:
    """The WSGI application of the web process."""

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            try:
                _e, sessions = open_db(settings.database_url)
                with sessions() as s:
                    s.execute(text("SELECT 1"))
                body, status = {"status": "ok"}, "200 OK"
            except Exception as e:  # noqa: BLE001
                body, status = {"status": "error", "error": type(e).__name__}, "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
            return [metrics_text(settings).encode()]
        if path.startswith("/slack/") and slack_app is not None:
            return slack_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


def slack_wsgi(settings: Settings) -> WSGIApp | None:
    """The Bolt app as WSGI, when Slack is configured."""
    if not settings.slack_signing_secret:
        return None
    try:
        from triagebot.agents.slack_app import wsgi_app
    except ImportError:
        log.warning("Slack is configured but triagebot.agents.slack_app is missing")
        return None
    return wsgi_app(settings)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT."""
    open_db(settings.database_url)
    server = make_server(settings.web_host, settings.web_port, build_app(settings, slack_wsgi(settings)),
                         server_class=_Server, handler_class=_QuietHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.warning("web on http://%s:%s", settings.web_host, settings.web_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
