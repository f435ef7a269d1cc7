"""Acknowledgements and the relay queue, with a real aiosmtpd sink as the relay and real cases in the database."""
from __future__ import annotations

import shutil
import socket
from email import message_from_bytes
from email.header import decode_header, make_header
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller
from sqlalchemy import select, update

from triagebot.cli import main
from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Case, Outbox, ThreadKey, utcnow
from triagebot.ingest import Outcome, Processor, default_after_commit
from triagebot.model import Message, Triage
from triagebot.outbound import ack, relay
from triagebot.outbound.ack import queue_acknowledgement
from triagebot.pipeline import Pipeline
from triagebot.rules_loader import RuleError
from triagebot.settings import ROOT, Settings
from triagebot.steps.disposition import DispositionStep

OK, LATER, NEVER, CLOSING = "250 OK", "450 4.2.0 Mailbox busy, try later", "550 5.1.1 No such user", \
    "421 4.3.2 Shutting down"
SUPPORT = "support@support.example.net"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SinkHandler:
    """The relay: records what it is given, or answers RCPT with a chosen refusal."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []
        self.rcpt_answer = OK

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_answer != OK:
            return self.rcpt_answer
        envelope.rcpt_tos.append(address)
        return OK

    async def handle_DATA(self, server, session, envelope):
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content)))
        return OK


class Sink:
    """An aiosmtpd relay on a fixed free port that can be stopped and started again."""

    def __init__(self) -> None:
        self.port, self.handler, self.controller = free_port(), SinkHandler(), None

    def start(self) -> None:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def mails(self):
        return self.handler.mails


@pytest.fixture
def sink():
    s = Sink()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def settings(tmp_path, sink):
    return Settings(database_url=f"sqlite:///{tmp_path / 'triagebot.db'}", relay_host="127.0.0.1",
                    relay_port=sink.port, support_address=SUPPORT, mail_domains=("support.example.net",))


class FixedLanguage:
    """Test step: the language the test says (the real language step is another module's business)."""

    name = "language"

    def __init__(self, language: str) -> None:
        self.language = language

    def __call__(self, message: Message, triage: Triage) -> Triage:
        return triage.with_(language=self.language).note(self.name, self.language, "fixed by the test")


def processor(settings: Settings, language: str = "en") -> Processor:
    """The real Processor with the real disposition step and the acknowledgement hook."""
    _e, sessions = open_db(settings.database_url)
    pipeline = Pipeline((DispositionStep(settings.rules_dir), FixedLanguage(language)))
    return Processor(settings, sessions, pipeline=pipeline, after_commit=(queue_acknowledgement,))


def raw_mail(mid: str, subject: str = "No data on 3 meters", sender: str = "Ana Diaz <ana@customer.example>",
             **headers: str) -> bytes:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (f"From: {sender}\r\nTo: {SUPPORT}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n{extra}\r\n"
            f"Our meters with SIM 8946000000000000001 have sent no data since 10:00.\r\n").encode()


def ingest(p: Processor, raw: bytes) -> Outcome:
    intake_id = queue.enqueue(p.sessions, "email", raw, origin="test")
    return p.process(queue.claim_one(p.sessions, intake_id, "test"))


def outbox(settings: Settings) -> list[Outbox]:
    _e, sessions = open_db(settings.database_url)
    with sessions() as s:
        return list(s.scalars(select(Outbox).order_by(Outbox.id)))


def sender(settings: Settings, **kw) -> relay.Sender:
    _e, sessions = open_db(settings.database_url)
    return relay.Sender(settings, sessions, **kw)


def header(raw: bytes, name: str) -> str | None:
    v = message_from_bytes(raw).get(name)
    return None if v is None else str(make_header(decode_header(v)))


@pytest.mark.parametrize("language, words", [
    ("en", "We have received your message"),
    ("sv", "Tack för att du kontaktade supporten"),
    ("es", "Gracias por contactar con el soporte"),
    ("other", "We have received your message"),     # any other language: English
])
def test_a_new_case_gets_one_acknowledgement_in_its_language_through_the_relay(settings, sink, language, words):
    out = ingest(processor(settings, language), raw_mail("<m1@customer.example>"))
    assert out.action == "created" and out.case == "CASE-000001"
    [row] = outbox(settings)
    assert (row.kind, row.recipient, row.state, row.case_id) == ("ack", "ana@customer.example", "queued", out.case_id)
    assert row.dedupe_key == f"ack:{out.case_id}:ana@customer.example:{utcnow().date().isoformat()}"

    report = sender(settings).send_due()
    assert report.sent == [row.id]
    [(mail_from, rcpts, raw)] = sink.mails
    assert mail_from == "<>" and rcpts == ["ana@customer.example"]   # RFC 3834 §3.3: null envelope sender
    msg = message_from_bytes(raw, policy=default_policy)
    assert msg["Subject"].startswith("[CASE-000001] ") and "No data on 3 meters" in msg["Subject"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<m1@customer.example>"
    assert msg["Message-ID"] == row.message_id
    assert msg["To"].addresses[0].addr_spec == "ana@customer.example"
    assert msg["From"].addresses[0].addr_spec == SUPPORT
    body = msg.get_content()
    assert words in body and "CASE-000001" in body and "Ana Diaz" in body
    [sent] = outbox(settings)
    assert sent.state == "sent" and sent.sent_at is not None


def test_replies_to_the_acknowledgement_thread_by_header_and_by_subject(settings, sink):
    p = processor(settings)
    first = ingest(p, raw_mail("<m1@customer.example>"))
    [row] = outbox(settings)
    _e, sessions = open_db(settings.database_url)
    with sessions() as s:
        assert s.get(ThreadKey, f"msgid:{row.message_id.lower()}").case_id == first.case_id
    # a reply that quotes only our acknowledgement's Message-ID
    by_header = ingest(p, raw_mail("<m2@customer.example>", subject="Re: something else entirely",
                                   In_Reply_To=row.message_id))
    assert (by_header.action, by_header.case) == ("threaded", first.case)
    # a reply whose client dropped the headers: the bracketed reference in the subject carries it
    ack_subject = header(row.raw, "Subject")
    by_subject = ingest(p, raw_mail("<m3@customer.example>", subject=f"SV: {ack_subject}",
                                    sender="Bo <bo@customer.example>"))
    assert (by_subject.action, by_subject.case) == ("threaded", first.case)
    assert len(outbox(settings)) == 1        # threaded messages get no acknowledgement


@pytest.mark.parametrize("sender_addr, headers", [
    ("ana@customer.example", {"List_Id": "<fleet.lists.customer.example>"}),
    ("ana@customer.example", {"List_Unsubscribe": "<mailto:leave@lists.customer.example>"}),
    ("ana@customer.example", {"Precedence": "list"}),
    ("ana@customer.example", {"Precedence": "bulk", "List_Post": "<mailto:fleet@lists.customer.example>"}),
    ("ana@customer.example", {"Return_Path": "<>"}),
    ("ana@customer.example", {"X_Auto_Response_Suppress": "OOF, AutoReply"}),
    ("noreply@customer.example", {}),
    ("no-reply@customer.example", {}),
    ("donotreply@customer.example", {}),
    ("do-not-reply@customer.example", {}),
    ("MAILER-DAEMON@customer.example", {}),
    ("postmaster@customer.example", {}),
    ("fleet-bounces@lists.customer.example", {}),
    ("alerts@support.example.net", {}),                 # ourselves: never a loop
])
def test_no_acknowledgement_to_lists_bulk_or_noreply_senders(settings, sender_addr, headers):
    out = ingest(processor(settings), raw_mail("<m1@customer.example>", sender=f"X <{sender_addr}>", **headers))
    assert outbox(settings) == []
    # withheld by the acknowledgement's own rules, whatever the disposition step made of the message
    assert ack.suppression(out.message, ack.load_rules(settings.rules_dir), settings)


@pytest.mark.parametrize("headers, subject", [
    ({"Auto_Submitted": "auto-replied"}, "Out of office"),
    ({}, "Undelivered Mail Returned to Sender"),
])
def test_no_acknowledgement_to_auto_replies_or_bounces(settings, headers, subject):
    sender_addr = "MAILER-DAEMON <mailer-daemon@mx.customer.example>" if "Undelivered" in subject else \
        "Ana <ana@customer.example>"
    out = ingest(processor(settings), raw_mail("<m1@customer.example>", subject=subject, sender=sender_addr,
                                               **headers))
    assert out.action == "ignored"
    assert outbox(settings) == []


def test_at_most_one_acknowledgement_per_case_per_sender_per_day(settings):
    p = processor(settings)
    out = ingest(p, raw_mail("<m1@customer.example>"))
    assert queue_acknowledgement(settings, p.sessions, out) is None    # the hook called again (a retry)
    assert len(outbox(settings)) == 1


def test_a_daily_cap_per_address_breaks_loops_with_other_ticket_systems(settings, tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(settings.rules_dir, rules)
    data = yaml.safe_load((rules / "ack_templates.yaml").read_text())
    data["max_per_sender_per_day"] = 2
    (rules / "ack_templates.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    from dataclasses import replace
    p = processor(replace(settings, rules_dir=rules))
    for i in range(4):
        assert ingest(p, raw_mail(f"<m{i}@tickets.example>", subject=f"Ticket #{i} opened",
                                  sender="desk@tickets.example")).action == "created"
    assert len(outbox(settings)) == 2


def test_customer_text_cannot_inject_headers(settings, sink):
    # an encoded-word decodes to CR LF: the classic way to smuggle a Bcc into an auto-reply
    evil_subject = "=?utf-8?q?Help=0D=0ABcc:_victim@evil.example?="
    out = ingest(processor(settings), raw_mail("<m1@customer.example>", subject=evil_subject))
    assert "\n" in out.message.subject          # the decoded subject really carries the line break
    [row] = outbox(settings)
    head = row.raw.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in head and b"\nbcc:" not in head.lower()
    msg = message_from_bytes(row.raw, policy=default_policy)
    assert msg.get_all("Bcc") is None
    assert " ".join(msg["Subject"].split()) == "[CASE-000001] We have received your message: Help Bcc: victim@evil.example"
    sender(settings).send_due()
    [(_f, rcpts, _raw)] = sink.mails
    assert rcpts == ["ana@customer.example"]


def test_build_cleans_every_header_value():
    m = Message(source="email", text="x", subject="a\rb\nc\x00d\u2028e", sender="ana@customer.example",
                sender_name="Ana\r\nX-Evil: 1", message_id="<ok@customer.example>",
                references=("<r1@x>", "bad\r\nX-Evil: 2"))
    tpl = ack.load_rules().template("en")
    msg = ack.build(Settings(), tpl, "CASE-000007", m)
    raw = ack.as_bytes(msg)
    assert all(not line.lower().startswith(b"x-evil") for line in raw.split(b"\r\n"))
    assert message_from_bytes(raw, policy=default_policy).get_all("X-Evil") is None
    assert msg["References"] == "<r1@x> <ok@customer.example>"
    assert msg["Subject"].startswith("[CASE-000007]") and "a b c d e" in str(msg["Subject"])


def test_a_relay_that_is_down_delays_mail_and_loses_none(settings, sink):
    ingest(processor(settings), raw_mail("<m1@customer.example>"))
    sink.stop()
    s = sender(settings, base_delay=0.0)
    report = s.send_due()
    assert report.relay_down and report.sent == []
    [row] = outbox(settings)
    assert row.state == "queued" and row.attempts == 0 and "Connection" in row.last_error
    for _ in range(3):                       # down for a while: still queued, never failed
        s.send_due()
    assert outbox(settings)[0].state == "queued"
    sink.start()
    assert s.send_due().sent == [row.id]
    assert outbox(settings)[0].state == "sent"
    assert len(sink.mails) == 1


def test_retry_waits_for_not_before(settings, sink):
    ingest(processor(settings), raw_mail("<m1@customer.example>"))
    sink.stop()
    s = sender(settings, base_delay=3600.0)
    s.send_due()
    sink.start()
    assert s.send_due().sent == []           # not due yet: the backoff holds it back
    _e, sessions = open_db(settings.database_url)
    with sessions() as ses, ses.begin():
        ses.execute(update(Outbox).values(not_before=utcnow()))
    assert len(s.send_due().sent) == 1


def test_temporary_refusals_retry_then_park_and_permanent_ones_park_at_once(settings, sink):
    p = processor(settings)
    ingest(p, raw_mail("<m1@customer.example>"))
    sink.handler.rcpt_answer = LATER
    s = sender(settings, base_delay=0.0, max_attempts=3)
    states = []
    for _ in range(3):
        s.send_due()
        states.append(outbox(settings)[0].state)
    assert states == ["queued", "queued", "failed"]
    assert outbox(settings)[0].last_error.startswith("450")

    ingest(p, raw_mail("<m2@other.example>", sender="Bo <bo@other.example>"))
    sink.handler.rcpt_answer = NEVER
    report = s.send_due()
    [row] = [r for r in outbox(settings) if r.recipient == "bo@other.example"]
    assert report.failed == [row.id] and row.state == "failed" and row.last_error.startswith("550")
    assert sink.mails == []


def test_a_421_is_the_relay_going_away_not_the_message_failing(settings, sink):
    ingest(processor(settings), raw_mail("<m1@customer.example>"))
    sink.handler.rcpt_answer = CLOSING
    report = sender(settings, base_delay=0.0, max_attempts=1).send_due()
    assert report.relay_down
    [row] = outbox(settings)
    assert row.state == "queued" and row.attempts == 0


def test_two_senders_never_claim_the_same_row(settings, sink):
    p = processor(settings)
    for i in range(3):
        ingest(p, raw_mail(f"<m{i}@c{i}.example>", sender=f"A <a@c{i}.example>"))
    first, second = sender(settings, name="a"), sender(settings, name="b")
    claimed = first.claim()
    assert len(claimed) == 3 and second.claim() == []


def test_ack_hook_is_wired_when_a_relay_is_configured():
    assert queue_acknowledgement in default_after_commit(Settings(relay_host="127.0.0.1"))
    assert queue_acknowledgement not in default_after_commit(Settings(relay_host=None))


def test_slack_messages_and_threaded_outcomes_get_no_acknowledgement(settings):
    _e, sessions = open_db(settings.database_url)
    with sessions() as s, s.begin():
        case = Case(reference="CASE-000001", subject="x")
        s.add(case)
    slack = Message(source="slack", text="no data", sender="U123", channel="C1", ts="1.0")
    assert queue_acknowledgement(settings, sessions, Outcome("created", "CASE-000001", slack, Triage(),
                                                             case_id=case.id)) is None
    mail = Message(source="email", text="no data", sender="ana@customer.example", subject="x")
    assert queue_acknowledgement(settings, sessions, Outcome("threaded", "CASE-000001", mail, Triage(),
                                                             case_id=case.id)) is None
    assert outbox(settings) == []


def test_template_mistakes_are_reported_with_file_and_line(tmp_path):
    ack.load_rules.cache_clear()
    (tmp_path / "ack_templates.yaml").write_text(
        "templates:\n"
        "  - language: en\n"
        "    from_name: Support\n"
        "    subject: 'Received: {subject}'\n"
        "    subject_without_original: '[{reference}] Received'\n"
        "    greeting: 'Hello {name},'\n"
        "    greeting_without_name: 'Hello,'\n"
        "    body: '{greeting} {reference}'\n")
    with pytest.raises(RuleError) as e:
        ack.load_rules(tmp_path)
    assert e.value.line == 2 and "[{reference}]" in str(e.value) and "ack_templates.yaml:2" in str(e.value)
    (tmp_path / "ack_templates.yaml").write_text(
        "templates:\n"
        "  - language: sv\n"
        "    from_name: Support\n"
        "    subject: '[{reference}] {subject}'\n"
        "    subject_without_original: '[{reference}]'\n"
        "    greeting: 'Hej {customer_secret},'\n"
        "    greeting_without_name: 'Hej,'\n"
        "    body: '{greeting}'\n")
    ack.load_rules.cache_clear()
    with pytest.raises(RuleError) as e:
        ack.load_rules(tmp_path)
    assert e.value.line == 2 and "customer_secret" in str(e.value)
    ack.load_rules.cache_clear()


def test_the_shipped_templates_load_for_every_language():
    rules = ack.load_rules(ROOT / "rules")
    assert set(rules.templates) == {"en", "sv", "es"}
    assert rules.template("other").language == "en"


def test_triagebot_sender_once_sends_the_queue(settings, sink, monkeypatch, capsys):
    ingest(processor(settings), raw_mail("<m1@customer.example>"))
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TRIAGEBOT_RELAY_HOST", "127.0.0.1")
    monkeypatch.setenv("TRIAGEBOT_RELAY_PORT", str(sink.port))
    assert main(["sender", "--once"]) == 0
    assert "sent 1" in capsys.readouterr().out
    assert len(sink.mails) == 1


def test_a_bad_suppression_pattern_is_reported_with_its_line(tmp_path):
    text = (ROOT / "rules" / "ack_templates.yaml").read_text(encoding="utf-8")
    lines = text.split("\n")
    n = next(i for i, line in enumerate(lines, 1) if "postmaster" in line)
    lines[n - 1] = lines[n - 1].replace("'postmaster'", "'post(master'")
    (tmp_path / "ack_templates.yaml").write_text("\n".join(lines), encoding="utf-8")
    ack.load_rules.cache_clear()
    try:
        with pytest.raises(RuleError) as e:
            ack.load_rules(tmp_path)
    finally:
        ack.load_rules.cache_clear()
    assert e.value.line == n and f"ack_templates.yaml:{n}:" in str(e.value) and "local_parts" in str(e.value)
