"""split_reply: reply headers, forwards and signatures in en/sv/es, and the talon reply-stripping fixtures."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from triagebot.normalize.html import html_to_text
from triagebot.normalize.quotes import ReplyParts, load_patterns, split_reply
from triagebot.rules_loader import RuleError

SHARED = Path(__file__).resolve().parents[2] / "shared"
TALON = SHARED / "corpora" / "email-reply-stripping" / "talon"
TALON_HTML_REPLY = "Hi. I am fine.\n\nThanks,\nAlex"
ICCID = "89460123456789012347"


def _ws(s: str) -> str:
    return re.sub(r"\s+", "", s)


def _talon() -> Path:
    if not TALON.is_dir():
        pytest.skip(f"{TALON} is absent (the shared corpora sit beside the project root)")
    return TALON


# --- reply headers of en / sv / es clients -------------------------------------------------------------

NEW = "Our trackers lost data at 06:00."
QUOTED = "Please send the ICCID."

HEADER_STYLES = {
    "gmail_en": f"{NEW}\n\nOn Mon, May 1, 2023 at 9:00 AM Support <support@op.com> wrote:\n\n> {QUOTED}\n",
    "gmail_en_wrapped": f"{NEW}\n\nOn Mon, May 1, 2023 at 9:00 AM Support Team of the Operator <\nsupport@op.com> wrote:\n> {QUOTED}\n",
    "apple_en": f"{NEW}\n\n> On 1 May 2023, at 09:00, Support <support@op.com> wrote:\n> \n> {QUOTED}\n",
    "gmail_sv": f"{NEW}\n\nDen mån 1 maj 2023 kl 09:00 skrev Support <support@op.se>:\n\n> {QUOTED}\n",
    "gmail_sv_no_den": f"{NEW}\n\ntis 2 maj 2023 kl. 09:00 skrev Support <support@op.se>:\n> {QUOTED}\n",
    "gmail_sv_wrapped_gt": f"{NEW}\n\ntis 2 maj 2023 kl. 09:00 skrev Support <support@op.se\n>:\n\n> {QUOTED}\n",
    "gmail_es": f"{NEW}\n\nEl lun, 1 may 2023 a las 9:00, Soporte (<soporte@op.es>) escribió:\n\n> {QUOTED}\n",
    "original_en": f"{NEW}\n\n-----Original Message-----\nFrom: Support\nSent: 1 May 2023\n\n{QUOTED}\n",
    "original_sv": f"{NEW}\n\n-----Ursprungligt meddelande-----\nFrån: Support\nSkickat: den 1 maj 2023\n\n{QUOTED}\n",
    "original_es": f"{NEW}\n\n-----Mensaje original-----\nDe: Soporte\nEnviado el: lunes, 1 de mayo de 2023\n\n{QUOTED}\n",
    "outlook_en": f"{NEW}\n\nFrom: Support <support@op.com>\nSent: Monday, May 1, 2023 9:00 AM\nTo: Jane\n"
                  f"Subject: RE: data\n\n{QUOTED}\n",
    "outlook_sv": f"{NEW}\n\n________________________________\nFrån: Support <support@op.se>\n"
                  f"Skickat: den 1 maj 2023 09:00\nTill: Anna\nÄmne: SV: data\n\n{QUOTED}\n",
    "outlook_es": f"{NEW}\n\nDe: Soporte <soporte@op.es>\nEnviado el: lunes, 1 de mayo de 2023 9:00\n"
                  f"Para: Ana\nAsunto: RE: datos\n\n{QUOTED}\n",
    "outlook_bold_html": f"{NEW}\n\n*From:* Support <support@op.com>\n*Sent:* Monday, May 1, 2023\n\n{QUOTED}\n",
    "outlook_one_line": f"{NEW}\n\nFrom: Support <support@op.com> Sent: Monday, May 1, 2023 To: Jane Subject: RE: x\n{QUOTED}\n",
    "hotmail_date_first": f"{NEW}\n\n________________________________\nDate: Mon, 1 May 2023 09:00:00 +0200\n"
                          f"Subject: data\nFrom: support@op.com\nTo: jane@x.com\n\n{QUOTED}\n",
    "plain_quote": f"{NEW}\n\n> {QUOTED}\n> More quoted.\n",
}


@pytest.mark.parametrize("style", sorted(HEADER_STYLES))
def test_reply_header_styles_separate_new_from_quoted(style: str) -> None:
    parts = split_reply(HEADER_STYLES[style])
    assert parts.new == NEW
    assert QUOTED in parts.quoted
    assert QUOTED not in parts.new


def test_returns_frozen_reply_parts() -> None:
    parts = split_reply("Hello")
    assert parts == ReplyParts("Hello", "", "")
    with pytest.raises(AttributeError):
        parts.new = "x"  # type: ignore[misc]


def test_bottom_posted_and_interleaved_answers_stay_new() -> None:
    text = ("On Mon, May 1, 2023 at 9:00 AM Support <s@op.com> wrote:\n> Which APN do you use?\n\n"
            "We use iot.example.\n\n> And which SIMs?\n\nAll of them.\n")
    parts = split_reply(text)
    assert "We use iot.example." in parts.new and "All of them." in parts.new
    assert "Which APN" in parts.quoted and "Which APN" not in parts.new


def test_prose_with_label_words_is_not_a_header_block() -> None:
    text = "Hi,\n\nFrom: our depot in Malmö, 12 units report no data.\nSent: yesterday evening, no answer.\n"
    parts = split_reply(text)
    assert parts.quoted == ""
    assert "12 units report no data" in parts.new


def test_greater_than_number_is_not_a_quote() -> None:
    parts = split_reply("Hi,\n\n> 50 units are down since 06:00.\nPlease hurry.\n")
    assert parts.new == "Hi,\n\n> 50 units are down since 06:00.\nPlease hurry." and parts.quoted == ""


def test_no_header_no_quote_keeps_everything() -> None:
    parts = split_reply("Hi,\n\nOur depot in Malmö has 12 units without data since Monday.\n")
    assert parts == ReplyParts("Hi,\n\nOur depot in Malmö has 12 units without data since Monday.", "", "")


# --- forwards -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", [
    "---------- Forwarded message ---------",
    "---------- Vidarebefordrat meddelande ---------",
    "---------- Mensaje reenviado ---------",
    "Begin forwarded message:",
])
def test_forward_with_nothing_above_makes_forwarded_text_new(marker: str) -> None:
    text = (f"{marker}\nFrom: Kund <kund@x.se>\nDate: Mon, 1 May 2023\nSubject: SIM\nTo: <me@y.se>\n\n"
            f"Tre larm skickar inte SMS.\n\nMvh\nKund\n")
    parts = split_reply(text)
    assert parts.forwarded
    assert parts.new == "Tre larm skickar inte SMS."
    assert parts.signature.startswith("Mvh")


def test_forward_with_comment_above_keeps_comment_as_new() -> None:
    text = "Can you look at this?\n\n---------- Forwarded message ---------\nFrom: a@b.c\n\nOld text\n"
    parts = split_reply(text)
    assert parts.forwarded and parts.new == "Can you look at this?" and "Old text" in parts.quoted


def test_apple_forward_quoted_with_gt_is_unquoted() -> None:
    text = "Begin forwarded message:\n\n> From: Kund <k@x.se>\n> Date: 1 May 2023\n> Subject: x\n>\n> Inget fungerar.\n"
    assert split_reply(text).new == "Inget fungerar."


# --- signatures -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("signoff", [
    "Best regards", "Kind regards,", "Mvh", "Med vänliga hälsningar", "Vänliga hälsningar", "Hälsningar",
    "Un saludo,", "Saludos", "Atentamente,", "Cordialmente", "Sent from my iPhone", "Skickat från min iPhone",
    "Enviado desde mi iPhone", "--",
])
def test_signoff_with_short_block_is_signature(signoff: str) -> None:
    text = f"Hej,\n\nSIM {ICCID} har ingen data.\n\n{signoff}\nAnna Svensson\nDriftchef, Acme AB\n+46 70 123 45 67\n"
    parts = split_reply(text)
    assert parts.new == f"Hej,\n\nSIM {ICCID} har ingen data."
    assert parts.signature.startswith(signoff.rstrip())
    assert "+46 70 123 45 67" in parts.signature


def test_signoff_followed_by_long_text_is_not_signature() -> None:
    body = ("Thanks\n" + "We also noticed that the devices in the northern region reboot every hour and lose their "
            "PDP context, which started after the maintenance window last week.\n" * 3)
    parts = split_reply("Hi,\n\nQuick question.\n\n" + body)
    assert parts.signature == ""
    assert "reboot every hour" in parts.new


def test_signoff_followed_by_prose_lines_is_not_signature() -> None:
    parts = split_reply("Hi,\n\nThanks for the answer.\nBest\nBut now our tracker is down again.\nPlease help us today.\n")
    assert "our tracker is down again" in parts.new


def test_identifiers_after_signoff_are_never_signature() -> None:
    parts = split_reply(f"Hej,\n\nDessa kort fungerar inte:\n\nMvh\nAnna\n{ICCID}\n89460123456789012354\n")
    assert ICCID in parts.new and ICCID not in parts.signature


@pytest.mark.parametrize("footer", [
    "This e-mail and any attachments are confidential and intended solely for the addressee.",
    "Detta e-postmeddelande kan innehålla konfidentiell information och är endast avsett för mottagaren.",
    "Este mensaje y sus adjuntos son confidenciales y están dirigidos exclusivamente a su destinatario.",
])
def test_legal_footer_is_signature(footer: str) -> None:
    text = "Hello,\n\nThe APN is rejected for all our meters.\n\n" + footer + "\n" + "More legal text. " * 40
    parts = split_reply(text)
    assert parts.new == "Hello,\n\nThe APN is rejected for all our meters."
    assert parts.signature.startswith(footer[:20])


def test_sender_name_line_starts_signature() -> None:
    text = "Hi,\n\nThe portal login fails for all users.\n\nJane Doe\nFleet Ops\n"
    assert split_reply(text, sender_name="Jane Doe").signature == "Jane Doe\nFleet Ops"
    assert split_reply(text, sender_name="Doe, Jane").signature == "Jane Doe\nFleet Ops"
    assert split_reply(text).signature == ""      # without the name it stays text (conservative)


@pytest.mark.parametrize("ending,signature", [
    ("\n\n/Tom", "/Tom"), ("\n\n//Anna Berg", "//Anna Berg"), ("\n\n- Juan", "- Juan"), ("\n\nCraig", "Craig"),
    ("\nCraig", ""),                    # no blank line above: could be the end of the text
    ("\n\nHELP", ""), ("\n\n/tmp/log", ""), ("\n\nPlease call me", ""),
])
def test_name_alone_at_the_end(ending: str, signature: str) -> None:
    parts = split_reply("Hi,\n\nThe unit is still offline after the power cycle." + ending)
    assert parts.signature == signature
    assert parts.new.endswith("power cycle." if signature else ending.strip().splitlines()[-1])


def test_contact_block_is_signature() -> None:
    text = "Hi,\n\nSMS are not delivered.\n\nGina Smith\ngina@example.com\n(555) 346-9947\nwww.example.com\n"
    assert split_reply(text).signature.startswith("Gina Smith")


def test_huge_input_is_bounded() -> None:
    text = "Hi\n" + ("x" * 100 + "\n") * 5000
    parts = split_reply(text)
    assert parts.new.startswith("Hi") and len(parts.new) + len(parts.quoted) >= len(text) - 10


def test_bad_pattern_file_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "reply_headers.yaml"
    bad.write_text("reply_verbs: [wrote]\nreply_openers: [on]\nseparators:\n  - pattern: '(unclosed'\n")
    with pytest.raises(RuleError, match="reply_headers.yaml"):
        load_patterns(bad)
    bad.write_text("reply_verbs: [wrote\n")
    with pytest.raises(RuleError, match=r"reply_headers.yaml:\d"):
        load_patterns(bad)


# --- talon fixtures -------------------------------------------------------------------------------------

def talon_results() -> list[tuple[str, bool, str]]:
    """Run split_reply over every talon fixture with an expected result: (name, passed, what we got)."""
    from triagebot.normalize.email import parse_email
    root = _talon()
    out = []
    for f in sorted((root / "standard_replies").glob("*.eml")):
        m = parse_email(f.read_bytes())
        exp_file = f.with_name(f.stem + "_reply_text")
        expected = exp_file.read_text().strip() if exp_file.exists() else "Hello"
        got = m.text + "\n" + m.signature     # talon's reply keeps the signature
        out.append((f"standard_replies/{f.name}", _ws(got) == _ws(expected), got))
    for f in sorted((root / "html_replies").glob("*.html")):
        parts = split_reply(html_to_text(f.read_text(encoding="utf-8", errors="replace")))
        got = parts.new + "\n" + parts.signature
        out.append((f"html_replies/{f.name}", _ws(got) == _ws(TALON_HTML_REPLY), got))
    stripped = root / "signature" / "emails" / "stripped"
    for f in sorted(stripped.glob("*_body")):
        name = f.name[: -len("_body")]
        sig_file = stripped / f"{name}_signature"
        expected = sig_file.read_text() if sig_file.exists() else ""
        sender = (stripped / f"{name}_sender").read_text().strip()
        parts = split_reply(f.read_text(), sender_name=sender)
        out.append((f"signature/{name}", _ws(parts.signature) == _ws(expected), parts.signature))
    m = parse_email((root / "reply-quotations-share-block.eml").read_bytes())
    out.append(("reply-quotations-share-block.eml", bool(m.text.strip()) and "From" not in m.text, m.text))
    parts = split_reply(html_to_text((root / "OLK_SRC_BODY_SECTION.html").read_text(errors="replace")))
    out.append(("OLK_SRC_BODY_SECTION.html", _ws(parts.new) == "Reply", parts.new))
    parts = split_reply(html_to_text((root / "reply-separated-by-hr.html").read_text(errors="replace")))
    out.append(("reply-separated-by-hr.html", _ws(parts.new) in ("Hithere", "HithereBob"), parts.new))
    return out


def test_talon_fixtures_pass() -> None:
    results = talon_results()
    failed = [(name, got[:200]) for name, ok, got in results if not ok]
    passed = len(results) - len(failed)
    print(f"talon fixtures: {passed}/{len(results)} pass")
    assert len(results) >= 30, "the talon fixture set shrank"
    assert not failed, f"{passed}/{len(results)} talon fixtures pass; failing: {failed}"


def test_talon_signature_p_emails_keep_their_text() -> None:
    """talon's P/ emails have signatures; whatever we find, the body before it must stay in new."""
    root = _talon() / "signature" / "emails" / "P"
    for f in sorted(root.iterdir()):
        if f.name.endswith("_sender"):
            continue
        # talon marks lines with "#sig#" / "#reply#"; remove the marks to get the mail as sent
        text = re.sub(r"^#(sig|reply)#", "", f.read_text(errors="replace"), flags=re.MULTILINE)
        _headers, _, body = text.partition("\n\n") if text.startswith("From:") else ("", "", text)
        parts = split_reply(body)
        assert parts.new.strip(), f.name
        assert not any(line.lstrip().startswith(">") for line in parts.new.splitlines()), f.name
