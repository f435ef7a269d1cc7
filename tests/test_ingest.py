"""`triagebot ingest`: threading rules, duplicates, ignored mail, Slack threads, subject references."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select

from triagebot.cli import main
from triagebot.db.engine import open_db
from triagebot.db.tables import Case, CaseEvent, Intake, MessageRow

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

EXPECTED = {
    "01-en-new.eml": ("created", "CASE-000001"),
    "02-en-reply.eml": ("threaded", "CASE-000001"),
    "03-en-duplicate.eml": ("duplicate", "CASE-000001"),
    "04-sv-autoreply.eml": ("ignored", None),
    "05-sv-new.eml": ("created", "CASE-000002"),
    "06-es-new.eml": ("created", "CASE-000003"),
    "07-slack-root.json": ("created", "CASE-000004"),
    "08-slack-thread-reply.json": ("threaded", "CASE-000004"),
    "09-subject-tag-same-customer.eml": ("threaded", "CASE-000001"),
    "10-subject-tag-other-customer.eml": ("created", "CASE-000005"),
    "11-bounce.eml": ("ignored", None),
}


def ingest(capsys, monkeypatch, url: str, *paths) -> list[dict]:
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", url)
    status = main(["ingest", *map(str, paths), "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return status, out


def test_samples_take_the_right_actions(db_url, capsys, monkeypatch):
    status, out = ingest(capsys, monkeypatch, db_url, SAMPLES)
    assert status == 0
    got = {Path(o["input"]).name: (o["action"], o["case"]) for o in out}
    assert got == EXPECTED
    for o in out:
        assert o["message_id"]
    # the cross-customer reference is noted on the new case, not merged
    _e, sessions = open_db(db_url)
    with sessions() as s:
        ev = s.scalars(select(CaseEvent).join(Case).where(Case.reference == "CASE-000005",
                                                           CaseEvent.kind == "created")).one()
        assert "CASE-000001" in ev.detail["why"] and "another customer" in ev.detail["why"]
        threaded = s.scalars(select(CaseEvent).join(Case).where(Case.reference == "CASE-000001",
                                                                 CaseEvent.kind == "threaded")).all()
        assert {e.detail["rule"] for e in threaded} == {"reply_headers", "subject_reference"}
        assert s.scalar(select(MessageRow).where(MessageRow.action == "ignored").limit(1)) is not None
        assert {i.state for i in s.scalars(select(Intake))} == {"done"}


def test_ingesting_the_same_folder_again_changes_nothing(db_url, capsys, monkeypatch):
    ingest(capsys, monkeypatch, db_url, SAMPLES)
    _e, sessions = open_db(db_url)
    with sessions() as s:
        cases = s.query(Case).count()
    _status, out = ingest(capsys, monkeypatch, db_url, SAMPLES)
    assert {o["action"] for o in out} <= {"duplicate", "ignored"}
    with sessions() as s:
        assert s.query(Case).count() == cases


def _mail(tmp: Path, name: str, sender: str, subject: str, body: str, **headers) -> Path:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, "support@support.example.net", subject
    m["Message-ID"] = f"<{name}@{sender.split('@')[1]}>"
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    p = tmp / f"{name}.eml"
    p.write_bytes(bytes(m))
    return p


def test_same_subject_from_two_customers_is_never_merged(db_url, tmp_path, capsys, monkeypatch):
    a = _mail(tmp_path, "a", "ops@one.example", "No data", "Our 5 meters have no data since this morning.")
    b = _mail(tmp_path, "b", "ops@two.example", "No data", "Our 5 meters have no data since this morning.")
    _s, out = ingest(capsys, monkeypatch, db_url, a, b)
    assert [o["action"] for o in out] == ["created", "created"]
    assert out[0]["case"] != out[1]["case"]


def test_same_content_from_the_same_sender_without_message_id_is_a_duplicate(db_url, tmp_path, capsys, monkeypatch):
    raw = b"From: ops@one.example\r\nTo: support@support.example.net\r\nSubject: SMS\r\n\r\nSMS to our alarm panels are not delivered.\r\n"
    (tmp_path / "x1.eml").write_bytes(b"Received: from a by b; Mon, 23 Nov 2026 10:00:00 +0000\r\n" + raw)
    (tmp_path / "x2.eml").write_bytes(b"Received: from c by d; Mon, 23 Nov 2026 10:05:00 +0000\r\n" + raw)
    _s, out = ingest(capsys, monkeypatch, db_url, tmp_path / "x1.eml", tmp_path / "x2.eml")
    assert [o["action"] for o in out] == ["created", "duplicate"]
    assert out[0]["case"] == out[1]["case"]


def test_subject_prefixes_and_reference_formats_thread(db_url, tmp_path, capsys, monkeypatch):
    first = _mail(tmp_path, "f", "a@kund.example", "Larm ringer inte", "Hej, våra 3 larm ringer inte ut.")
    _s, out = ingest(capsys, monkeypatch, db_url, first)
    ref = out[0]["case"]
    replies = [_mail(tmp_path, f"r{i}", "b@kund.example", f"{prefix} [{ref}] Larm ringer inte", f"Fortfarande nere ({i}).")
               for i, prefix in enumerate(["SV:", "Sv: VB:", "AW: RE:", "RV:", "Vs:"])]
    _s, out = ingest(capsys, monkeypatch, db_url, *replies)
    assert [(o["action"], o["case"]) for o in out] == [("threaded", ref)] * len(replies)


def test_unreadable_inputs_get_one_line_errors_and_exit_1_but_the_rest_is_processed(db_url, tmp_path, capsys, monkeypatch):
    tmp_path = tmp_path / "inputs"   # apart from the SQLite file of db_url
    tmp_path.mkdir()
    (tmp_path / "a-empty.eml").write_bytes(b"")
    (tmp_path / "b-junk.eml").write_bytes(b"\x00\xff\xfe\x00 not a message \x00")
    (tmp_path / "c-bad.json").write_text("{not json")
    shutil.copy(SAMPLES / "01-en-new.eml", tmp_path / "d-good.eml")
    status, out = ingest(capsys, monkeypatch, db_url, tmp_path, tmp_path / "missing.eml")
    assert status == 1
    names = [Path(o["input"]).name for o in out]
    assert names == ["a-empty.eml", "b-junk.eml", "c-bad.json", "d-good.eml", "missing.eml"]
    for o in out:
        if Path(o["input"]).name != "d-good.eml":
            assert "\n" not in o["error"] and o["error"]
    assert out[3]["action"] == "created"


def test_status_json_counts(db_url, capsys, monkeypatch):
    ingest(capsys, monkeypatch, db_url, SAMPLES)
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", db_url)
    assert main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    # 5 cases plus the outage parent linking the two customers without data in Germany (01 and 10)
    assert (st["messages"], st["cases"], st["queued"], st["failed"]) == (10, 6, 0, 0)


def test_triage_cli_never_prints_a_traceback(tmp_path):
    (tmp_path / "junk.eml").write_bytes(b"\x00\x01\x02")
    r = subprocess.run([sys.executable, "-m", "triagebot.cli", "triage", str(tmp_path), str(SAMPLES / "01-en-new.eml"),
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert "error" in lines[0] and lines[1]["disposition"] == "case"
