"""Log redaction: addresses, phone numbers and SIM identifiers are masked in every log line; useful text stays."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from triagebot.logs import RedactingFilter, install, redact
from triagebot.settings import ROOT

REDACTED = [
    ("mail from Bob.Smith+fleet@acme.example.com", "mail from ***@acme.example.com"),
    ("rcpt <support@support.example.net>", "rcpt <***@support.example.net>"),
    ("call +46 70 123 45 67 now", "call [phone] now"),
    ("ring 070-123 45 67", "ring [phone]"),
    ("movil +34 612 345 678", "movil [phone]"),
    ("us (555) 123-4567 or 555-123-4567", "us [phone] or [phone]"),
    ("växel (08) 123 456 78", "växel [phone]"),
    ("intl 0046-70-1234567", "intl [phone]"),
    ("ICCID 8946071234567890123F broken", "ICCID [id] broken"),
    ("IMSI 240071234567890, IMEI 356938035643809", "IMSI [id], IMEI [id]"),
    ("msisdn=46701234567;", "msisdn=[id];"),
]
KEPT = [
    "intake 12345 -> created CASE-000123 (message 77)",
    "at 2026-11-24 10:00:00 slack ts 1732450000.123456",
    "peer ('127.0.0.1', 8025) size 26214400 bytes",
    "confidence 0.87 < 0.50, spacy 3.8.18",
    "uuid 3f2a1234567890ab and 0x123456789a",
    "b***@acme.example was already redacted",
]


@pytest.mark.parametrize("text,expected", REDACTED)
def test_personal_data_is_masked(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", KEPT)
def test_ids_dates_timestamps_and_addresses_of_machines_stay(text):
    assert redact(text) == text


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate, logger.level = False, logging.INFO
    return logger, out


def test_the_filter_redacts_arguments_exceptions_and_stacks():
    logger, out = _logger("test_logs.direct")
    logger.info("refused %s from %s", "alice@acme.example", "+46 70 123 45 67")
    try:
        raise ValueError("cannot parse mail from carol@acme.example about 8946071234567890123")
    except ValueError:
        logger.error("intake %s failed", 7, exc_info=True)
    logger.warning("where: %s", "dave@acme.example", stack_info=True)
    text = out.getvalue()
    for secret in ("alice@", "123 45 67", "carol@", "8946071234567890123", "dave@"):
        assert secret not in text
    assert "refused ***@acme.example from [phone]" in text
    assert "ValueError: cannot parse mail from ***@acme.example about [id]" in text
    assert "intake 7 failed" in text and "Traceback" in text


def test_install_reaches_records_propagated_from_child_loggers():
    root = logging.getLogger()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root.addHandler(handler)
    try:
        flt = install()
        assert install() is flt                              # idempotent: one filter, not two
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logging.getLogger("triagebot.some.child").warning("reply to %s", "erin@freemail.example")
    finally:
        root.removeHandler(handler)
        for f in [f for f in root.filters if isinstance(f, RedactingFilter)]:
            root.removeFilter(f)
    assert out.getvalue().strip() == "reply to ***@freemail.example"


def test_the_cli_installs_redaction_for_every_command(tmp_path):
    code = ("import logging, sys; from triagebot import cli; cli.main(['--actor', 't', 'migrate']);"
            "logging.getLogger('triagebot.x').warning('from %s', 'frank@acme.example')")
    env = {**os.environ, "TRIAGEBOT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    env.pop("TRIAGEBOT_ENCRYPTION_KEY", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from ***@acme.example" in done.stderr and "frank@" not in done.stderr
