"""The SMTP listener (aiosmtpd): takes mail for our support domains, stores the raw bytes, answers.

It never classifies (Mailman's LMTP runner is the model): `250` only after the raw message is
committed in the intake table, `451` when storage fails so the sender retries, `550` for
recipients outside our domains (never an open relay), `552` for mail over the size limit
(aiosmtpd discards the excess while reading, RFC 5321 §4.5.3.1.7), `421` past the per-client
connection or rate limit.

Storing is a group commit: one writer thread takes every message that arrived while the previous
transaction was committing and stores them all in the next one, so concurrent senders share one
commit (and one fsync) instead of queueing for SQLite's write lock one by one. Each sender still
gets its `250` only after the transaction holding its message has committed.
"""
from __future__ import annotations

import asyncio
import logging
import queue as stdqueue
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session as SMTPSession
from sqlalchemy import Engine, insert
from sqlalchemy.exc import DataError, IntegrityError

from triagebot import crypto
from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Intake, utcnow
from triagebot.settings import Settings

log = logging.getLogger(__name__)

OK = "250 OK: queued as {id}"
NOT_OURS = "550 5.7.1 Relaying denied: {rcpt} is not a support address here"
STORE_FAILED = "451 4.3.0 Temporary failure storing the message, please retry"
TOO_MANY = "421 4.7.0 Too many connections from your address, try again later"
RATE = "421 4.7.0 Rate limit exceeded, try again later"
SQLITE_INSERT = ("INSERT INTO intake (channel, raw, received_at, content_hash, origin, state, attempts, not_before, "
                 "flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
# The everyday MAIL FROM / RCPT TO argument: <dot-atom@dotted.domain> and plain ESMTP parameters.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
SIMPLE_PATH = re.compile(rf"[ \t]*<(?P<addr>{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>"
                         r"(?:[ \t]+(?P<rest>[A-Za-z0-9=._+-]+(?:[ \t]+[A-Za-z0-9=._+-]+)*))?")


def redact(addr: str) -> str:
    """An address fit for a log line: the local part hidden."""
    local, _, domain = addr.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


class GroupCommitWriter:
    """One writer thread storing raw messages; each transaction takes everything that is waiting (group commit)."""

    def __init__(self, engine: Engine, max_batch: int = 200) -> None:
        self.engine, self.max_batch = engine, max_batch
        self._queue: stdqueue.SimpleQueue[tuple[bytes, str, Future] | None] = stdqueue.SimpleQueue()
        self._dbapi = None   # the writer's own driver connection on SQLite, opened in its thread
        self._thread = threading.Thread(target=self._run, name="smtp-store", daemon=True)
        self._thread.start()

    def submit(self, raw: bytes, origin: str) -> Future:
        """Queue one message; the future resolves to its intake id once its transaction has committed."""
        fut: Future = Future()
        self._queue.put((raw, origin, fut))
        return fut

    def shutdown(self, wait: bool = True) -> None:
        """Store what was submitted before this call, then stop the thread."""
        self._queue.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                return
            batch, stop = [item], False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except stdqueue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            # A sender that hung up has cancelled its wait: nobody will see a 250, so its message is not
            # stored (it will send it again). The others are now running and can no longer be cancelled.
            batch = [b for b in batch if b[2].set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._store(batch)
            except Exception as e:  # noqa: BLE001 - this thread must outlive any surprise
                log.error("the intake writer failed on a batch", exc_info=True)
                for _raw, _origin, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)

    def _insert(self, batch: list[tuple[bytes, str, Future]]) -> list[int]:
        # Rows are written as queue.enqueue writes them: raw bytes sealed with the process's keyring when
        # TRIAGEBOT_ENCRYPTION_KEY is set (triagebot/crypto.py), the content hash of the plaintext.
        if self.engine.dialect.name == "sqlite":
            return self._insert_sqlite(batch)
        now = utcnow()
        rows = [{"channel": "email", "raw": crypto.seal(raw), "content_hash": queue.content_hash(raw), "origin": origin,
                 "delivery_key": None, "flags": [], "state": queue.QUEUED, "attempts": 0, "received_at": now,
                 "not_before": now} for raw, origin, _fut in batch]
        # one INSERT ... RETURNING for the whole batch; the ids come back in the order of the rows
        stmt = insert(Intake).returning(Intake.id, sort_by_parameter_order=True)
        with self.engine.begin() as conn:
            return [r[0] for r in conn.execute(stmt, rows)]

    def _insert_sqlite(self, batch: list[tuple[bytes, str, Future]]) -> list[int]:
        # On SQLite the statement itself costs microseconds and SQLAlchemy's execution path was most of
        # this thread's CPU, which the event loop then waits for (one GIL): the writer talks to the driver
        # directly, with SQLAlchemy's own converters, so the row is exactly what the ORM would write.
        if self._dbapi is None:
            dialect = self.engine.dialect
            table = Intake.__table__
            self._datetime = table.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
            self._flags = table.c.flags.type.dialect_impl(dialect).bind_processor(dialect)([])
            self._dbapi = self.engine.raw_connection()   # the engine's pragmas: WAL, busy timeout, autocommit
        now = self._datetime(utcnow())
        cur = self._dbapi.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            ids = []
            for raw, origin, _fut in batch:
                cur.execute(SQLITE_INSERT, ("email", crypto.seal(raw), now, queue.content_hash(raw), origin,
                                            queue.QUEUED, 0, now, self._flags))
                ids.append(cur.lastrowid)
            cur.execute("COMMIT")
            return ids
        except BaseException:
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._dbapi.invalidate()   # a fresh connection for the next batch, whatever went wrong
            self._dbapi = None
            raise
        finally:
            cur.close()

    def _store(self, batch: list[tuple[bytes, str, Future]]) -> None:
        try:
            ids = self._insert(batch)
        except (IntegrityError, DataError, sqlite3.IntegrityError, sqlite3.DataError) as e:
            if len(batch) == 1:
                batch[0][2].set_exception(e)
                return
            # one message the database refuses must not make its neighbours retry forever: each on its own
            for one in batch:
                self._store([one])
            return
        except Exception as e:  # noqa: BLE001 - storage is down or locked: every sender gets 451 and retries
            for _raw, _origin, fut in batch:
                fut.set_exception(e)
            return
        for (_raw, _origin, fut), intake_id in zip(batch, ids):
            fut.set_result(intake_id)


def hook_names(obj: object, prefixes: tuple[str, ...]) -> list[str]:
    """The names of obj's class that start with the prefixes, computed once per class.

    aiosmtpd's SMTP.__init__ finds its command methods, AUTH mechanisms and handler hooks with
    dir() and inspect.getmembers() on every connection, which walks a few hundred attributes and
    was a quarter of the CPU a connection costs. Those names belong to the classes, so the
    classes below list them once through __dir__ (only ever used for that introspection).
    """
    cls = type(obj)
    key = "_hook_names_" + "_".join(prefixes)
    names = cls.__dict__.get(key)
    if names is None:
        names = sorted(n for n in object.__dir__(obj) if n.startswith(prefixes))
        setattr(cls, key, names)
    return names


class IntakeHandler:
    """aiosmtpd handler: checks recipients, stores DATA durably, answers with the status string."""

    def __init__(self, writer: GroupCommitWriter, domains: tuple[str, ...]):
        self.writer, self.domains = writer, tuple(d.lower() for d in domains)

    def __dir__(self) -> list[str]:
        return hook_names(self, ("handle_", "auth_"))

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
        try:
            intake_id = await asyncio.wrap_future(self.writer.submit(bytes(raw), f"smtp:{peer}"))
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

    def __dir__(self) -> list[str]:
        return hook_names(self, ("smtp_", "auth_"))

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

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every path with the email package's RFC 5322 parser, a seventh of the CPU of a
        # message; the everyday form is read with one regular expression and the rest still goes to it
        m = SIMPLE_PATH.fullmatch(arg)
        if m is None:
            return super()._getaddr(arg)
        addr = m.group("addr")
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, m.group("rest") or ""

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
        LimitedSMTP.max_per_minute = self.settings.smtp_max_messages_per_minute
        kwargs = dict(self.SMTP_kwargs)
        return LimitedSMTP(self.handler, **kwargs)


def build_controller(settings: Settings) -> tuple[IntakeController, GroupCommitWriter]:
    """The listener for the settings: size limit, optional STARTTLS and AUTH; stop both when done."""
    engine, _sessions = open_db(settings.database_url)
    writer = GroupCommitWriter(engine)
    handler = IntakeHandler(writer, settings.mail_domains)
    # the greeting's host name, looked up once: aiosmtpd would call socket.getfqdn() for every connection
    kwargs: dict = {"data_size_limit": settings.smtp_max_size, "enable_SMTPUTF8": True,
                    "decode_data": False, "ident": "triagebot ESMTP", "server_hostname": socket.getfqdn()}
    if settings.smtp_tls_cert and settings.smtp_tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(settings.smtp_tls_cert, settings.smtp_tls_key)
        kwargs["tls_context"] = ctx
    auth = _authenticator(settings.smtp_auth_users)
    if auth:
        kwargs["authenticator"] = auth
        kwargs["auth_require_tls"] = bool(settings.smtp_tls_cert)
    return IntakeController(handler, settings, **kwargs), writer


def serve(settings: Settings) -> None:
    """Run the listener until SIGTERM/SIGINT."""
    import signal
    import threading
    controller, writer = build_controller(settings)
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
        writer.shutdown(wait=True)
