"""Encryption at rest of raw messages: the format, keys and rotation, and the intake queue on SQLite and PostgreSQL."""
from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from triagebot import cli, crypto
from triagebot.db import queue
from triagebot.db.engine import make_engine, migrate
from triagebot.db.tables import Intake
from triagebot.settings import ROOT, Settings

KEY_A = crypto.generate_key()
KEY_B = crypto.generate_key()
MAIL = (b"From: Alice <alice@acme.example>\r\nSubject: SIM 89460712345678901234 down\r\n\r\n"
        b"Call me on +46 70 123 45 67\r\n\xff\x00binary attachment")


@pytest.fixture(autouse=True)
def _no_keyring_leaks():
    """Each test starts without a configured keyring and leaves none behind (cli.main configures one)."""
    crypto.configure(None)
    yield
    crypto.reset()


def _sessions(url: str):
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _stored(sessions, intake_id: int) -> Intake:
    with sessions() as s:
        return s.get(Intake, intake_id)


# -- the format -----------------------------------------------------------------------------------------------

def test_a_sealed_blob_hides_the_message_and_opens_to_it():
    ring = crypto.Keyring.from_setting(KEY_A)
    blob = ring.seal(MAIL)
    assert crypto.is_sealed(blob) and blob.startswith(crypto.MAGIC)
    for secret in (b"alice@acme.example", b"89460712345678901234", b"Subject", b"123 45 67"):
        assert secret not in blob
    assert ring.seal(MAIL) != blob                      # a fresh nonce every time
    assert ring.open(blob) == MAIL


def test_plaintext_from_before_encryption_reads_as_it_is():
    ring = crypto.Keyring.from_setting(KEY_A)
    assert ring.open(MAIL) == MAIL
    assert crypto.open_blob(b'{"type": "message"}', None) == b'{"type": "message"}'


def test_a_wrong_key_is_named_as_such():
    blob = crypto.Keyring.from_setting(KEY_A).seal(MAIL)
    wrong = crypto.Keyring.from_setting(KEY_B)
    with pytest.raises(crypto.CryptoError, match="not among the configured keys") as e:
        wrong.open(blob)
    assert crypto.key_id(crypto.parse_key(KEY_A)).hex() in str(e.value)
    with pytest.raises(crypto.CryptoError, match="ENCRYPTION_KEY is not set"):
        crypto.open_blob(blob, None)


def test_an_altered_blob_fails_authentication():
    ring = crypto.Keyring.from_setting(KEY_A)
    blob = bytearray(ring.seal(MAIL))
    blob[-1] ^= 1
    with pytest.raises(crypto.CryptoError, match="fails authentication"):
        ring.open(bytes(blob))
    with pytest.raises(crypto.CryptoError, match="truncated"):
        ring.open(bytes(blob[:20]))


def test_rotation_seals_with_the_first_key_and_opens_with_any():
    old_blob = crypto.Keyring.from_setting(KEY_A).seal(MAIL)
    ring = crypto.Keyring.from_setting(f"{KEY_B}, {KEY_A}")
    assert ring.open(old_blob) == MAIL
    new_blob = ring.seal(MAIL)
    assert new_blob[len(crypto.MAGIC):len(crypto.MAGIC) + crypto.KEY_ID_LEN] == crypto.key_id(crypto.parse_key(KEY_B))
    with pytest.raises(crypto.CryptoError):
        crypto.Keyring.from_setting(KEY_A).open(new_blob)


def test_keys_parse_from_base64_or_hex_and_a_bad_one_is_refused_without_echoing_it():
    raw = crypto.parse_key(KEY_A)
    assert len(raw) == 32 and crypto.parse_key(raw.hex()) == raw and crypto.parse_key(KEY_A.rstrip("=")) == raw
    with pytest.raises(crypto.CryptoError, match="32 bytes") as e:
        crypto.parse_key("hunter2-not-a-key")
    assert "hunter2" not in str(e.value)
    assert crypto.Keyring.from_setting("  ") is None and crypto.Keyring.from_setting(None) is None


def test_the_key_never_shows_in_a_repr():
    ring = crypto.Keyring.from_setting(KEY_A)
    settings = Settings.load(env={"TRIAGEBOT_ENCRYPTION_KEY": KEY_A})
    assert settings.encryption_key == KEY_A
    assert KEY_A not in repr(settings) and KEY_A not in repr(ring)
    assert crypto.parse_key(KEY_A).hex() not in repr(ring)


def test_the_module_prints_a_usable_key():
    out = subprocess.run([sys.executable, "-m", "triagebot.crypto"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert len(crypto.parse_key(out)) == 32 and out != crypto.generate_key()


def test_the_cli_refuses_a_malformed_key_with_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("TRIAGEBOT_ENCRYPTION_KEY", "too-short")
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "TRIAGEBOT_ENCRYPTION_KEY must be 32 bytes" in err and "Traceback" not in err


# -- the intake queue, on both databases ------------------------------------------------------------------------

def test_enqueue_stores_sealed_bytes_and_claim_returns_the_plaintext(db_url):
    s = _sessions(db_url)
    with crypto.using(KEY_A):
        i = queue.enqueue(s, "email", MAIL)
        stored = bytes(_stored(s, i).raw)
        assert crypto.is_sealed(stored) and b"alice@acme.example" not in stored
        [c] = queue.claim(s, "w")
    assert (c.id, c.raw) == (i, MAIL)


def test_rows_stored_before_encryption_still_claim(db_url):
    s = _sessions(db_url)
    i = queue.enqueue(s, "email", MAIL)                 # no key yet
    assert bytes(_stored(s, i).raw) == MAIL
    with crypto.using(KEY_A):
        assert [c.raw for c in queue.claim(s, "w")] == [MAIL]


def test_a_wrong_key_parks_the_row_once_and_requeue_after_fixing_it_works(db_url):
    s = _sessions(db_url)
    with crypto.using(KEY_A):
        bad = queue.enqueue(s, "email", MAIL)
    with crypto.using(KEY_B):
        good = queue.enqueue(s, "email", b"Subject: fine\r\n\r\nok")
        got = queue.claim(s, "w", limit=10)
        assert [c.id for c in got] == [good]                # the readable row is not held back
        row = _stored(s, bad)
        assert row.state == queue.FAILED and "undecryptable" in row.flags
        assert "not among the configured keys" in row.last_error and "wrong TRIAGEBOT_ENCRYPTION_KEY" in row.last_error
        assert queue.claim(s, "w", limit=10) == []          # parked: no crash loop, no retry storm
        assert _stored(s, bad).attempts == 1
    with crypto.using(KEY_A):
        assert queue.requeue(s, [bad]) == 1
        assert [(c.id, c.raw) for c in queue.claim(s, "w")] == [(bad, MAIL)]


def test_a_missing_key_parks_sealed_rows_with_a_clear_error(db_url):
    s = _sessions(db_url)
    with crypto.using(KEY_A):
        i = queue.enqueue(s, "email", MAIL)
    with crypto.using(None):
        assert queue.claim(s, "w") == []
    row = _stored(s, i)
    assert row.state == queue.FAILED and "TRIAGEBOT_ENCRYPTION_KEY is not set" in row.last_error


def test_claim_one_parks_and_raises_on_a_wrong_key(db_url):
    s = _sessions(db_url)
    with crypto.using(KEY_A):
        i = queue.enqueue(s, "email", MAIL)
        assert queue.claim_one(s, i, "cli").raw == MAIL
    with crypto.using(KEY_A):
        j = queue.enqueue(s, "email", MAIL)
    with crypto.using(KEY_B), pytest.raises(crypto.CryptoError, match=f"intake {j}: encryption"):
        queue.claim_one(s, j, "cli")
    assert _stored(s, j).state == queue.FAILED          # the parking committed before the error was raised


def test_sealed_rows_in_the_table_hold_no_plaintext(db_url):
    s = _sessions(db_url)
    with crypto.using(KEY_A):
        for n in range(3):
            queue.enqueue(s, "slack", b'{"user": "U0ALICE", "text": "sim %d down"}' % n, delivery_key=f"slack:{n}")
    with s() as ss:
        raws = [bytes(r) for r in ss.scalars(select(Intake.raw))]
    assert len(raws) == 3 and all(crypto.is_sealed(r) and b"U0ALICE" not in r for r in raws)
