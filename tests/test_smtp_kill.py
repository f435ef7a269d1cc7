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
