"""parse_email, html_to_text, attachments, message_from_text and load_input on real mail bytes."""
from __future__ import annotations

import base64
import io
import json
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest

from triagebot.errors import InputError
from triagebot.model import Message
from triagebot.normalize import html_to_text, load_input, message_from_text
from triagebot.normalize.attachments import MAX_ROWS, extract_text
from triagebot.normalize.email import MAX_PARTS, decode_bytes, decode_header, parse_email

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "normalize"
ICCID = "89460123456789012347"
MOJIBAKE = ("Ã¥", "Ã¤", "Ã¶", "Ã©", "Ã±", "Ã³", "Ã¡", "â€", "\ufffd")


def fixture(name: str) -> Message:
    return parse_email((FIXTURES / name).read_bytes())


def assert_clean(text: str) -> None:
    for bad in MOJIBAKE:
        assert bad not in text, f"mojibake {bad!r} in {text[:200]!r}"


# --- charsets -------------------------------------------------------------------------------------------

def test_swedish_outlook_cp1252_labelled_latin1() -> None:
    m = fixture("sv_outlook_cp1252.eml")
    assert_clean(m.text + m.subject + m.signature)
    assert "”det fungerade i går” – vi behöver hjälp" in m.text      # cp1252 0x93/0x94/0x96
    assert "500 €" in m.text                                         # cp1252 0x80
    assert m.subject == "SV: Larm utan data – brådskande"
    assert m.sender == "asa.oberg@larmbolaget.se" and m.sender_name == "Åsa Öberg"
    assert "charset_guessed" in m.flags


def test_spanish_cp1252_bytes_declared_utf8() -> None:
    m = fixture("es_cp1252_declared_utf8.eml")
    assert_clean(m.text + m.signature + m.quoted)
    assert "Los módems de la oficina de Málaga no tienen conexión" in m.text
    assert m.subject == "Re: Sin conexión en Málaga"      # two adjacent encoded words joined without a space
    assert m.sender_name == "Íñigo Muñoz"
    assert "charset_guessed" in m.flags


def test_swedish_utf8_labelled_latin1_and_raw_utf8_header() -> None:
    m = fixture("sv_utf8_labelled_latin1.eml")
    assert_clean(m.text + m.subject + (m.sender_name or ""))
    assert "Vi vill beställa 200 nya SIM-kort till våra mätare." in m.text
    assert m.subject == "Beställning av SIM-kort till mätare"
    assert m.sender_name == "Per Åström"


def test_broken_encoded_words_and_unknown_charsets() -> None:
    m = fixture("sv_broken_headers.eml")
    assert m.subject == "Fråga om fakturan för maj"
    assert m.sender_name == "Jörgen"
    assert m.text == "Hej, en kort fråga om fakturan."
    assert m.message_id == "<broken1@kund.se>"
    assert m.date is None
    assert "charset_guessed" in m.flags


@pytest.mark.parametrize("raw,charset,expected", [
    ("Tack så mycket – åäö".encode("cp1252"), "iso-8859-1", "Tack så mycket – åäö"),
    ("Tack så mycket – åäö".encode("utf-8"), "iso-8859-1", "Tack så mycket – åäö"),
    ("Año, señal, niño".encode("cp1252"), "utf-8", "Año, señal, niño"),
    ("Año, señal, niño".encode("cp1252"), "us-ascii", "Año, señal, niño"),
    ("Año, señal, niño".encode("cp1252"), None, "Año, señal, niño"),
    ("Año".encode("utf-8"), "uft-8", "Año"),                       # a typo'd label seen in real mail
    ("Ã¥ngest".encode("utf-8"), "utf-8", "ångest"),                 # double-encoded UTF-8 repaired
    ("plain ascii".encode(), "x-nonsense", "plain ascii"),
])
def test_decode_bytes_repairs_labels(raw: bytes, charset: str | None, expected: str) -> None:
    assert decode_bytes(raw, charset)[0] == expected


def test_decode_header_rfc2047_variants() -> None:
    assert decode_header("=?utf-8?B?w4VzYQ==?= =?utf-8?Q?_=C3=96berg?=")[0] == "Åsa Öberg"
    assert decode_header("=?ISO-8859-1?Q?Fr=E5ga?= om =?iso-8859-1?q?SIM?=")[0] == "Fråga om SIM"
    assert decode_header("=?utf-8?B?w4VzYQ?=")[0] == "Åsa"          # missing base64 padding
    assert decode_header("Re: =?utf-8?Q?broken")[0] == "Re: =?utf-8?Q?broken"
    assert decode_header("a\r\n b")[0] == "a b"


# --- structure, fields, flags ---------------------------------------------------------------------------

def test_fields_of_an_outlook_reply() -> None:
    m = fixture("sv_outlook_cp1252.eml")
    assert m.source == "email"
    assert m.message_id == "<AM0PR01MB1234ABCD@eurprd01.prod.outlook.com>"
    assert m.recipients == ("support@operatorn.se", "drift@operatorn.se", "chef@larmbolaget.se")
    assert m.in_reply_to == ("<abc123@operatorn.se>",)
    assert m.references == ("<first@operatorn.se>", "<abc123@operatorn.se>")
    assert m.date == datetime(2023, 5, 3, 9, 20, tzinfo=timezone.utc)
    assert m.header("x-auto-response-suppress") == "All"
    assert ("Thread-Topic", "Larm utan data") in m.headers
    # the reply, the Outlook block below it, the signature and the legal footer are apart
    assert m.text.startswith("Hej!") and m.text.endswith("Kostnaden är ca 500 €.")
    assert m.signature.startswith("Med vänliga hälsningar\nÅsa Öberg")
    assert "konfidentiell" in m.signature
    assert m.quoted.startswith("Från: Support <support@operatorn.se>\nSkickat:")
    assert "kan du skicka ICCID" in m.quoted and "kan du skicka" not in m.text


def test_spanish_gmail_reply_split() -> None:
    m = fixture("es_cp1252_declared_utf8.eml")
    assert m.text.endswith("la producción está parada.")
    assert m.signature == "Saludos,\nÍñigo Muñoz\nResponsable de TI"
    assert m.quoted.startswith("El mar, 2 may 2023 a las 9:15, Soporte (<soporte@operador.es>) escribió:")


def test_html_only_mail_gives_readable_text() -> None:
    m = fixture("en_html_only.eml")
    assert "html_only" in m.flags
    assert m.text.startswith("Hello team,\n\nSince 06:00 the following trackers cannot attach & send data:")
    assert f"{ICCID}\tDepot North" in m.text          # table rows as tab-separated lines, &nbsp; decoded
    assert "- APN: iot.example\n- Roaming: off" in m.text
    assert "color: red" not in m.text and "not text" not in m.text and "ignored title" not in m.text
    assert m.signature == "Kind regards,\nJane Doe\nFleet Ops"
    assert m.quoted.startswith("From: Support <support@operator.com>")
    assert "please send the ICCIDs" in m.quoted


def test_forward_without_comment_is_new_text() -> None:
    m = fixture("es_forward_only.eml")
    assert "forwarded" in m.flags
    assert m.text == "Buenas tardes, tres alarmas del edificio no envían SMS desde el sábado."


def test_crlf_mail_parses_like_lf() -> None:
    raw = (FIXTURES / "sv_autosvar_subject_crlf.eml").read_bytes()
    assert b"\r\n" in raw
    crlf, lf, cr = parse_email(raw), parse_email(raw.replace(b"\r\n", b"\n")), parse_email(raw.replace(b"\r\n", b"\r"))
    assert crlf.text == lf.text == cr.text == "Jag är på semester till och med 15 maj med begränsad tillgång till e-post."
    assert crlf.subject == lf.subject == cr.subject == "Automatiskt svar: Larm utan data"


def test_mbox_from_line_is_skipped() -> None:
    raw = b"From MAILER-DAEMON Sat Oct  4 08:00:09 2025\n" + (FIXTURES / "sv_broken_headers.eml").read_bytes()
    assert parse_email(raw).subject == "Fråga om fakturan för maj"


# --- attachments ----------------------------------------------------------------------------------------

def test_csv_attachment_text_in_cp1252() -> None:
    m = fixture("sv_csv_attachment.eml")
    assert m.text == "Hej, se bifogad lista med kort som slutat fungera."    # text/plain preferred to HTML
    csv = next(a for a in m.attachments if a.filename == "kort.csv")
    assert csv.content_type == "text/csv" and csv.size == 96
    assert csv.text.splitlines()[1] == f"{ICCID};Göteborg;Inaktiv"
    assert ICCID in m.attachment_text
    png = next(a for a in m.attachments if a.filename == "logo.png")
    assert png.text is None


def _mail_with_attachment(data: bytes, maintype: str, subtype: str, filename: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "ops@kund.se"
    msg["To"] = "support@operatorn.se"
    msg["Subject"] = "SIM-lista"
    msg.set_content("Se bifogad lista.")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def test_xlsx_attachment_text() -> None:
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["ICCID", "IMSI", "Aktiverad"])
    ws.append([ICCID, 240071234567890, datetime(2023, 5, 1)])
    ws.append([89460123456789012354, None, None])        # an ICCID typed as a number
    wb.create_sheet("Tom")
    buf = io.BytesIO()
    wb.save(buf)
    raw = _mail_with_attachment(buf.getvalue(), "application",
                                "vnd.openxmlformats-officedocument.spreadsheetml.sheet", "sims.xlsx")
    m = parse_email(raw)
    (att,) = m.attachments
    assert att.filename == "sims.xlsx" and att.size == len(buf.getvalue())
    lines = att.text.splitlines()
    assert "ICCID\tIMSI\tAktiverad" in lines
    assert f"{ICCID}\t240071234567890\t2023-05-01T00:00:00" in lines
    # Excel keeps a typed number as a double (the last digits are lost), but it must not read 8.946e+19
    assert "\n8946012345678900" in att.text and "e+" not in att.text


def test_xlsx_octet_stream_by_extension_and_row_cap() -> None:
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet()
    for n in range(MAX_ROWS + 50):
        ws.append([f"8946{n:016d}"])
    buf = io.BytesIO()
    wb.save(buf)
    text = extract_text("lista.XLSX", "application/octet-stream", buf.getvalue())
    assert text is not None and len(text.splitlines()) == MAX_ROWS
    assert extract_text("lista.xlsx", "application/octet-stream", b"PK\x03\x04 not a zip") is None


def test_txt_attachment_with_bom_and_utf16() -> None:
    assert extract_text("a.txt", "text/plain", "\ufeffÅsa\r\nÖrjan".encode("utf-8")) == "Åsa\nÖrjan"
    assert extract_text("a.csv", "application/vnd.ms-excel", "Åsa;1".encode("utf-16")) == "Åsa;1"
    assert extract_text("a.pdf", "application/pdf", b"%PDF-1.4") is None


# --- bad input and bounds -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,message", [
    (b"", "empty input"),
    (b"   \r\n\n ", "empty input"),
    (b"\x00\x01\x02\x03" * 100, "not an email: binary data"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not an email"),
    (b"just some words on a line\nand another\n", "not an email"),
    ('{"type": "message"}'.encode(), "not an email"),
    (b"Note: call Anna about the SIMs\nTodo: invoice\n", "not an email: no From"),
])
def test_not_an_email_raises_one_line_input_error(raw: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as e:
        parse_email(raw)
    assert "\n" not in str(e.value)


def test_non_bytes_input_is_input_error() -> None:
    with pytest.raises(InputError):
        parse_email("From: a@b.c\n\nhi")  # type: ignore[arg-type]


def test_deep_nesting_and_many_parts_are_bounded() -> None:
    depth = 60
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth))
    tail = "".join(f"\n--b{i}--\n" for i in reversed(range(depth)))
    raw = ("From: a@b.se\nSubject: deep\nMIME-Version: 1.0\n" + head + "Content-Type: text/plain\n\nDjupt.\n" + tail)
    m = parse_email(raw.encode())
    assert "malformed_mime" in m.flags
    parts = "".join(f"--x\nContent-Type: text/plain\nContent-Disposition: attachment; filename=f{i}.txt\n\n{i}\n"
                    for i in range(MAX_PARTS * 2))
    raw = f'From: a@b.se\nSubject: many\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="x"\n\n{parts}--x--\n'
    m = parse_email(raw.encode())
    assert len(m.attachments) < MAX_PARTS + 1
    assert "malformed_mime" in m.flags


def test_missing_boundary_is_flagged_not_raised() -> None:
    raw = b"From: a@b.se\nSubject: x\nMIME-Version: 1.0\nContent-Type: multipart/alternative\n\nHej, inget fungerar.\n"
    m = parse_email(raw)
    assert "malformed_mime" in m.flags
    assert "inget fungerar" in m.text


def test_mangled_mail_never_raises_anything_but_input_error() -> None:
    """Truncations and byte flips of a real fixture: a Message or an InputError, nothing else."""
    raw = (FIXTURES / "sv_csv_attachment.eml").read_bytes()
    variants = [raw[:n] for n in range(0, len(raw), 37)]
    variants += [raw[:n] + b"\xff\x00\xfe" + raw[n + 3:] for n in range(0, len(raw), 53)]
    variants += [raw.replace(b"boundary=", b"boundary"), raw.replace(b"base64", b"quoted-printable"),
                 raw.replace(b"\n", b"\r"), raw.replace(b"--outer--", b"")]
    for v in variants:
        try:
            assert isinstance(parse_email(v), Message)
        except InputError:
            pass


def test_no_text_flag_for_attachment_only_mail() -> None:
    raw = _mail_with_attachment(b"\x89PNG....", "image", "png", "x.png").replace(b"Se bifogad lista.", b"")
    assert "no_text" in parse_email(raw).flags


# --- html_to_text ---------------------------------------------------------------------------------------

def test_html_to_text_blocks_entities_and_quotes() -> None:
    html = ("<p>Hola&nbsp;equipo,</p><p>l&iacute;nea 1<br>l&iacute;nea 2</p><ol><li>uno</li><li>dos</li></ol>"
            "<table><tr><td>a</td><td>b</td></tr></table><blockquote>citado</blockquote><hr><p>fin</p>")
    text = html_to_text(html)
    assert text.splitlines() == ["Hola equipo,", "", "línea 1", "línea 2", "", "1. uno", "2. dos", "a\tb", "",
                                 "> citado", "", "_" * 32, "", "fin"]


@pytest.mark.parametrize("unit", ["<", "<!--", "<a ", "<a href=\"", "<?x", "<!x", "</", "<blockquote>"])
def test_html_to_text_is_linear_on_hostile_markup(unit: str) -> None:
    """CPython's HTMLParser rescans unclosed constructs from each "<": 100 kB of "<a " took minutes."""
    import time
    start = time.perf_counter()
    text = html_to_text(unit * (100_000 // len(unit)))
    assert time.perf_counter() - start < 5
    assert max((len(line) for line in text.splitlines()), default=0) <= 100_000


def test_html_to_text_survives_broken_markup() -> None:
    assert "text" in html_to_text("<div><p>text<span><<>></</unclosed")
    assert html_to_text("") == ""
    assert html_to_text("<style>x{}</style><script>1</script>") == ""


# --- message_from_text and load_input -------------------------------------------------------------------

def test_message_from_text_email_and_html() -> None:
    m = message_from_text("email", "Problem", "Hej,\n\nInget fungerar.\n\nMvh\nAnna\n\n> gammalt")
    assert (m.source, m.subject, m.text, m.signature, m.quoted) == ("email", "Problem", "Hej,\n\nInget fungerar.",
                                                                     "Mvh\nAnna", "> gammalt")
    h = message_from_text("email", None, "<p>Hola,</p><p>no funciona</p>", html=True, headers={"X-Id": "1"})
    assert h.text == "Hola,\n\nno funciona" and "html_only" in h.flags and h.header("x-id") == "1"
    s = message_from_text("slack", None, "hej <@U1|anna>, *inget* funkar")
    assert s.source == "slack" and s.text == "hej @anna, inget funkar"


def test_load_input_by_suffix_and_sniffing(tmp_path: Path) -> None:
    eml = (FIXTURES / "sv_broken_headers.eml").read_bytes()
    event = {"type": "message", "channel": "C1", "user": "U1", "text": "hej", "ts": "1.2"}
    (tmp_path / "a.eml").write_bytes(eml)
    (tmp_path / "b.json").write_text(json.dumps(event))
    (tmp_path / "c.msg").write_text(json.dumps(event))
    (tmp_path / "d.txt").write_bytes(eml)
    assert load_input(tmp_path / "a.eml").subject == "Fråga om fakturan för maj"
    assert load_input(tmp_path / "b.json").source == "slack"
    assert load_input(tmp_path / "c.msg").source == "slack"
    assert load_input(tmp_path / "d.txt").source == "email"


@pytest.mark.parametrize("name,content,message", [
    ("missing.eml", None, "cannot read"),
    ("empty.eml", b"", "empty file"),
    ("blank.json", b"  \n", "empty file"),
    ("bad.json", b"{not json", "not valid JSON"),
    ("list.json", b"[1, 2]", "not valid JSON: expected an object"),
    ("latin1.json", b'{"text": "\xe5"}', "not valid JSON"),
    ("junk.eml", b"\x00\x01\x02" * 50, "not an email"),
    ("prose.dat", b"hello there\n", "not an email"),
    ("notslack.json", b'{"type": "reaction_added"}', "not a Slack message event"),
])
def test_load_input_errors_are_one_line(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        load_input(path)
    assert "\n" not in str(e.value)


def test_load_input_directory_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_input(tmp_path)


def test_base64_body_with_garbage_is_read() -> None:
    body = base64.b64encode("Hej, SIM-kortet är trasigt.".encode()).decode()
    raw = f"From: a@b.se\nSubject: x\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n{body}!!\n"
    assert parse_email(raw.encode()).text.startswith("Hej, SIM-kortet är trasigt.")


# An address in the display name is text, never the sender: the addr-spec is found before RFC 2047 decoding
# (RFC 2047 §5: an encoded word is never part of an addr-spec), so a decoded "@" cannot become the address.
@pytest.mark.parametrize("from_value, sender, name", [
    (b"=?utf-8?q?boss=40bigcustomer=2Ecom?= <attacker@evil.example>", "attacker@evil.example", "boss@bigcustomer.com"),
    (b"=?utf-8?b?Ym9zc0BiaWdjdXN0b21lci5jb20=?= <attacker@evil.example>", "attacker@evil.example",
     "boss@bigcustomer.com"),
    (b'"ops@known-customer.se" <x@evil.example>', "x@evil.example", "ops@known-customer.se"),
    (b"=?utf-8?q?=22ops=40known-customer=2Ese=22?= <x@evil.example>", "x@evil.example", '"ops@known-customer.se"'),
    (b"=?utf-8?q?boss=40bigcustomer=2Ecom=2C?= <attacker@evil.example>", "attacker@evil.example",
     "boss@bigcustomer.com,"),
    (b"=?utf-8?q?a_=3Cboss=40bigcustomer=2Ecom=3E?= <attacker@evil.example>", "attacker@evil.example",
     "a <boss@bigcustomer.com>"),
    (b"=?utf-8?q?boss=40bigcustomer=2Ecom?=\r\n <attacker@evil.example>", "attacker@evil.example",
     "boss@bigcustomer.com"),
    (b"=?utf-8?q?=C3=85sa_=C3=96berg?= <Asa.Oberg@Larmbolaget.se>", "asa.oberg@larmbolaget.se", "Åsa Öberg"),
    (b"Per \xc3\x85str\xc3\xb6m <per@example.se>", "per@example.se", "Per Åström"),
])
def test_the_sender_is_the_addr_spec_never_an_address_in_the_display_name(from_value: bytes, sender: str,
                                                                          name: str) -> None:
    m = parse_email(b"From: " + from_value + b"\r\nTo: support@support.example.net\r\nSubject: hi\r\n\r\nhello\r\n")
    assert (m.sender, m.sender_name) == (sender, name)
    assert m.sender_domain == sender.rsplit("@", 1)[1]


def test_an_encoded_word_alone_in_from_is_no_address() -> None:
    """Without an addr-spec there is no sender to take: the decoded text must not become one."""
    m = parse_email(b"From: =?utf-8?q?boss=40bigcustomer=2Ecom?=\r\nSender: =?utf-8?q?x=40y=2Ez?= <real@relay.example>"
                    b"\r\nSubject: hi\r\n\r\nhello\r\n")
    assert (m.sender, m.sender_name) == ("real@relay.example", "x@y.z")


def test_an_address_in_a_recipient_display_name_is_no_recipient() -> None:
    m = parse_email(b"From: a@b.se\r\nTo: =?utf-8?q?victim=40elsewhere=2Eexample?= <support@support.example.net>"
                    b"\r\nCc: \"cc@elsewhere.example\" <ops@b.se>\r\nSubject: hi\r\n\r\nhello\r\n")
    assert m.recipients == ("support@support.example.net", "ops@b.se")
