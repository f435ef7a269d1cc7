"""DispositionStep: case / auto_reply / bounce from headers, report parts, senders, subjects and short bodies."""
from __future__ import annotations

from pathlib import Path

import pytest

from triagebot.model import Triage
from triagebot.normalize.email import parse_email
from triagebot.normalize.slack import parse_slack
from triagebot.rules_loader import RuleError
from triagebot.steps.disposition import DispositionStep, load_rules

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "normalize"
CASE_BODY = "Hej,\n\n40 av våra larm har slutat skicka data sedan i morse.\n\nMvh\nAnna"


@pytest.fixture(scope="module")
def step() -> DispositionStep:
    return DispositionStep()


def mail(headers: dict[str, str] | None = None, body: str = CASE_BODY, subject: str = "Larm utan data",
         sender: str = "anna@kund.se") -> bytes:
    lines = [f"From: Anna <{sender}>", "To: support@operatorn.se", f"Subject: {subject}",
             "Date: Fri, 5 May 2023 09:00:00 +0200", "Message-ID: <t@kund.se>", "MIME-Version: 1.0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if not any(k.lower() == "content-type" for k in (headers or {})):
        lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    return ("\n".join(lines) + "\n\n" + body + "\n").encode("utf-8")


def decide(step: DispositionStep, raw: bytes) -> tuple[str, str]:
    t = step(parse_email(raw), Triage())
    (entry,) = t.trail
    assert entry.step == "disposition" and entry.decision == t.disposition
    return t.disposition, entry.detail


def test_name_and_docstring(step: DispositionStep) -> None:
    assert step.name == "disposition"
    assert DispositionStep.__doc__ and "\n" not in DispositionStep.__doc__.strip()


def test_plain_customer_mail_is_case(step: DispositionStep) -> None:
    disposition, detail = decide(step, mail())
    assert disposition == "case" and "no auto-reply or bounce rule hit" in detail


# --- RFC 3834 and friends -------------------------------------------------------------------------------

@pytest.mark.parametrize("headers,rule", [
    ({"Auto-Submitted": "auto-replied"}, "header Auto-Submitted=auto-replied"),
    ({"Auto-Submitted": "auto-generated"}, "header Auto-Submitted=auto-generated"),
    ({"Auto-Submitted": "auto-notified; owner-email=a@b.c"}, "Auto-Submitted"),
    ({"X-Autoreply": "yes"}, "header X-Autoreply=yes"),
    ({"X-Autorespond": "Out of office"}, "X-Autorespond"),
    ({"Precedence": "auto_reply"}, "Precedence=auto_reply"),
    ({"Precedence": "bulk"}, "Precedence=bulk"),
    ({"Precedence": "junk"}, "Precedence=junk"),
    ({"X-Apple-Action": "VACATION"}, "X-Apple-Action"),
])
def test_auto_reply_headers(step: DispositionStep, headers: dict, rule: str) -> None:
    disposition, detail = decide(step, mail(headers))
    assert disposition == "auto_reply"
    assert rule in detail


@pytest.mark.parametrize("headers", [
    {"Auto-Submitted": "no"},
    {"Auto-Submitted": "No (written by a person)"},
    {"X-Auto-Response-Suppress": "All"},                      # Outlook puts it on ordinary mail
    {"List-Id": "<kunder.operatorn.se>"},                     # a mailing-list post is written by a person
    {"Precedence": "list", "List-Id": "<x.y>"},
    {"Precedence": "bulk", "Sender": "owner-drift@lists.kund.se"},   # majordomo list post
    {"Precedence": "bulk", "List-Post": "<mailto:drift@lists.kund.se>"},
    {"X-Autoreply": "no"},
])
def test_not_auto_reply_headers(step: DispositionStep, headers: dict) -> None:
    assert decide(step, mail(headers))[0] == "case"


def test_not_decisive_headers_are_noted(step: DispositionStep) -> None:
    _, detail = decide(step, mail({"X-Auto-Response-Suppress": "All", "List-Id": "<a.b>"}))
    assert "X-Auto-Response-Suppress present but not decisive" in detail and "List-Id present" in detail


@pytest.mark.parametrize("subject", [
    "Out of Office: Larm utan data", "Automatic reply: SIM", "Auto reply: x", "Autoreply: x", "[Auto-Reply] x",
    "Autosvar: Larm utan data", "Automatiskt svar: SIM", "Frånvarande: x", "Jag är tillbaka den 10 maj",
    "Respuesta automática: Incidencia", "Fuera de la oficina: x", "Estoy fuera hasta el lunes",
])
def test_auto_reply_subjects(step: DispositionStep, subject: str) -> None:
    disposition, detail = decide(step, mail(subject=subject))
    assert disposition == "auto_reply" and "subject" in detail


@pytest.mark.parametrize("subject", [
    "Re: Out of office reply stops our alarms",      # a person answering, not anchored
    "Fwd: Automatic reply: SIM",
    "Borta SIM-kort",                                  # lost SIM cards
    "Ausencia de cobertura en Málaga",                # no coverage
    "Our out of office alarms are offline",
])
def test_case_subjects_that_look_similar(step: DispositionStep, subject: str) -> None:
    assert decide(step, mail(subject=subject))[0] == "case"


@pytest.mark.parametrize("body", [
    "I am out of the office until 15 May with limited access to e-mail.",
    "Thank you for your email. I'm currently on vacation and will be back on Monday.",
    "Hej!\nJag är på semester till och med vecka 32.\n\nMvh\nLars",
    "Jag är tillbaka måndag 14 augusti.",
    "Estoy fuera de la oficina hasta el 15 de agosto. Para urgencias escriba a admin@cliente.es.",
    "Hola,\nestaré de vacaciones hasta el lunes.",
])
def test_auto_reply_short_bodies(step: DispositionStep, body: str) -> None:
    disposition, detail = decide(step, mail(subject="Re: Larm", body=body))
    assert disposition == "auto_reply" and "rule autoreply_body" in detail


@pytest.mark.parametrize("body", [
    "I am out of the office this week, but 40 of our trackers stopped sending data. Please check the APN.",
    "Jag är på semester men alla våra SIM-kort fungerar inte sedan i går!",
    "Estoy fuera de la oficina pero los módems no funcionan desde ayer.",
    "Our technician said: I am out of office. " + "The devices keep dropping their PDP context. " * 30,
    "We received many 'I am out of the office' replies from your portal notifications, please stop them.",
])
def test_complaints_mentioning_out_of_office_are_cases(step: DispositionStep, body: str) -> None:
    assert decide(step, mail(subject="Re: Larm", body=body))[0] == "case"


# --- bounces --------------------------------------------------------------------------------------------

DSN = """--b
Content-Type: text/plain

This is the mail system at host mx.kund.se.

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.kund.se

Final-Recipient: rfc822; nisse@kund.se
Action: failed
Status: 5.1.1

--b
Content-Type: message/rfc822

From: support@operatorn.se
Subject: Ditt ärende

Hej
--b--"""


def test_dsn_report_is_bounce_even_with_auto_submitted(step: DispositionStep) -> None:
    raw = mail({"Auto-Submitted": "auto-replied",
                "Content-Type": 'multipart/report; report-type=delivery-status; boundary="b"'},
               body=DSN, subject="Undelivered Mail Returned to Sender", sender="MAILER-DAEMON@kund.se")
    disposition, detail = decide(step, raw)
    assert disposition == "bounce" and "report-type=delivery-status" in detail


def test_dsn_part_inside_multipart_mixed_is_bounce(step: DispositionStep) -> None:
    raw = mail({"Content-Type": 'multipart/mixed; boundary="b"'}, body=DSN, subject="Hej")
    disposition, detail = decide(step, raw)
    assert disposition == "bounce" and "part message/delivery-status" in detail


@pytest.mark.parametrize("sender,subject", [
    ("MAILER-DAEMON@mx.kund.se", "Hej"),
    ("mailer-daemon@googlemail.com", "Delivery Status Notification (Failure)"),
    ("postmaster@kund.se", "Undeliverable: Ärende 5"),
    ("noreply@kund.se", "Undelivered Mail Returned to Sender"),
    ("noreply@kund.se", "Mail delivery failed: returning message to sender"),
    ("noreply@kund.se", "Olevererbart: Ärende 5"),
    ("noreply@kund.se", "No se puede entregar: Incidencia 55"),
])
def test_bounce_senders_and_subjects(step: DispositionStep, sender: str, subject: str) -> None:
    raw = mail(subject=subject, sender=sender, body="Leveransen misslyckades.")
    assert decide(step, raw)[0] == "bounce"


def test_exim_failed_recipients_header(step: DispositionStep) -> None:
    assert decide(step, mail({"X-Failed-Recipients": "nisse@kund.se"}))[0] == "bounce"


@pytest.mark.parametrize("sender,subject,body", [
    ("anna@kund.se", "Fwd: Undeliverable: Ärende 5", "Vi får detta när vi mejlar er, vad är fel?"),
    ("anna@kund.se", "Re: Mail delivery failed", "Our mail to you bounced, can you check?"),
    ("postmaster@kund.se", "Nya SIM-kort", "Hej, vi behöver 20 nya SIM-kort."),       # a person at postmaster@
    # this desk's customers ask about SMS delivery: none of these is a mail bounce
    ("anna@kund.se", "Leveransrapport via API", "Hur begär man en leveransrapport för SMS?"),
    ("ops@fleet.com", "SMS delivery failure", "SMS to our trackers fail with error 27."),
    ("ops@fleet.com", "Delivery report missing", "We get no delivery reports for SMS."),
    ("ops@fleet.com", "Message not delivered to device", "The SMS never arrives."),
    ("juan@cliente.es", "Error de entrega de SMS", "Los SMS no llegan a los equipos."),
    ("juan@cliente.es", "No se puede entregar SMS a los contadores", "Desde ayer."),
    ("lars@kund.se", "Leverans misslyckades för SMS", "Inga SMS kommer fram."),
])
def test_people_writing_about_bounces_are_cases(step: DispositionStep, sender: str, subject: str, body: str) -> None:
    assert decide(step, mail(subject=subject, sender=sender, body=body))[0] == "case"


# --- reports that are not bounces -----------------------------------------------------------------------

ARF = """--b
Content-Type: text/plain

This is an abuse report.

--b
Content-Type: message/feedback-report

Feedback-Type: abuse
Version: 1

--b--"""


def test_arf_feedback_report_is_auto_reply_with_note(step: DispositionStep) -> None:
    raw = mail({"Content-Type": 'multipart/report; report-type=feedback-report; boundary="b"'}, body=ARF,
               subject="Abuse report")
    disposition, detail = decide(step, raw)
    assert disposition == "auto_reply" and "ARF" in detail and "treated as auto_reply" in detail


def test_read_receipt_is_auto_reply_with_note(step: DispositionStep) -> None:
    body = ("--b\nContent-Type: text/plain\n\nRead.\n\n--b\nContent-Type: message/disposition-notification\n\n"
            "Final-Recipient: rfc822; a@b.c\nDisposition: manual-action/MDN-sent-manually; displayed\n\n--b--")
    raw = mail({"Content-Type": 'multipart/report; report-type=disposition-notification; boundary="b"'},
               body=body, subject="Read: Larm")
    disposition, detail = decide(step, raw)
    assert disposition == "auto_reply" and "read receipt" in detail


# --- fixtures and Slack ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("sv_outlook_cp1252.eml", "case"),
    ("es_cp1252_declared_utf8.eml", "case"),
    ("en_html_only.eml", "case"),
    ("en_case_mentions_ooo.eml", "case"),
    ("es_forward_only.eml", "case"),
    ("sv_autosvar_subject_crlf.eml", "auto_reply"),
    ("es_ooo_body.eml", "auto_reply"),
    ("sv_bounce_subject.eml", "bounce"),
    ("es_bounce_subject.eml", "bounce"),
])
def test_fixture_dispositions(step: DispositionStep, name: str, expected: str) -> None:
    assert decide(step, (FIXTURES / name).read_bytes())[0] == expected


def test_slack_is_always_case(step: DispositionStep) -> None:
    event = {"type": "message", "channel": "C1", "user": "U1", "ts": "1.0", "text": "Out of office: I am away"}
    t = step(parse_slack(event), Triage())
    assert t.disposition == "case" and t.trail[-1].detail == "slack message"
    bot = step(parse_slack(dict(event, subtype="bot_message", bot_id="B1")), Triage())
    assert bot.disposition == "case" and "bot" in bot.trail[-1].detail


def test_trail_is_appended_not_replaced(step: DispositionStep) -> None:
    before = Triage().note("intake", "email")
    after = step(parse_email(mail({"Auto-Submitted": "auto-replied"})), before)
    assert [e.step for e in after.trail] == ["intake", "disposition"]
    assert str(after.trail[-1]) == ("disposition: auto_reply (rule auto_submitted: header "
                                    "Auto-Submitted=auto-replied)")


# --- rule files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("rules:\n  - name: a\n    subject: '(unclosed'\n", r"x\.yaml:2: subject: bad regular expression"),
    ("rules:\n  - name: a\n    subjekt: 'x'\n", r"x\.yaml:2: unknown key\(s\) subjekt"),
    ("rules:\n  - name: a\n    subject: x\n  - name: a\n    subject: y\n", r"x\.yaml:4: duplicate rule name"),
    ("rules:\n  - name: a\n", r"x\.yaml:2: rule 'a' has no condition"),
    ("rules:\n  - name: a\n    header: X-Foo\n", r"x\.yaml:2: header must be a mapping"),
    ("rules:\n  - name: a\n    body: x\n    max_body_chars: -1\n", r"x\.yaml:2: max_body_chars"),
    ("rules: [\n", r"x\.yaml:\d+: YAML error"),
])
def test_rule_file_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(content)
    with pytest.raises(RuleError, match=message):
        load_rules(path, "bounce")


def test_rules_dir_override(tmp_path: Path) -> None:
    (tmp_path / "bounce.yaml").write_text("rules:\n  - name: only\n    subject: '^BOOM'\n")
    (tmp_path / "autoreply.yaml").write_text("rules: []\nnot_alone: []\n")
    custom = DispositionStep(rules_dir=tmp_path)
    assert decide(custom, mail(subject="BOOM"))[0] == "bounce"
    assert decide(custom, mail({"Auto-Submitted": "auto-replied"}))[0] == "case"
