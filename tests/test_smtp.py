"""The SMTP listener on a real port with smtplib as the client."""
from __future__ import annotations

import smtplib
import socket

import pytest
from sqlalchemy import select

from triagebot.db.engine import open_db
from triagebot.db.tables import Intake
from triagebot.intake.smtp import build_controller
from triagebot.settings import Settings

MAIL = b"From: a@customer.example\r\nTo: support@support.example.net\r\nSubject: hi\r\n\r\nno data on 3 meters\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listener(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", smtp_port=free_port(),
                        mail_domains=("support.example.net",), smtp_max_size=10_000,
                        smtp_max_connections_per_client=3)
    controller, executor = build_controller(settings)
    controller.start()
    yield settings
    controller.stop()
    executor.shutdown()


def stored(settings) -> list[bytes]:
    _e, sessions = open_db(settings.database_url)
    with sessions() as s:
        return [r.raw for r in s.scalars(select(Intake).order_by(Intake.id))]


def test_accepted_mail_is_stored_raw_before_250(listener):
    with smtplib.SMTP(listener.smtp_host, listener.smtp_port) as c:
        code, msg = c.ehlo()
        assert code == 250
        refused = c.sendmail("a@customer.example", ["support@support.example.net"], MAIL)
        assert refused == {}
    [raw] = stored(listener)
    assert b"no data on 3 meters" in raw and raw.startswith(b"From: a@customer.example")


def test_other_recipients_get_550_never_relayed(listener):
    with smtplib.SMTP(listener.smtp_host, listener.smtp_port) as c:
        c.ehlo()
        c.mail("a@customer.example")
        code, _ = c.rcpt("victim@elsewhere.example")
        assert code == 550
        c.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@customer.example", ["victim@elsewhere.example"], MAIL)
    assert stored(listener) == []


BIG = MAIL + (b"y" * 998 + b"\r\n") * 20


def test_oversized_mail_announced_with_size_is_refused_with_552_at_mail(listener):
    with smtplib.SMTP(listener.smtp_host, listener.smtp_port) as c:
        c.ehlo()
        assert int(c.esmtp_features["size"]) == listener.smtp_max_size
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("a@customer.example", ["support@support.example.net"], BIG)
        assert e.value.smtp_code == 552
    assert stored(listener) == []


def test_oversized_mail_without_size_is_refused_with_552_at_data(listener):
    with smtplib.SMTP(listener.smtp_host, listener.smtp_port) as c:
        c.ehlo()
        assert c.mail("a@customer.example")[0] == 250   # no SIZE= parameter: only DATA can tell
        assert c.rcpt("support@support.example.net")[0] == 250
        code, _ = c.data(BIG)
        assert code == 552
        assert c.noop()[0] == 250                        # the session goes on after the refusal
    assert stored(listener) == []


def test_storage_failure_answers_451_so_the_sender_retries(listener):
    from triagebot.db.engine import open_db as od
    engine, _ = od(listener.database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE messages")  # messages references intake
        conn.exec_driver_sql("ALTER TABLE intake RENAME TO intake_gone")
    with smtplib.SMTP(listener.smtp_host, listener.smtp_port) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@customer.example", ["support@support.example.net"], MAIL)
        assert e.value.smtp_code == 451


def test_per_client_connection_limit_answers_421(listener):
    clients = [smtplib.SMTP(listener.smtp_host, listener.smtp_port) for _ in range(3)]
    try:
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP(listener.smtp_host, listener.smtp_port)
        assert e.value.smtp_code == 421
    finally:
        for c in clients:
            c.quit()


def test_with_a_key_the_stored_row_is_sealed_and_the_worker_still_processes_it(db_url):
    """SMTP intake seals raw mail at rest exactly as queue.enqueue does (TRIAGEBOT_ENCRYPTION_KEY)."""
    from triagebot import crypto
    from triagebot.db import queue
    from triagebot.db.tables import MessageRow
    from triagebot.worker import Worker

    key = crypto.generate_key()
    settings = Settings(database_url=db_url, smtp_port=free_port(), mail_domains=("support.example.net",),
                        encryption_key=key)
    with crypto.using(key):
        controller, writer = build_controller(settings)
        controller.start()
        try:
            with smtplib.SMTP(settings.smtp_host, settings.smtp_port) as c:
                assert c.sendmail("a@customer.example", ["support@support.example.net"], MAIL) == {}
        finally:
            controller.stop()
            writer.shutdown()
        _e, sessions = open_db(settings.database_url)
        with sessions() as s:
            [row] = s.scalars(select(Intake)).all()
        raw = bytes(row.raw)
        assert crypto.is_sealed(raw)
        for plain in (b"a@customer.example", b"no data on 3 meters", b"Subject: hi"):
            assert plain not in raw
        assert row.content_hash == queue.content_hash(MAIL)   # of the plaintext, as enqueue computes it
        Worker(settings).run(until_empty=True)
        with sessions() as s:
            row = s.get(Intake, row.id)
            [msg] = s.scalars(select(MessageRow)).all()
        assert row.state == queue.DONE and msg.intake_id == row.id and msg.sender == "a@customer.example"
