"""Retention and data-subject requests on SQLite and PostgreSQL: purge, export, forget, and the audit trail.

The data is seeded straight into the tables (no classifier): two cases of a registered customer, one old and one
recent, an old case of a private person, the raw mail (encrypted at rest), events, feedback, outgoing mail,
thread keys, and intake rows without a message (a duplicate, one still queued).
"""
from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from triagebot import cli, crypto, privacy
from triagebot.db import queue
from triagebot.db.engine import make_engine, migrate
from triagebot.db.tables import (Audit, Base, Case, CaseEvent, Feedback, Intake, MessageRow, Outbox, ThreadKey,
                                 utcnow)

KEY = crypto.generate_key()
NOW = utcnow()
OLD, RECENT = NOW - timedelta(days=120), NOW - timedelta(days=10)
ALICE, BOB, DAVE, ERIN = "alice@acme.example", "bob@acme.example", "dave@acme.example", "erin@freemail.example"
ALICE_TEXT = "Our meters in Uppsala stopped reporting, call me on +46 70 111 22 33"
BOB_TEXT = "Still broken here in the Kalmar depot"
DAVE_TEXT = "New order: fifty SIMs for the Malmö trucks"
ERIN_TEXT = "My pet tracker lost signal near Granada"
ICCID, DAVE_ICCID = "8946071234567890123", "8946079999999999999"
REPLY = "Hello Alice, we are looking into it"
# what must be gone after a purge at 90 days (all of it older), and what must stay (recent)
OLD_SECRETS = [ALICE, "Alice Andersson", ALICE_TEXT[:30], BOB, BOB_TEXT, ERIN, ERIN_TEXT, ICCID, "10.9.8.7",
               REPLY, "<a1@acme.example>", "uppsala"]
RECENT_SECRETS = [DAVE, DAVE_TEXT, DAVE_ICCID]


@pytest.fixture(autouse=True)
def _keyring():
    """Raw bytes are encrypted at rest in these tests, as in a deployment with a key; none leaks to others."""
    with crypto.using(KEY):
        yield
    crypto.reset()


def _sessions(url: str) -> sessionmaker:
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _mail(sender: str, name: str, msgid: str, subject: str, body: str, extra: str = "") -> bytes:
    return (f"From: {name} <{sender}>\r\nTo: support@support.example.net\r\nMessage-ID: {msgid}\r\n"
            f"Subject: {subject}\r\n{extra}\r\n{body}\r\n").encode()


def _intake(s, raw: bytes, at: datetime, state: str = "done", origin: str = "smtp:10.9.8.7:51234") -> Intake:
    row = Intake(channel="email", raw=crypto.seal(raw), content_hash=queue.content_hash(raw), origin=origin,
                 state=state, attempts=1, received_at=at, not_before=at, flags=[])
    s.add(row)
    s.flush()
    return row


def _case(s, customer: str, tier: str, subject: str, at: datetime, iccid: str = ICCID, **labels) -> Case:
    c = Case(customer=customer, customer_tier=tier, status="open", subject=subject, language="en",
             identifiers={"iccid": [iccid], "imsi": [], "msisdn": [], "imei": []},
             features={"service": labels.get("service"), "words": {w.lower(): 1 for w in subject.split()}},
             created_at=at, updated_at=at, blast_estimate=1, blast_tier="single", **labels)
    s.add(c)
    s.flush()
    c.reference = f"CASE-{c.id:06d}"
    return c


def _message(s, intake: Intake | None, case: Case, sender: str, name: str, msgid: str, subject: str, text: str,
             at: datetime, action: str, quoted: str = "", source: str = "email", iccid: str = ICCID,
             **labels) -> MessageRow:
    m = MessageRow(intake_id=intake.id if intake else None, case_id=case.id, source=source, message_id=msgid,
                   content_hash=f"h-{msgid}", sender=sender, sender_name=name, subject=subject, text=text,
                   quoted=quoted, disposition="case", action=action, language="en", blast_estimate=1,
                   blast_tier="single", identifiers={"iccid": [iccid], "imsi": [], "msisdn": [], "imei": []},
                   confidence={"category": 0.9}, model_versions={"classify": "m-2026-11"},
                   trail=[f"customer: {case.customer} (enterprise) (contact {sender})",
                          f"blast_radius: single (estimate 1) (ICCID {iccid})"],
                   received_at=at, **labels)
    s.add(m)
    s.flush()
    return m


def seed(sessions, *, queued: bool = False) -> dict[str, int]:
    """The test data; returns the ids the tests look at."""
    ids: dict[str, int] = {}
    labels = {"category": "incident", "service": "data", "severity": "high"}
    with sessions() as s, s.begin():
        # an old case of Acme: Alice reports, Bob replies quoting her; we replied to Alice
        ia = _intake(s, _mail(ALICE, "Alice Andersson", "<a1@acme.example>", f"SIM {ICCID} down", ALICE_TEXT), OLD)
        a = _case(s, "Acme Meters AB", "enterprise", f"SIM {ICCID} down in Uppsala", OLD, **labels)
        ma = _message(s, ia, a, ALICE, "Alice Andersson", "<a1@acme.example>", f"SIM {ICCID} down", ALICE_TEXT,
                      OLD, "created", **labels)
        quote = f"On Monday, Alice Andersson <{ALICE}> wrote:\n> {ALICE_TEXT}"
        ib = _intake(s, _mail(BOB, "Bob Berg", "<b1@acme.example>", "Re: SIM down", f"{BOB_TEXT}\n\n{quote}",
                              "In-Reply-To: <a1@acme.example>\r\n"), OLD + timedelta(hours=1))
        mb = _message(s, ib, a, BOB, "Bob Berg", "<b1@acme.example>", "Re: SIM down", BOB_TEXT,
                      OLD + timedelta(hours=1), "threaded", quoted=quote, **labels)
        s.add_all([
            CaseEvent(case_id=a.id, actor="bot", kind="created", at=OLD,
                      detail={"rule": "new_case", "why": f"no thread for <a1@acme.example> from {ALICE}",
                              "triage": {"message_id": "<a1@acme.example>", "subject": f"SIM {ICCID} down",
                                         "category": "incident", "severity": "high", "customer": "Acme Meters AB",
                                         "blast_radius": {"estimate": 1, "tier": "single",
                                                          "identifiers": {"iccid": [ICCID]}},
                                         "confidence": {"category": 0.9}}}),
            CaseEvent(case_id=a.id, actor="bot", kind="threaded", at=OLD + timedelta(hours=1),
                      detail={"rule": "reply_headers", "message_id": "<b1@acme.example>",
                              "changes": {"severity": ["medium", "high"]}}),
            CaseEvent(case_id=a.id, actor="slack:U0AGENT", kind="reply_queued", at=OLD + timedelta(hours=2),
                      detail={"via": "email", "to": ALICE, "answer": "ack", "text": REPLY}),
            Feedback(message_id=ma.id, case_id=a.id, actor="slack:U0AGENT", field="severity", old_value="medium",
                     new_value="high", channel="email", language="en", subject=f"SIM {ICCID} down", text=ALICE_TEXT,
                     created_at=OLD + timedelta(hours=2)),
            Outbox(case_id=a.id, kind="reply", recipient=ALICE, message_id="<r1@support.example.net>",
                   raw=f"To: {ALICE}\r\n\r\n{REPLY}".encode(), state="sent", created_at=OLD + timedelta(hours=2)),
            ThreadKey(key="msgid:<a1@acme.example>", case_id=a.id),
            ThreadKey(key="msgid:<b1@acme.example>", case_id=a.id),
        ])
        # a duplicate of Alice's mail: stored raw, no message row
        dup = _intake(s, _mail(ALICE, "Alice Andersson", "<a1@acme.example>", f"SIM {ICCID} down", ALICE_TEXT),
                      OLD + timedelta(minutes=5))
        # a recent case of Acme, from Dave
        idv = _intake(s, _mail(DAVE, "Dave Dahl", "<d1@acme.example>", "Order", DAVE_TEXT), RECENT,
                      origin="smtp:10.1.1.1:40000")
        b = _case(s, "Acme Meters AB", "enterprise", "Order of fifty SIMs", RECENT, iccid=DAVE_ICCID,
                  category="order", service="sim", severity="low")
        md = _message(s, idv, b, DAVE, "Dave Dahl", "<d1@acme.example>", "Order", DAVE_TEXT, RECENT, "created",
                      iccid=DAVE_ICCID, category="order", service="sim", severity="low")
        s.add_all([CaseEvent(case_id=b.id, actor="bot", kind="created", at=RECENT,
                             detail={"rule": "new_case", "triage": {"message_id": "<d1@acme.example>"}}),
                   Feedback(message_id=md.id, case_id=b.id, actor="slack:U0AGENT", field="category",
                            old_value="service_request", new_value="order", channel="email", language="en",
                            subject="Order", text=DAVE_TEXT, created_at=RECENT),
                   ThreadKey(key="msgid:<d1@acme.example>", case_id=b.id)])
        # an old case of a private person (free-mail): the customer is her address
        ie = _intake(s, _mail(ERIN, "Erin Ek", "<e1@freemail.example>", "Tracker", ERIN_TEXT), OLD)
        c = _case(s, ERIN, "standard", "Tracker offline", OLD, category="incident", service="data", severity="low")
        _message(s, ie, c, ERIN, "Erin Ek", "<e1@freemail.example>", "Tracker", ERIN_TEXT, OLD, "created",
                 category="incident", service="data", severity="low")
        # as ingest does: the reference is set after the first flush, and onupdate moved updated_at to now
        s.execute(update(Case).values(updated_at=Case.created_at))
        if queued:
            # an old row the worker has not got to yet (a stuck queue): mentions Alice
            ids["queued"] = _intake(s, _mail("ops@acme.example", "Ops", "<q1@acme.example>", "Fwd",
                                              f"forwarding for {ALICE}"), OLD, state="queued").id
        ids.update(case_a=a.id, case_b=b.id, case_c=c.id, alice=ma.id, bob=mb.id, dave=md.id, dup=dup.id,
                   intake_alice=ia.id, intake_bob=ib.id, intake_dave=idv.id)
    return ids


def dump(sessions, skip_intake: tuple[int, ...] = (), skip_tables: tuple[str, ...] = ()) -> str:
    """Every value of every table (raw bytes decrypted), lower-cased: to look for what must be gone."""
    parts = []
    with sessions() as s:
        conn = s.connection()
        for table in Base.metadata.sorted_tables:
            if table.name in skip_tables:
                continue
            for row in conn.execute(table.select()):
                d = dict(row._mapping)
                if table.name == "intake" and d["id"] in skip_intake:
                    continue
                for v in d.values():
                    if isinstance(v, (bytes, memoryview)):
                        parts.append(crypto.unseal(bytes(v)).decode("utf-8", "replace"))
                    else:
                        parts.append(json.dumps(v, ensure_ascii=False, default=str))
    return "\n".join(parts).lower()


def _day(d: datetime | None) -> str | None:
    return None if d is None else d.replace(tzinfo=None).isoformat(timespec="seconds")


def statistics(sessions) -> dict[str, list]:
    """The anonymised statistics purge and forget must keep: rows, labels, counts and dates."""
    with sessions() as s:
        return {
            "messages": [(m.id, m.case_id, m.source, m.disposition, m.action, m.language, m.category, m.service,
                          m.severity, m.blast_estimate, m.blast_tier, _day(m.received_at), m.confidence,
                          m.model_versions, {k: len(v) for k, v in m.identifiers.items()})
                         for m in s.scalars(select(MessageRow).order_by(MessageRow.id))],
            "cases": [(c.id, c.reference, c.status, c.kind, c.language, c.category, c.service, c.severity,
                       c.blast_estimate, c.blast_tier, c.customer_tier, _day(c.created_at), _day(c.updated_at),
                       None if "@" in (c.customer or "") or c.customer == privacy.INDIVIDUAL else c.customer,
                       {k: len(v) for k, v in c.identifiers.items()})
                      for c in s.scalars(select(Case).order_by(Case.id))],
            "intake": [(r.id, r.channel, r.state, _day(r.received_at))
                       for r in s.scalars(select(Intake).order_by(Intake.id))],
            "events": [(e.id, e.case_id, e.actor, e.kind, _day(e.at))
                       for e in s.scalars(select(CaseEvent).order_by(CaseEvent.id))],
            "feedback": [(f.id, f.message_id, f.case_id, f.field, f.old_value, f.new_value, f.channel, f.language,
                          _day(f.created_at)) for f in s.scalars(select(Feedback).order_by(Feedback.id))],
        }


def audit_rows(sessions) -> list[Audit]:
    with sessions() as s:
        return list(s.scalars(select(Audit).order_by(Audit.id)))


# -- purge ------------------------------------------------------------------------------------------------

def test_purge_removes_old_personal_data_and_keeps_the_statistics(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions)
    before, text_before = statistics(sessions), dump(sessions)
    assert all(x.lower() in text_before for x in OLD_SECRETS + RECENT_SECRETS)   # the check can see them

    report = privacy.purge(sessions, timedelta(days=90), "admin:dpo")

    text = dump(sessions)
    assert [x for x in OLD_SECRETS if x.lower() in text] == []
    assert all(x.lower() in text for x in RECENT_SECRETS)
    assert statistics(sessions) == before
    assert report["messages"] == 3 and report["intake"] == 4 and report["outbox"] == 1
    with sessions() as s:
        alice = s.get(MessageRow, ids["alice"])
        assert (alice.sender, alice.text, alice.subject, alice.message_id) == (None, "", None, None)
        assert "purged" in alice.flags and alice.identifiers["iccid"] == [privacy.MASK]
        assert alice.trail == ["customer: Acme Meters AB", "blast_radius: single"]
        raw = s.get(Intake, ids["intake_alice"])
        assert (bytes(raw.raw), raw.origin, "purged" in raw.flags) == (b"", "smtp", True)
        case_a, case_c = s.get(Case, ids["case_a"]), s.get(Case, ids["case_c"])
        assert (case_a.subject, case_a.features, case_a.customer) == (None, {}, "Acme Meters AB")
        assert case_c.customer == privacy.INDIVIDUAL
        created = s.scalars(select(CaseEvent).where(CaseEvent.case_id == ids["case_a"],
                                                    CaseEvent.kind == "created")).one()
        assert created.detail["triage"]["category"] == "incident" and created.detail["rule"] == "new_case"
        assert created.detail["triage"]["blast_radius"]["identifiers"] == {"iccid": [privacy.MASK]}
        assert s.get(Case, ids["case_b"]).subject == "Order of fifty SIMs"
        assert {k.key for k in s.scalars(select(ThreadKey))} == {"msgid:<d1@acme.example>"}
        dave = s.get(MessageRow, ids["dave"])
        assert (dave.sender, dave.text) == (DAVE, DAVE_TEXT)
    [row] = audit_rows(sessions)
    assert (row.actor, row.action) == ("admin:dpo", "purge")
    assert row.detail["result"]["messages"] == 3 and row.detail["cutoff"]


def test_purge_is_idempotent_and_touches_nothing_younger_than_the_age(db_url):
    sessions = _sessions(db_url)
    seed(sessions)
    nothing = privacy.purge(sessions, timedelta(days=200), "admin:dpo")
    assert {k: v for k, v in nothing.items() if k != "cutoff"} == dict.fromkeys(
        ("intake", "messages", "events", "feedback", "cases", "thread_keys", "outbox", "intake_still_queued"), 0)
    assert ALICE in dump(sessions)
    first = privacy.purge(sessions, timedelta(days=90), "admin:dpo")
    assert first["messages"] and first["cases"] and first["events"]
    text = dump(sessions, skip_tables=("audit",))
    again = privacy.purge(sessions, timedelta(days=90), "admin:dpo")
    assert {k: v for k, v in again.items() if k != "cutoff"} == dict.fromkeys(
        ("intake", "messages", "events", "feedback", "cases", "thread_keys", "outbox", "intake_still_queued"), 0)
    assert dump(sessions, skip_tables=("audit",)) == text
    assert [a.action for a in audit_rows(sessions)] == ["purge", "purge", "purge"]


def test_purge_leaves_rows_still_in_the_queue_and_counts_them(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions, queued=True)
    report = privacy.purge(sessions, timedelta(days=90), "admin:dpo")
    assert report["intake_still_queued"] == 1
    with sessions() as s:
        row = s.get(Intake, ids["queued"])
        assert row.state == "queued" and ALICE.encode() in crypto.unseal(row.raw)


def test_a_purged_row_that_is_requeued_is_parked_not_processed(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions)
    with sessions() as s, s.begin():
        s.get(Intake, ids["dup"]).state = "failed"
    privacy.purge(sessions, timedelta(days=90), "admin:dpo")
    assert queue.requeue(sessions, [ids["dup"]]) == 1
    assert queue.claim(sessions, "w") == []
    with sessions() as s:
        row = s.get(Intake, ids["dup"])
        assert row.state == "failed" and row.last_error == "raw message removed (purged)"


def test_the_purge_command_uses_the_configured_retention_and_the_actor(db_url, monkeypatch, capsys):
    sessions = _sessions(db_url)
    ids = seed(sessions)
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", db_url)
    monkeypatch.setenv("TRIAGEBOT_ENCRYPTION_KEY", KEY)
    monkeypatch.setenv("TRIAGEBOT_RETENTION_DAYS", "200")
    monkeypatch.setenv("USER", "carl")
    assert cli.main(["purge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == 0
    monkeypatch.setenv("TRIAGEBOT_RETENTION_DAYS", "100")
    assert cli.main(["purge", "--actor", "dpo-anna"]) == 0
    assert "messages=3" in capsys.readouterr().out
    assert cli.main(["purge", "--older-than", "1w"]) == 0
    assert "messages=1" in capsys.readouterr().out                     # Dave's, ten days old
    assert cli.main(["purge", "--older-than", "soon"]) == 2
    assert "not an age" in capsys.readouterr().err
    assert [(a.actor, a.action) for a in audit_rows(sessions)] == [
        ("admin:carl", "purge"), ("admin:dpo-anna", "purge"), ("admin:carl", "purge")]
    with sessions() as s:
        assert s.get(MessageRow, ids["dave"]).sender is None


@pytest.mark.parametrize("text,expected", [("90d", timedelta(days=90)), ("12w", timedelta(weeks=12)),
                                           ("36h", timedelta(hours=36)), ("30", timedelta(days=30))])
def test_ages_parse(text, expected):
    assert privacy.parse_age(text) == expected


@pytest.mark.parametrize("text", ["", "0d", "-5d", "90 days", "3m"])
def test_bad_ages_are_refused(text):
    with pytest.raises(ValueError):
        privacy.parse_age(text)


# -- export -----------------------------------------------------------------------------------------------

def _refs(data: dict) -> set[str]:
    return {c["reference"] for c in data["cases"]}


def test_export_by_name_domain_or_address_gives_everything_of_that_customer_only(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions)
    data = privacy.export(sessions, "acme meters ab", "admin:dpo")
    acme = {f"CASE-{ids['case_a']:06d}", f"CASE-{ids['case_b']:06d}"}
    assert _refs(data) == acme
    assert sorted(m["sender"] for m in data["messages"]) == [ALICE, BOB, DAVE]
    assert len(data["events"]) == 4 and len(data["feedback"]) == 2 and len(data["outbox"]) == 1
    alice = next(m for m in data["messages"] if m["sender"] == ALICE)
    assert alice["text"] == ALICE_TEXT and ALICE_TEXT in alice["intake"]["raw"]          # decrypted
    assert data["outbox"][0]["raw"].endswith(REPLY)
    text = json.dumps(data, ensure_ascii=False)
    assert ERIN not in text and ERIN_TEXT not in text
    assert _refs(privacy.export(sessions, "acme.example", "admin:dpo")) == acme
    erin = privacy.export(sessions, ERIN.upper(), "admin:dpo")
    assert _refs(erin) == {f"CASE-{ids['case_c']:06d}"} and [m["text"] for m in erin["messages"]] == [ERIN_TEXT]
    assert _refs(privacy.export(sessions, "nobody.example", "admin:dpo")) == set()
    rows = audit_rows(sessions)
    assert [(a.action, a.target) for a in rows] == [("export", "acme meters ab"), ("export", "acme.example"),
                                                     ("export", ERIN.upper()), ("export", "nobody.example")]
    assert rows[0].detail["result"] == {"cases": 2, "messages": 3, "events": 4, "feedback": 2, "outbox": 1}


def test_export_widens_a_registered_name_to_its_domains_and_contacts(db_url, tmp_path):
    (tmp_path / "customers.yaml").write_text(
        "customers:\n  - name: Acme Meters AB\n    tier: enterprise\n    domains: [acme.example]\n"
        "    contacts: [erin@freemail.example]\n", encoding="utf-8")
    (tmp_path / "freemail.txt").write_text("freemail.example\n", encoding="utf-8")
    sessions = _sessions(db_url)
    ids = seed(sessions)
    with sessions() as s, s.begin():      # a case stored under the bare domain, before the customer was registered
        s.get(Case, ids["case_b"]).customer = "acme.example"
    plain = privacy.export(sessions, "Acme Meters AB", "admin:dpo")
    assert _refs(plain) == {f"CASE-{ids['case_a']:06d}"}
    wide = privacy.export(sessions, "Acme Meters AB", "admin:dpo", rules_dir=tmp_path)
    assert _refs(wide) == {f"CASE-{i:06d}" for i in (ids["case_a"], ids["case_b"], ids["case_c"])}


def test_the_export_command_writes_a_private_file_and_is_audited(db_url, monkeypatch, tmp_path, capsys):
    sessions = _sessions(db_url)
    seed(sessions)
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", db_url)
    monkeypatch.setenv("TRIAGEBOT_ENCRYPTION_KEY", KEY)
    monkeypatch.setenv("USER", "carl")
    out = tmp_path / "acme.json"
    assert cli.main(["export", "--customer", "acme.example", "--out", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["format"] == "triagebot-export/1" and len(data["messages"]) == 3
    assert cli.main(["export", "--customer", ERIN]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["messages"][0]["text"] == ERIN_TEXT
    assert cli.main(["export", "--customer", "nobody.example"]) == 0
    assert "nothing stored for 'nobody.example'" in capsys.readouterr().err
    assert [(a.actor, a.action, a.target) for a in audit_rows(sessions)] == [
        ("admin:carl", "export", "acme.example"), ("admin:carl", "export", ERIN),
        ("admin:carl", "export", "nobody.example")]


# -- forget -----------------------------------------------------------------------------------------------

def test_forget_removes_everything_personal_about_a_contact_and_keeps_the_statistics(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions, queued=True)
    privacy.export(sessions, ALICE, "admin:dpo")                   # an earlier request names her in the trail
    before = statistics(sessions)

    report = privacy.forget(sessions, "Alice@Acme.Example", "admin:dpo")

    text = dump(sessions, skip_intake=(ids["queued"],))
    for gone in (ALICE, "alice andersson", ALICE_TEXT[:30], "<a1@acme.example>", REPLY):
        assert gone.lower() not in text, gone
    for kept in (BOB, BOB_TEXT, DAVE, DAVE_TEXT, ERIN, ERIN_TEXT):
        assert kept.lower() in text, kept
    assert statistics(sessions) == before
    with sessions() as s:
        alice = s.get(MessageRow, ids["alice"])
        assert (alice.sender, alice.sender_name, alice.text, "forgotten" in alice.flags) == (None, None, "", True)
        bob = s.get(MessageRow, ids["bob"])
        assert bob.text == BOB_TEXT and bob.quoted.startswith("On Monday, [forgotten] <[forgotten]> wrote:")
        for key in ("intake_alice", "intake_bob", "dup"):        # hers, and the ones that name her
            assert bytes(s.get(Intake, ids[key]).raw) == b"", key
        assert ALICE.encode() in crypto.unseal(s.get(Intake, ids["queued"]).raw)   # not yet processed: left, counted
        case_a = s.get(Case, ids["case_a"])
        assert (case_a.subject, case_a.features, case_a.customer) == (None, {}, "Acme Meters AB")
        fb = s.scalars(select(Feedback).where(Feedback.message_id == ids["alice"])).one()
        assert (fb.text, fb.subject, fb.new_value) == ("", None, "high")
        assert s.scalars(select(Outbox)).all() == []
        assert s.get(ThreadKey, "msgid:<a1@acme.example>") is None
        assert s.get(ThreadKey, "msgid:<b1@acme.example>") is not None
    assert report["messages"] == 1 and report["intake"] == 3 and report["intake_still_queued"] == 1
    rows = audit_rows(sessions)
    assert [(a.action, a.target) for a in rows] == [("export", privacy.pseudonym(ALICE)),
                                                     ("forget", privacy.pseudonym(ALICE))]
    assert rows[1].detail["result"]["events"] >= 2


def test_forget_a_slack_user_touches_nobody_with_a_longer_id(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions)
    raws = {who: json.dumps({"type": "message", "user": who, "text": f"hello from {who}"}).encode()
            for who in ("U0ALICE", "U0ALICEX")}
    with sessions() as s, s.begin():
        case = s.get(Case, ids["case_b"])
        for who, raw in raws.items():
            row = _intake(s, raw, RECENT, origin="slack:Ev1")
            _message(s, row, case, who, None, f"slack:C1:{len(who)}", None, f"hello from {who}", RECENT,
                     "threaded", source="slack", category="order", service="sim", severity="low")
    report = privacy.forget(sessions, "U0ALICE", "slack:U0ADMIN")
    assert report["messages"] == 1
    text = dump(sessions)
    assert '"u0alice"' not in text and '"hello from u0alice"' not in text
    assert '"u0alicex"' in text and '"hello from u0alicex"' in text
    with sessions() as s:
        senders = {m.sender for m in s.scalars(select(MessageRow).where(MessageRow.source == "slack"))}
    assert senders == {None, "U0ALICEX"}


def test_forget_finds_an_encrypted_duplicate_only_by_decrypting_it(db_url):
    sessions = _sessions(db_url)
    ids = seed(sessions)
    with sessions() as s:
        assert ALICE.encode() not in bytes(s.get(Intake, ids["dup"]).raw)     # sealed: no plaintext to match
    privacy.forget(sessions, ALICE, "admin:dpo")
    with sessions() as s:
        row = s.get(Intake, ids["dup"])
        assert bytes(row.raw) == b"" and "forgotten" in row.flags


def test_the_forget_command_reports_and_is_audited(db_url, monkeypatch, capsys):
    sessions = _sessions(db_url)
    seed(sessions, queued=True)
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", db_url)
    monkeypatch.setenv("TRIAGEBOT_ENCRYPTION_KEY", KEY)
    assert cli.main(["--actor", "dpo-anna", "forget", "--contact", ERIN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == 1
    assert cli.main(["forget", "--contact", ALICE, "--actor", "dpo-bo"]) == 0
    out = capsys.readouterr()
    assert "forgotten: messages=1" in out.out and "run forget again" in out.err
    assert [(a.actor, a.action, a.target) for a in audit_rows(sessions)] == [
        ("admin:dpo-anna", "forget", privacy.pseudonym(ERIN)), ("admin:dpo-bo", "forget", privacy.pseudonym(ALICE))]
    with sessions() as s:
        assert s.scalars(select(Case).where(Case.customer == ERIN)).all() == []


# -- the audit trail --------------------------------------------------------------------------------------

def test_record_access_adds_a_redacted_row_in_the_callers_transaction(db_url):
    sessions = _sessions(db_url)
    with sessions() as s, s.begin():
        privacy.record_access(s, "slack:U0AGENT", "view_case", "CASE-000001",
                              {"via": "/case", "note": f"asked by {BOB} on +46 70 111 22 33"})
    with sessions() as s:
        s.begin()
        privacy.record_access(s, "slack:U0AGENT", "view_case", "CASE-000002")
        s.rollback()                                              # the caller's work failed: no audit row either
    [row] = audit_rows(sessions)
    assert (row.actor, row.action, row.target) == ("slack:U0AGENT", "view_case", "CASE-000001")
    assert row.detail == {"via": "/case", "note": "asked by ***@acme.example on [phone]"}
    assert row.at is not None


def test_status_and_requeue_are_audited_with_the_actor(db_url, monkeypatch, capsys):
    sessions = _sessions(db_url)
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", db_url)
    monkeypatch.delenv("TRIAGEBOT_ENCRYPTION_KEY", raising=False)
    monkeypatch.setenv("USER", "carl")
    assert cli.main(["--actor", "ops-1", "status", "--json"]) == 0
    assert cli.main(["requeue", "7"]) == 0
    assert cli.main(["migrate"]) == 0                               # not an access to stored data
    capsys.readouterr()
    assert [(a.actor, a.action, a.detail["args"]) for a in audit_rows(sessions)] == [
        ("admin:ops-1", "status", {"json": True}), ("admin:carl", "requeue", {"ids": [7]})]


def test_the_audit_migration_matches_the_table(db_url):
    engine = make_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if "audit" in repr(d)] == []
    with engine.connect() as conn:
        assert "audit" in {t for t in conn.dialect.get_table_names(conn)}
