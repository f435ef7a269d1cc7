"""SIGKILL the real `triagebot smtp` process under load: every 250 survives the restart, none is stored twice.

The big version (thousands of messages, beside smtp-sink's figures) is bench/smtp_bench.py.
"""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SENDER, RECIPIENT = "load@customer.example", "support@support.example.net"
CLIENTS, PER_CLIENT, KILL_AFTER = 6, 150, 120
MSGID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.IGNORECASE | re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"the listener exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"the listener did not listen on {port} within {timeout}s")


def message(mid: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: load {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
            f"no data on SIM 8946000000000000001 ({mid})\r\n").encode()


class Listener:
    """`triagebot smtp` as a child process with its SQLite file in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "triagebot.db"
        self.port = free_port()
        self.env = {**os.environ, "TRIAGEBOT_DATABASE_URL": f"sqlite:///{self.db}",
                    "TRIAGEBOT_MAIL_DOMAINS": "support.example.net",
                    "TRIAGEBOT_SMTP_MAX_CONNECTIONS_PER_CLIENT": "100"}
        self.log = tmp_path / "listener.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "triagebot.cli", "smtp", "--port", str(self.port)],
                                         cwd=ROOT, env=self.env, stdout=log, stderr=log)
        wait_port(self.port, self.proc)

    def kill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def stored_ids(self) -> list[str]:
        with sqlite3.connect(self.db) as c:
            raws = [r[0] for r in c.execute("SELECT raw FROM intake")]
        return [m.group(1).decode() for m in (MSGID.search(r) for r in raws) if m]


def test_sigkill_under_load_loses_no_acknowledged_message_and_stores_none_twice(tmp_path):
    listener = Listener(tmp_path)
    listener.start()
    acked: set[str] = set()
    errors: list[str] = []
    lock, killed = threading.Lock(), threading.Event()

    def client(n: int) -> None:
        conn = None
        for i in range(PER_CLIENT):
            if killed.is_set():
                return
            mid = f"k{n}-{i}@kill.test"
            try:
                conn = conn or smtplib.SMTP("127.0.0.1", listener.port, timeout=10)
                conn.sendmail(SENDER, [RECIPIENT], message(mid))
            except (OSError, smtplib.SMTPException) as e:
                with lock:
                    errors.append(f"{mid}: {type(e).__name__}")
                return  # the listener is gone; a message without a 250 is the sender's to retry
            with lock:
                acked.add(mid)   # sendmail returned: the listener answered 250 to this DATA

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                if len(acked) >= KILL_AFTER:
                    break
            time.sleep(0.001)
        with lock:
            assert len(acked) >= KILL_AFTER, f"only {len(acked)} messages acknowledged before the deadline"
        assert listener.kill() == -signal.SIGKILL
        killed.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert len(acked) < CLIENTS * PER_CLIENT, "the load was over before the kill"
        assert errors, "no client noticed the kill, so it did not happen in the middle of the load"

        listener.start()
        with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as c:
            c.sendmail(SENDER, [RECIPIENT], message("after-restart@kill.test"))
    finally:
        listener.stop()

    stored = listener.stored_ids()
    lost = acked - set(stored)
    duplicated = {mid for mid in stored if stored.count(mid) > 1}
    assert lost == set(), f"{len(lost)} messages got a 250 but are not stored"
    assert duplicated == set()
    assert "after-restart@kill.test" in stored
    # the only rows beyond the acknowledged ones are those committed as the kill cut off their 250
    assert len(set(stored) - acked - {"after-restart@kill.test"}) <= CLIENTS

    # and through processing: a worker turns every stored message into exactly one message row in one case
    processed_exactly_once(listener.db, set(stored))


def processed_exactly_once(db: Path, expected: set[str]) -> None:
    """Run a worker on the listener's database until the queue is empty; every stored message must end up
    as one message row in one case, with that case's created event, and every intake row done."""
    from sqlalchemy import select

    from triagebot.db.engine import open_db
    from triagebot.db.tables import Case, CaseEvent, Intake, MessageRow
    from triagebot.settings import Settings
    from triagebot.worker import Worker

    url = f"sqlite:///{db}"
    Worker(Settings(database_url=url, mail_domains=("support.example.net",))).run(until_empty=True)
    _engine, sessions = open_db(url)
    with sessions() as s:
        states = {r.id: r.state for r in s.scalars(select(Intake))}
        rows = list(s.scalars(select(MessageRow)))
        created = {e.case_id for e in s.scalars(select(CaseEvent).where(CaseEvent.kind == "created"))}
        cases = {c.id for c in s.scalars(select(Case).where(Case.kind == "case"))}
    assert set(states.values()) == {"done"}, {k: v for k, v in states.items() if v != "done"}
    mids = [m.message_id.strip("<>") for m in rows]
    assert sorted(mids) == sorted(expected)                    # each stored message once, none twice, none lost
    assert sorted(m.intake_id for m in rows) == sorted(states)  # one message row per intake row
    assert {m.action for m in rows} == {"created"} and len({m.case_id for m in rows}) == len(rows)
    assert {m.case_id for m in rows} == cases == created       # each case has its message and its created event


def test_the_listener_protocol_finds_the_same_commands_and_hooks_as_plain_aiosmtpd():
    """The listener lists its hook names once per class (a speed-up); aiosmtpd must still find them all."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    from triagebot.intake.smtp import IntakeHandler, LimitedSMTP

    class PlainHandler:   # the same hooks, without the cached __dir__
        handle_RCPT = IntakeHandler.handle_RCPT
        handle_DATA = IntakeHandler.handle_DATA

    loop = asyncio.new_event_loop()
    try:
        ours = LimitedSMTP(IntakeHandler(None, ("support.example.net",)), loop=loop, hostname="t")
        plain = SMTP(PlainHandler(), loop=loop, hostname="t")
    finally:
        loop.close()
    assert set(ours._smtp_methods) == set(plain._smtp_methods) and "DATA" in ours._smtp_methods
    assert set(ours._auth_methods) == set(plain._auth_methods) == {"LOGIN", "PLAIN"}
    assert set(ours._handle_hooks) == {"RCPT", "DATA"}
    assert ours._smtp_methods["MAIL"].__func__ is LimitedSMTP.smtp_MAIL   # our override, not the base one


def _read(fn, arg):
    try:
        return fn(arg)
    except Exception as e:  # noqa: BLE001 - both readers must fail alike too
        return type(e).__name__


def test_the_fast_address_reader_agrees_with_aiosmtpd():
    """The listener reads everyday MAIL/RCPT paths with a regular expression; it must agree with aiosmtpd."""
    import asyncio

    from aiosmtpd.smtp import SMTP
    from hypothesis import given, settings, strategies as st

    from triagebot.intake.smtp import SIMPLE_PATH, IntakeHandler, LimitedSMTP

    loop = asyncio.new_event_loop()
    proto = LimitedSMTP(IntakeHandler(None, ("support.example.net",)), loop=loop, hostname="t")
    loop.close()
    chars = st.sampled_from(list("aZ09.-+_=!#%'`{}~/?^&*$|@<>()\"[]:;, \t\\é") + ["SIZE=10", "BODY=8BITMIME"])
    noise = st.lists(chars, max_size=24).map("".join)
    word = st.text(alphabet="aZ09.-+_=!#/'é\"()[] ", min_size=0, max_size=12)
    shaped = st.builds(lambda lead, local, domain, rest: f"{lead}<{local}@{domain}>{rest}",
                       st.sampled_from(["", " ", "\t", "  "]), word, word,
                       st.sampled_from(["", " SIZE=100", "  BODY=8BITMIME SMTPUTF8", " (c)", " ", "SIZE=1",
                                        " SIZE=1 ", "\tX=y"]))
    seen_fast = []

    @settings(max_examples=3000, deadline=None)
    @given(st.one_of(noise, shaped))
    def agree(arg):
        if SIMPLE_PATH.fullmatch(arg):
            seen_fast.append(arg)
        assert _read(proto._getaddr, arg) == _read(lambda a: SMTP._getaddr(proto, a), arg)

    agree()
    assert seen_fast, "the examples never reached the fast path"
    for arg in ("<ana@customer.example>", " <a.b+c@x.example> SIZE=100 BODY=8BITMIME", "<>", '<"a b"@x.example>',
                "<@relay.example:ana@customer.example>", "<ana@[127.0.0.1]>", "<ana@customer.example> (note)"):
        assert _read(proto._getaddr, arg) == _read(lambda a: SMTP._getaddr(proto, a), arg)


def test_a_client_vanishing_while_its_message_commits_does_not_stop_the_listener(tmp_path, monkeypatch):
    """A sender that hangs up before its 250 cancels the wait for the commit; the writer must live on."""
    from triagebot.intake import smtp as listener_module
    from triagebot.settings import Settings

    slow = threading.Event()
    real_insert = listener_module.GroupCommitWriter._insert

    def insert(self, batch):
        if slow.is_set():
            time.sleep(0.5)   # the commit takes a while: long enough for the client to be gone
        return real_insert(self, batch)

    monkeypatch.setattr(listener_module.GroupCommitWriter, "_insert", insert)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", smtp_port=free_port(),
                        mail_domains=("support.example.net",))
    controller, writer = listener_module.build_controller(settings)
    controller.start()
    try:
        slow.set()
        with socket.create_connection(("127.0.0.1", settings.smtp_port), timeout=10) as s:
            f = s.makefile("rwb")
            f.readline()
            for line in (b"HELO t", b"MAIL FROM:<a@customer.example>", b"RCPT TO:<support@support.example.net>",
                         b"DATA"):
                f.write(line + b"\r\n")
                f.flush()
                f.readline()
            f.write(message("gone@kill.test") + b".\r\n")
            f.flush()
            s.shutdown(socket.SHUT_RDWR)   # hang up without waiting for the answer
        time.sleep(0.1)
        slow.clear()
        with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=10) as c:
            c.sendmail(SENDER, [RECIPIENT], message("next@kill.test"))
    finally:
        controller.stop()
        writer.shutdown()
    with sqlite3.connect(tmp_path / "db.sqlite") as c:
        ids = [MSGID.search(r[0]).group(1).decode() for r in c.execute("SELECT raw FROM intake")]
    assert "next@kill.test" in ids


def test_listener_rows_are_ordinary_queue_rows(db_url):
    """The writer's INSERT (driver-level on SQLite, Core elsewhere) gives rows the queue and the ORM read as usual."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import select

    from triagebot.db import queue
    from triagebot.db.engine import open_db
    from triagebot.db.tables import Intake
    from triagebot.intake.smtp import build_controller
    from triagebot.settings import Settings

    settings = Settings(database_url=db_url, smtp_port=free_port(), mail_domains=("support.example.net",))
    controller, writer = build_controller(settings)
    controller.start()
    before = datetime.now(timezone.utc)
    try:
        with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=10) as c:
            for mid in ("one@rows.test", "two@rows.test"):
                c.sendmail(SENDER, [RECIPIENT], message(mid))
    finally:
        controller.stop()
        writer.shutdown()
    _engine, sessions = open_db(db_url)
    with sessions() as s:
        rows = list(s.scalars(select(Intake).order_by(Intake.id)))
    assert [r.raw for r in rows] == [message("one@rows.test"), message("two@rows.test")]
    for r in rows:
        assert (r.channel, r.state, r.attempts, r.flags, r.delivery_key) == ("email", "queued", 0, [], None)
        assert r.content_hash == queue.content_hash(r.raw) and r.origin == "smtp:127.0.0.1"
        received = r.received_at if r.received_at.tzinfo else r.received_at.replace(tzinfo=timezone.utc)
        assert before - timedelta(seconds=5) <= received <= datetime.now(timezone.utc)
    claimed = queue.claim(sessions, "test-worker", limit=10)
    assert [c.raw for c in claimed] == [r.raw for r in rows]
