"""The SMTP listener (aiosmtpd): takes mail for our support domains, stores the raw bytes, answers.

It never classifies (Mailman's LMTP runner is the model): `250` only after the raw message is
committed in the intake table, `451` when storage fails so the sender retries, `550` for
recipients outside our domains (never an open relay), `552` for mail over the size limit
(aiosmtpd discards the excess while reading, RFC 5321 §4.5.3.1.7), `421` past the per-client
connection or rate limit.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session as SMTPSession
from sqlalchemy.orm import Session, sessionmaker

from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.settings import Settings

log = logging.getLogger(__name__)

OK = "250 OK: queued as {id}"
NOT_OURS = "550 5.7.1 Relaying denied: {rcpt} is not a support address here"
STORE_FAILED = "451 4.3.0 Temporary failure storing the message, please retry"
TOO_MANY = "421 4.7.0 Too many connections from your address, try again later"
RATE = "421 4.7.0 Rate limit exceeded, try again later"


def redact(addr: str) -> str:
    """An address fit for a log line: the local part hidden."""
    local, _, domain = addr.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


class IntakeHandler:
    """aiosmtpd handler: checks recipients, stores DATA durably, answers with the status string."""

    def __init__(self, sessions: sessionmaker[Session], domains: tuple[str, ...], executor: ThreadPoolExecutor):
        self.sessions, self.domains, self.executor = sessions, tuple(d.lower() for d in domains), executor

    def accepts(self, address: str) -> bool:
        domain = address.rsplit("@", 1)[-1].lower().rstrip(">") if "@" in address else ""
        return any(domain == d or domain.endswith("." + d) for d in self.domains)

    async def handle_RCPT(self, server: SMTP, session: SMTPSession, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not self.accepts(address):
            log.info("refused recipient %s from %s", redact(address), session.peer)
            return NOT_OURS.format(rcpt=address)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        origin = f"smtp:{peer}"
        loop = asyncio.get_running_loop()
        try:
            intake_id = await loop.run_in_executor(self.executor, lambda: queue.enqueue(
                self.sessions, "email", bytes(raw), origin=origin))
        except Exception:  # storage is down or full: the sender must keep the message and retry
            log.error("storing a message from %s failed", peer, exc_info=True)
            return STORE_FAILED
        return OK.format(id=intake_id)


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP with a per-client connection limit and a per-client message rate limit."""

    connections: dict[str, int] = defaultdict(int)
    recent: dict[str, deque] = defaultdict(deque)
    max_connections = 20
    max_per_minute = 6000

    def connection_made(self, transport) -> None:
        peer = (transport.get_extra_info("peername") or ("?",))[0]
        self._limit_peer = peer
        LimitedSMTP.connections[peer] += 1
        super().connection_made(transport)
        if LimitedSMTP.connections[peer] > self.max_connections:
            # answer before the greeting is read, then close (RFC 5321 §3.8: 421 may be sent at any time)
            transport.write((TOO_MANY + "\r\n").encode())
            transport.close()

    def connection_lost(self, exc) -> None:
        peer = getattr(self, "_limit_peer", None)
        if peer is not None:
            LimitedSMTP.connections[peer] = max(0, LimitedSMTP.connections[peer] - 1)
        super().connection_lost(exc)

    async def smtp_MAIL(self, arg: str) -> None:
        peer = getattr(self, "_limit_peer", "?")
        now = time.monotonic()
        q = LimitedSMTP.recent[peer]
        while q and now - q[0] > 60:
            q.popleft()
        if len(q) >= self.max_per_minute:
            await self.push(RATE)
            return
        q.append(now)
        await super().smtp_MAIL(arg)


def _authenticator(users: str | None):
    """AUTH for internal relays: TRIAGEBOT_SMTP_AUTH_USERS='user:password,user2:password2'."""
    if not users:
        return None
    table = dict(pair.split(":", 1) for pair in users.split(",") if ":" in pair)

    def check(server, session, envelope, mechanism, auth_data) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user, pw = auth_data.login.decode(), auth_data.password.decode()
            if table.get(user) == pw:
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    return check


class IntakeController(Controller):
    """A Controller that builds our LimitedSMTP with the settings' limits."""

    def __init__(self, handler: IntakeHandler, settings: Settings, **kwargs) -> None:
        self.settings = settings
        super().__init__(handler, hostname=settings.smtp_host, port=settings.smtp_port, **kwargs)

    def factory(self) -> SMTP:
        LimitedSMTP.max_connections = self.settings.smtp_max_connections_per_client
        kwargs = dict(self.SMTP_kwargs)
        return LimitedSMTP(self.handler, **kwargs)


def build_controller(settings: Settings) -> tuple[IntakeController, ThreadPoolExecutor]:
    """The listener for the settings: size limit, optional STARTTLS and AUTH."""
    _engine, sessions = open_db(settings.database_url)
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="smtp-store")
    handler = IntakeHandler(sessions, settings.mail_domains, executor)
    kwargs: dict = {"data_size_limit": settings.smtp_max_size, "enable_SMTPUTF8": True,
                    "decode_data": False, "ident": "triagebot ESMTP"}
    if settings.smtp_tls_cert and settings.smtp_tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(settings.smtp_tls_cert, settings.smtp_tls_key)
        kwargs["tls_context"] = ctx
    auth = _authenticator(settings.smtp_auth_users)
    if auth:
        kwargs["authenticator"] = auth
        kwargs["auth_require_tls"] = bool(settings.smtp_tls_cert)
    return IntakeController(handler, settings, **kwargs), executor


def serve(settings: Settings) -> None:
    """Run the listener until SIGTERM/SIGINT."""
    import signal
    import threading
    controller, executor = build_controller(settings)
    controller.start()
    log.warning("SMTP listener on %s:%s for %s", settings.smtp_host, settings.smtp_port,
                ",".join(settings.mail_domains))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
        executor.shutdown(wait=True)
