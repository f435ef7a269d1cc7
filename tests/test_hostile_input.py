"""Hostile and broken input: nothing a sender can put in a mail or a Slack event crashes, hangs or floods us.

* property tests (hypothesis): arbitrary bytes, generated MIME, mutated mails of ../shared/corpora/email-raw
  and arbitrary JSON-ish Slack payloads give a Message or an InputError, nothing else, and the Message is
  fit to store (no NUL, no lone surrogate) and bounded;
* monsters (1,000-deep multipart, a 5 MB header line, 50,000 parts, zip bombs named .xlsx, ...), each in
  its own subprocess with a 1.5 GB address-space limit and a 20 s wall clock: the clock is a hang detector,
  not a performance assertion;
* what we show and send: customer text in Slack blocks is never markup, and a subject or name with CR/LF
  never becomes a header of an acknowledgement.

Run one monster by hand: `.venv/bin/python tests/test_hostile_input.py nested_multipart_1000`.
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import zipfile
from email import message_from_bytes
from email.message import _parseparam  # type: ignore[attr-defined]  # the stdlib rule our parser must equal
from email.policy import compat32
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # when run as a script for one monster
    sys.path.insert(0, str(ROOT))

from triagebot.errors import InputError  # noqa: E402
from triagebot.model import DISPOSITIONS, Message, Triage  # noqa: E402
from triagebot.normalize import html_to_text, split_reply  # noqa: E402
from triagebot.normalize import email as email_mod  # noqa: E402
from triagebot.normalize.attachments import MAX_TEXT_CHARS, xlsx_text  # noqa: E402
from triagebot.normalize.email import parse_email  # noqa: E402
from triagebot.normalize.slack import parse_slack  # noqa: E402
from triagebot.steps.disposition import DispositionStep  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "email-raw"
NOT_MESSAGES = {"LICENSE", "MANIFEST.tsv", "SOURCE.md"}
WATCHDOG_SECONDS = 20             # per example / per monster: a hang detector, far above any real cost
MEMORY_LIMIT = 1536 * 2 ** 20     # RLIMIT_AS of a monster's subprocess
KNOWN_FLAGS = {"malformed_mime", "charset_guessed", "html_only", "forwarded", "no_text", "edited", "bot_message"}
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# CI stability: the same examples every run, no per-example deadline (the watchdog catches hangs)
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so no `except Exception` in the code under test eats it."""


@contextlib.contextmanager
def watchdog(seconds: float = WATCHDOG_SECONDS) -> Iterator[None]:
    """Fail with Hang when the block runs longer than `seconds` (SIGALRM; pytest runs tests in the main thread)."""
    def fire(_sig: int, _frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_STEP: DispositionStep | None = None


def _step() -> DispositionStep:
    global _STEP
    if _STEP is None:
        _STEP = DispositionStep()
    return _STEP


def check_storable(m: Message) -> None:
    """Every text of the message can go into PostgreSQL text/jsonb and through a UTF-8 encoder."""
    texts = [m.text, m.subject, m.message_id, m.sender, m.sender_name, m.quoted, m.signature, m.channel,
             m.team_id, m.ts, m.thread_ts, m.user_locale, *m.recipients, *m.in_reply_to, *m.references, *m.flags]
    texts += [x for kv in m.headers for x in kv]
    texts += [x for a in m.attachments for x in (a.filename, a.content_type, a.text)]
    for t in texts:
        if t is not None:
            assert isinstance(t, str)
            assert not _UNSTORABLE.search(t), f"unstorable character in {t[:80]!r}"


def check_email(m: Message) -> None:
    """What any e-mail Message must be: typed, bounded, storable, and the disposition step can judge it."""
    assert isinstance(m, Message) and m.source == "email"
    assert set(m.flags) <= KNOWN_FLAGS, m.flags
    check_storable(m)
    assert len(m.text) <= email_mod.MAX_BODY_CHARS
    assert len(m.headers) <= email_mod.MAX_HEADERS
    assert all(len(v) <= email_mod.MAX_HEADER_VALUE for _k, v in m.headers)
    assert len(m.recipients) <= email_mod.MAX_ADDRESSES
    assert all(a.text is None or len(a.text) <= MAX_TEXT_CHARS for a in m.attachments)
    t = _step()(m, Triage())
    assert t.disposition in DISPOSITIONS and t.trail


def outcome(raw: bytes) -> str:
    """Run parse_email + disposition + split_reply under the watchdog: 'message' or 'input_error'."""
    with watchdog():
        try:
            m = parse_email(raw)
        except InputError as e:
            assert "\n" not in str(e)   # answered with one line
            return "input_error"
        check_email(m)
        parts = split_reply(m.text + "\n" + m.quoted)
        assert isinstance(parts.new, str) and isinstance(parts.quoted, str)
    return "message"


# -- the corpus -------------------------------------------------------------------------------------------

def _corpus_files(max_bytes: int) -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name not in NOT_MESSAGES
                  and p.parent.name != "mbox" and p.stat().st_size <= max_bytes)


# mutation sources: the corpus' small and middle-sized mails (the 2-3 MB torture tests are run whole elsewhere)
SOURCES = _corpus_files(200_000)
needs_corpus = pytest.mark.skipif(not SOURCES, reason=f"{CORPUS} is absent (shared/ sits beside the project root)")


# -- strategies ------------------------------------------------------------------------------------------

_HEADER_NAMES = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "Sender",
                 "Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "MIME-Version", "Reply-To",
                 "Auto-Submitted", "X-Autoreply", "Precedence", "Return-Path", "X-Failed-Recipients", "Received"]
_CTYPES = ["text/plain", "text/html", "multipart/mixed", "multipart/alternative", "multipart/report",
           "multipart/related", "message/rfc822", "message/delivery-status", "text/rfc822-headers",
           "application/octet-stream", "text/csv", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
           "image/png", "multipart/signed", "x/y", "text", "/"]
_CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii", "utf-7", "utf-16", "iso-2022-jp", "koi8-r",
             "unicode-escape", "x-unknown", "gb2312", "bogus", "'utf-8'", "", "utf\x008", "iso-88\x0059-1"]
_TOKENS = ['"', ";", "=", "\\", "=?", "?=", "=?utf-8?b?", "=?utf-8?q?", "=?x?Q?", "?", "<", ">", "(", ")", "@", ",",
           ":", " ", "\t", "*", "'", "%", "%E5", "--", "\r\n ", "\n\t", "\x00", "\x7f", "=C3=A5", "ICCID ",
           "89460123456789012345", "wrote:", "skrev", "> ", "b", "boundary", "charset", "name*0*=", "utf-8''"]
_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_VALUE = st.lists(st.one_of(st.sampled_from(_TOKENS), _TEXT), max_size=12).map("".join)


@st.composite
def header_lines(draw: st.DrawFn, boundary: str) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.one_of(st.sampled_from(_HEADER_NAMES), st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True)))
        if name == "Content-Type":
            value = f"{draw(st.sampled_from(_CTYPES))}; boundary=\"{boundary}\"; charset={draw(st.sampled_from(_CHARSETS))}"
            value += draw(st.sampled_from(["", "; name=\"sims.xlsx\"", "; name*0*=utf-8''%E5%E4; name*1*=.csv",
                                           "; report-type=delivery-status", "; " + ";" * 50 + '"']))
        elif name == "Content-Transfer-Encoding":
            value = draw(st.sampled_from(["base64", "quoted-printable", "7bit", "8bit", "binary", "x-uuencode", "bogus"]))
        else:
            value = draw(_VALUE)
        lines.append(f"{name}: {value}")
    return lines


@st.composite
def mime_mails(draw: st.DrawFn) -> bytes:
    """Mails shaped like MIME: real header names, boundaries, nested parts, broken in every way generated."""
    boundary = draw(st.sampled_from(["B", "==b", "x" * 70, "", "a b", '"', "--"]))
    head = ["From: Anna <anna@example.se>"] + draw(header_lines(boundary))
    body: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["part", "close", "text", "quote", "html", "b64", "headers"]))
        if kind == "part":
            body += [f"--{boundary}"] + draw(header_lines(boundary)) + [""]
        elif kind == "close":
            body.append(f"--{boundary}--")
        elif kind == "quote":
            body += ["On Mon, 3 Mar 2025, Bob <b@x.se> wrote:"] + [">" * draw(st.integers(1, 30)) + " " + draw(_TEXT)]
        elif kind == "html":
            body.append(draw(st.lists(st.sampled_from(["<div>", "<blockquote>", "<table><tr><td>", "<a href='",
                                                       "<!--", "<script>", "</p>", "<br>", "&#", "&amp;", "x"]),
                                      max_size=30).map("".join)))
        elif kind == "b64":
            body.append(base64.b64encode(draw(st.binary(max_size=60))).decode() + draw(st.sampled_from(["", "=", "!"])))
        elif kind == "headers":
            body += draw(header_lines(boundary))
        else:
            body.append(draw(_VALUE))
    newline = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    text = newline.join(head) + newline + newline + newline.join(body)
    return text.encode(draw(st.sampled_from(["utf-8", "latin-1"])), "replace")


@st.composite
def mutated_corpus_mails(draw: st.DrawFn) -> bytes:
    """A mail of the corpus with byte flips, cuts, duplicated headers and corrupted boundaries."""
    raw = bytearray(draw(st.sampled_from(SOURCES)).read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "dup_headers", "boundary", "insert", "delete_lines"]))
        n = len(raw)
        if not n:
            break
        pos = draw(st.integers(0, n - 1))
        if op == "flip":
            for k in range(draw(st.integers(1, 16))):
                raw[(pos + k * 97) % n] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[pos:]
        elif op == "dup_headers":
            head, sep, body = bytes(raw).partition(b"\n\n")
            lines = head.split(b"\n")
            dup = lines[:draw(st.integers(1, max(1, len(lines))))] * draw(st.integers(2, 50))
            raw = bytearray(b"\n".join(lines + dup) + sep + body)
        elif op == "boundary":
            found = re.findall(rb'boundary="?([^";\r\n]+)', bytes(raw), re.IGNORECASE)
            if found:
                b = draw(st.sampled_from(found))
                how = draw(st.sampled_from(["unclose", "mangle", "drop", "prefix", "nest"]))
                s = bytes(raw)
                if how == "unclose":
                    s = s.replace(b"--" + b + b"--", b"--" + b)
                elif how == "mangle":
                    s = s.replace(b + b"\n", b[:-1] + b"\n", draw(st.integers(1, 3)))
                elif how == "drop":
                    s = s.replace(b"--" + b, b"")
                elif how == "prefix":
                    s = s.replace(b"boundary=\"" + b, b"boundary=\"" + b[:1])
                else:
                    s = s.replace(b"\n--" + b + b"\n", b"\n--" + b + b"\nContent-Type: multipart/mixed; boundary=\""
                                  + b + b"\"\n\n--" + b + b"\n", 3)
                raw = bytearray(s)
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            lines = bytes(raw).split(b"\n")
            k = draw(st.integers(0, max(0, len(lines) - 1)))
            del lines[k:k + draw(st.integers(1, 20))]
            raw = bytearray(b"\n".join(lines))
    return bytes(raw)


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _TEXT,
                       st.sampled_from(["message", "app_mention", "event_callback", "message_changed", "bot_message",
                                        "message_deleted", "rich_text", "rich_text_section", "text", "link", "user",
                                        "1712345678.000100", "C0123", "<!channel>", "*bold*", "```code", "nan", "inf",
                                        "-1e309", "9" * 400, "\x007\x00 `x`", "\x00"]))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                          st.dictionaries(_TEXT, inner, max_size=5)), max_leaves=25)
_EVENT_KEYS = {"type": st.one_of(st.sampled_from(["message", "app_mention"]), _JSON),
               "subtype": st.one_of(st.sampled_from(["message_changed", "bot_message", "file_share", "channel_join"]),
                                    _JSON),
               "channel": st.one_of(st.just("C0123"), _JSON), "ts": st.one_of(st.just("1712345678.000100"), _JSON),
               "text": _JSON, "user": _JSON, "blocks": _JSON, "files": _JSON, "message": _JSON, "bot_id": _JSON,
               "thread_ts": _JSON, "team": _JSON, "username": _JSON, "user_locale": _JSON}
slack_events = st.fixed_dictionaries({}, optional=_EVENT_KEYS)
slack_payloads = st.one_of(
    slack_events,
    st.fixed_dictionaries({"type": st.just("event_callback"), "event": st.one_of(slack_events, _JSON)},
                          optional={"team_id": _JSON}),
    st.dictionaries(_TEXT, _JSON, max_size=6),
)


# -- property tests -----------------------------------------------------------------------------------------

@PROPERTY
@given(st.one_of(st.binary(max_size=4096),
                 st.tuples(st.sampled_from([b"From: a@b.se\n", b"Subject: x\r\n", b"Content-Type: multipart/mixed; "
                                            b"boundary=x\n\n--x\n", b"From x Mon\nTo: b@c.se\n\n"]),
                           st.binary(max_size=4096)).map(b"".join)))
def test_arbitrary_bytes_give_a_message_or_an_input_error(raw: bytes) -> None:
    outcome(raw)


@PROPERTY
@given(mime_mails())
def test_generated_mime_gives_a_message_or_an_input_error(raw: bytes) -> None:
    outcome(raw)


@needs_corpus
@settings(PROPERTY, max_examples=120)
@given(mutated_corpus_mails())
def test_mutated_corpus_mails_give_a_message_or_an_input_error(raw: bytes) -> None:
    outcome(raw)


@needs_corpus
def test_every_corpus_mail_truncated_at_every_tenth_still_parses() -> None:
    for path in SOURCES:
        raw = path.read_bytes()
        for k in range(1, 10):
            outcome(raw[:len(raw) * k // 10])


@PROPERTY
@given(slack_payloads)
def test_arbitrary_slack_payloads_give_a_message_or_an_input_error(payload: dict) -> None:
    with watchdog():
        try:
            m = parse_slack(payload)
        except InputError as e:
            assert "\n" not in str(e)
            return
    assert isinstance(m, Message) and m.source == "slack" and m.channel and m.ts
    assert set(m.flags) <= KNOWN_FLAGS
    check_storable(m)
    assert _step()(m, Triage()).disposition == "case"


def test_slack_json_that_python_cannot_read_is_an_input_error(tmp_path: Path) -> None:
    """load_input: a 5,000-digit number (int conversion limit) or 100,000 nested arrays is bad JSON, not a crash."""
    from triagebot.normalize import load_input
    for name, text in (("digits", '{"type": "message", "ts": ' + "1" * 5000 + "}"),
                       ("nested", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")):
        f = tmp_path / f"{name}.json"
        f.write_text(text)
        with pytest.raises(InputError, match="not valid JSON"):
            load_input(f)


def test_nul_digits_nul_in_slack_text_is_no_placeholder() -> None:
    """Found by the fuzzer: mrkdwn_to_text keeps code as "\\x00<n>\\x00" placeholders; the same in the text raised
    IndexError, or pulled a code block into the wrong place."""
    m = parse_slack({"type": "message", "channel": "C1", "ts": "1.2", "text": "a\x009\x00b `x` \x000\x00"})
    assert m.text == "a9b x 0"
    check_storable(m)


def test_a_slack_event_with_a_huge_number_for_an_id_is_read() -> None:
    m = parse_slack({"type": "message", "channel": "C1", "ts": "1.2", "user": 10 ** 5000, "text": "hej"})
    assert m.sender is None and m.text == "hej"


@PROPERTY
@given(st.text(st.sampled_from(list(';"\\= aé\t')), max_size=60))
def test_linear_mime_parameter_split_equals_the_stdlib_rule(value: str) -> None:
    """Our linear replacement of email.message._parseparam splits exactly as the stdlib does."""
    assert email_mod._split_params(value) == _parseparam(value)


@PROPERTY
@given(st.text(max_size=2000))
def test_html_to_text_never_raises_and_drops_scripts(html: str) -> None:
    with watchdog():
        text = html_to_text(html + "<script>alert('x')</script><style>p{}</style>")
    assert isinstance(text, str)
    assert "alert(" not in text.replace(html, "")   # the script we added is gone (unless the input held it)


@PROPERTY
@given(st.lists(st.sampled_from(["> ", ">", "On Mon, 3 Mar 2025 Bob <b@x.se> wrote:", "-- ", "Hälsningar,", "Anna",
                                 "From: Bob", "Sent: 3 March 2025 10:00", "________________", "", "text", "\t"]),
                max_size=60).map("\n".join))
def test_split_reply_keeps_every_line_somewhere(text: str) -> None:
    with watchdog():
        parts = split_reply(text)
    kept = "\n".join((parts.new, parts.quoted, parts.signature))
    for line in text.split("\n"):
        # a forwarded body loses one level of "> " when unwrapped; otherwise nothing is invented or lost
        assert line.strip().lstrip("> ").strip() in kept


def test_the_mime_parameter_parser_is_what_the_parser_uses() -> None:
    """The linear parser is wired in: a 2 MB Content-Type of semicolons in quotes (hours for the stdlib's) parses."""
    raw = (b'From: a@b.se\r\nContent-Type: multipart/mixed; boundary="x' + b";" * 2_000_000 + b'\r\n\r\nhej\r\n')
    with watchdog():
        m = parse_email(raw)
    assert "hej" in m.text


def test_nested_comments_in_an_address_header_are_no_address() -> None:
    raw = b"From: anna@example.se\r\nTo: " + b"(" * 7000 + b"\r\nSubject: hej\r\n\r\nHej!\r\n"
    with watchdog():
        m = parse_email(raw)
    assert m.sender == "anna@example.se" and m.recipients == () and m.text == "Hej!"


def test_a_nul_in_a_charset_label_is_an_unknown_charset() -> None:
    """Found by the fuzzer: codecs.lookup raises ValueError (not LookupError) on a NUL, in _parse and again in
    the fallback, so parse_email raised ValueError."""
    raw = (b"From: a@b.se\r\nSubject: =?iso-88\x0059-15?q?caf=E9?=\r\n"
           b"Content-Type: text/plain; charset=\"utf\x008\"\r\n\r\nHej v\xe4rlden\r\n")
    with watchdog():
        m = parse_email(raw)
    check_email(m)
    assert m.text == "Hej världen" and m.subject == "café"


def test_nul_and_lone_surrogates_never_reach_the_message() -> None:
    raw = (b"From: a@b.se\r\nSubject: s\x00x\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n"
           b"Hej +2AA- v\x00rlden\r\n")
    with watchdog():
        m = parse_email(raw)
    check_storable(m)
    assert m.subject == "sx" and m.text == "Hej \ufffd vrlden"


# -- monsters, each in a subprocess with a memory and a time limit ------------------------------------------

_HEAD = (b"From: Anna <anna@example.se>\r\nTo: support@example.net\r\nSubject: SIM problem\r\n"
         b"Date: Mon, 3 Mar 2025 10:00:00 +0100\r\nMessage-ID: <m1@example.se>\r\nMIME-Version: 1.0\r\n")
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def _with_attachment(data: bytes, filename: str, ctype: str) -> bytes:
    return (_HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n'
            b"The list is attached.\r\n--B\r\nContent-Type: " + ctype.encode() + b'; name="' + filename.encode()
            + b'"\r\nContent-Disposition: attachment; filename="' + filename.encode()
            + b'"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + base64.encodebytes(data) + b"--B--\r\n")


def _xlsx(members: dict[str, bytes], streamed: dict[str, tuple[bytes, bytes, int, bytes]] | None = None) -> bytes:
    """A minimal workbook; `streamed` members are written as head + chunk * n + tail without holding them in memory."""
    base = {
        "[Content_Types].xml": b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
                               b'content-types"><Default Extension="xml" ContentType="application/xml"/></Types>',
        "xl/workbook.xml": b'<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r='
                           b'"http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets>'
                           b'<sheet name="SIMs" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
                                      b'relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.'
                                      b'org/officeDocument/2006/relationships/worksheet" Target="worksheets/'
                                      b'sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": _sheet(b'<row r="1"><c r="A1" t="inlineStr"><is><t>8946000000000000001</t>'
                                           b'</is></c></row>'),
    }
    base.update(members)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in base.items():
            if streamed and name in streamed:
                continue
            z.writestr(name, data)
        for name, (head, chunk, n, tail) in (streamed or {}).items():
            with z.open(name, "w", force_zip64=True) as f:
                f.write(head)
                for _ in range(n):
                    f.write(chunk)
                f.write(tail)
    return out.getvalue()


def _sheet(rows: bytes, dimension: bytes = b"") -> bytes:
    return (b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">' + dimension
            + b"<sheetData>" + rows + b"</sheetData></worksheet>")


_SHEET_HEAD = b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'


def _nested(depth: int) -> bytes:
    out = [_HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n']
    out += [b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i - 1, i) for i in range(1, depth)]
    out.append(b"--b%d\r\nContent-Type: text/plain\r\n\r\nAll SIMs are down.\r\n" % (depth - 1))
    out += [b"--b%d--\r\n" % i for i in range(depth - 1, -1, -1)]
    return b"".join(out)


def _quote_chain(levels: int) -> str:
    """A reply chain `levels` deep: every earlier mail quoted one level deeper, as mail clients do."""
    lines = ["Still down.", ""]
    for k in range(1, levels + 1):
        lines.append(">" * (k - 1) + (" " if k > 1 else "") + f"On Mon, 3 Mar 2025 10:{k % 60:02d}, Bob <b@x.se> wrote:")
        lines.append(">" * k + " down")
    return "\n".join(lines)


# name -> (builder, expected outcome or None when either a Message or an InputError is right)
MONSTERS: dict[str, tuple[Callable[[], bytes], str | None]] = {
    # the stdlib parser recurses per level: beyond Python's stack it is "nested too deeply"; both are fine
    "nested_multipart_1000": (lambda: _nested(1000), None),
    "nested_multipart_150": (lambda: _nested(150), "message"),
    "header_line_5mb": (lambda: _HEAD + b"X-Junk: " + b"a" * 5_000_000 + b"\r\n\r\nAll SIMs are down.\r\n", "message"),
    "subject_5mb_of_encoded_words": (lambda: b"From: a@b.se\r\nSubject: " + b"=?utf-8?q?=C3=A5?= " * 270_000
                                     + b"\r\n\r\nAll SIMs are down.\r\n", "message"),
    "headers_10000": (lambda: _HEAD + b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(10_000))
                      + b"\r\nAll SIMs are down.\r\n", "message"),
    "content_type_2mb_of_quoted_semicolons": (lambda: _HEAD + b'Content-Type: multipart/mixed; boundary="x'
                                              + b";" * 2_000_000 + b"\r\n\r\nAll SIMs are down.\r\n", "message"),
    "content_type_rfc2231_200000_sections": (lambda: _HEAD + b"Content-Type: text/plain"
                                             + b"".join(b"; name*%d*=utf-8''x%%41" % i for i in range(200_000))
                                             + b"\r\n\r\nAll SIMs are down.\r\n", "message"),
    "address_7000_nested_comments": (lambda: b"From: " + b"(" * 7000 + b"\r\nTo: " + b"(" * 7000
                                     + b"\r\nSubject: x\r\n\r\nAll SIMs are down.\r\n", "message"),
    "parts_50000": (lambda: _HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
                    + b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(50_000))
                    + b"--B--\r\n", "message"),
    "empty_parts_3500000": (lambda: _HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
                            + b"--B\r\n\r\n" * 3_500_000, "message"),
    "boundary_never_closes": (lambda: _HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
                              b"Content-Type: text/plain\r\n\r\n" + b"All SIMs are down, still.\r\n" * 1_000_000,
                              "message"),
    "bare_newlines_29mb": (lambda: _HEAD + b"\r\n" + b"\n" * 29_000_000, "message"),
    # 180 MB: under MAX_XLSX_UNPACKED, so the reader itself must stay bounded (above it the file is not opened)
    "zip_bomb_xlsx_180mb_row": (lambda: _with_attachment(_xlsx({}, {"xl/worksheets/sheet1.xml": (
        _SHEET_HEAD + b'<row r="1">', b"<c><v>1</v></c>" * 1000, 12_000, b"</row></sheetData></worksheet>")}),
        "sims.xlsx", XLSX), "message"),
    "zip_bomb_xlsx_180mb_shared_strings": (lambda: _with_attachment(_xlsx(
        {"xl/worksheets/sheet1.xml": _sheet(b'<row r="1"><c r="A1" t="s"><v>499999</v></c></row>')},
        {"xl/sharedStrings.xml": (b'<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">',
                                  b"<si><t>8946</t></si>" * 1000, 9_000, b"</sst>")}), "sims.xlsx", XLSX), "message"),
    "zip_bomb_xlsx_over_the_declared_limit": (lambda: _with_attachment(_xlsx({}, {"xl/worksheets/sheet1.xml": (
        _SHEET_HEAD, b"<row><c><v>1</v></c></row>" * 1000, 9_000, b"</sheetData></worksheet>")}), "sims.xlsx", XLSX),
        "message"),
    "xlsx_4kb_cell_at_xfd1048576": (lambda: _with_attachment(_xlsx({"xl/worksheets/sheet1.xml": _sheet(
        b'<row r="1"><c r="A1" t="inlineStr"><is><t>8946000000000000001</t></is></c></row>'
        b'<row r="1048576"><c r="XFD1048576"><v>1</v></c></row>',
        b'<dimension ref="A1:XFD1048576"/>')}), "sims.xlsx", XLSX), "message"),
    "xlsx_declared_size_lies": (lambda: _with_attachment(_lying_zip(), "sims.xlsx", XLSX), "message"),
    "gzip_bomb_attachment": (lambda: _with_attachment(gzip.compress(b"\0" * 100_000_000, 9), "sims.csv.gz",
                                                      "application/gzip"), "message"),
    "zip_bomb_attachment": (lambda: _with_attachment(_xlsx({}, {"sims.csv": (b"", b"0" * 100_000, 1000, b"")}),
                                                     "sims.zip", "application/zip"), "message"),
    "base64_xlsx_25mb": (lambda: _with_attachment(os.urandom(18_000_000), "sims.xlsx", XLSX), "message"),
    "html_100k_unclosed_tags": (lambda: _HEAD + b"Content-Type: text/html\r\n\r\n"
                                + b"<div><blockquote><ol><li><table><tr><td><b>" * 12_500
                                + b"All SIMs are down.", "message"),
    "html_1mb_of_unclosed_link_tags": (lambda: _HEAD + b"Content-Type: text/html\r\n\r\n"
                                       + b"<a href='x' " * 100_000 + b"All SIMs are down.", "message"),
    "html_100k_unclosed_attribute_quotes": (lambda: _HEAD + b"Content-Type: text/html\r\n\r\n"
                                            + b"<a b='" * 100_000, "message"),
    "quoted_reply_10000_levels": (lambda: _HEAD + b"\r\n" + b"> " * 10_000 + b"All SIMs are down.\r\n", "message"),
    "reply_chain_3000_levels_deep": (lambda: _HEAD + b"\r\n" + _quote_chain(3000).encode(), "message"),
    "single_line_25mb": (lambda: _HEAD + b"\r\n" + b"word " * 5_000_000, "message"),
}


READABLE_XLSX = ("zip_bomb_xlsx_180mb_row", "zip_bomb_xlsx_180mb_shared_strings", "xlsx_4kb_cell_at_xfd1048576")


def _lying_zip() -> bytes:
    """A workbook whose sheet says it unpacks to 1,000 bytes but unpacks to 180 MB."""
    data = bytearray(_xlsx({}, {"xl/worksheets/sheet1.xml": (_SHEET_HEAD, b"<row><c><v>1</v></c></row>" * 1000,
                                                             7000, b"</sheetData></worksheet>")}))
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:   # central directory entries: uncompressed size at +24 (zip64 keeps 0xFFFFFFFF there)
        name_len = int.from_bytes(data[pos + 28:pos + 30], "little")
        if data[pos + 46:pos + 46 + name_len] == b"xl/worksheets/sheet1.xml":
            data[pos + 24:pos + 28] = (1000).to_bytes(4, "little")
            extra = pos + 46 + name_len   # the zip64 extra field: header id 1, then the real sizes
            if data[extra:extra + 2] == b"\x01\x00":
                data[extra + 4:extra + 12] = (1000).to_bytes(8, "little")
        pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)


# what must still be read (in the text, the quoted part or an attachment's text) after the monster is tamed;
# monsters not listed here may lose the writer's words to a bound (MAX_HTML, MIME depth 20, part size 5 MB)
WORDS = {
    "header_line_5mb": "All SIMs are down.", "subject_5mb_of_encoded_words": "All SIMs are down.",
    "headers_10000": "All SIMs are down.", "content_type_2mb_of_quoted_semicolons": "All SIMs are down.",
    "content_type_rfc2231_200000_sections": "All SIMs are down.", "address_7000_nested_comments": "All SIMs are down.",
    "parts_50000": "part 0", "boundary_never_closes": "All SIMs are down, still.",
    "html_100k_unclosed_tags": "All SIMs are down.", "quoted_reply_10000_levels": "All SIMs are down.",
    "reply_chain_3000_levels_deep": "Still down.", "single_line_25mb": "word word",
    "zip_bomb_xlsx_180mb_row": "1\t1\t1", "zip_bomb_xlsx_180mb_shared_strings": "8946",
    "xlsx_4kb_cell_at_xfd1048576": "8946000000000000001", "xlsx_declared_size_lies": "The list is attached.",
    "gzip_bomb_attachment": "The list is attached.", "zip_bomb_attachment": "The list is attached.",
    "base64_xlsx_25mb": "The list is attached.", "zip_bomb_xlsx_over_the_declared_limit": "The list is attached.",
}


def run_monster(name: str) -> dict:
    """In this process: build one monster, run it through the normalizer and the disposition step; a report."""
    build, _expected = MONSTERS[name]
    raw = build()
    start = time.perf_counter()
    report: dict = {"case": name, "bytes": len(raw)}
    try:
        m = parse_email(raw)
    except InputError as e:
        report.update(outcome="input_error", error=str(e))
    else:
        check_email(m)
        report.update(outcome="message", flags=list(m.flags), text=m.text[:200], text_len=len(m.text),
                      headers=len(m.headers), subject=(m.subject or "")[:80],
                      attachments=[[a.filename, a.size, None if a.text is None else len(a.text)] for a in m.attachments],
                      words_found=WORDS.get(name, "") in "\n".join([m.text, m.quoted, m.attachment_text]))
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return report


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("name", sorted(MONSTERS))
def test_monster_is_bounded_in_time_and_memory(name: str) -> None:
    try:
        proc = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True,
                              timeout=WATCHDOG_SECONDS + 10, preexec_fn=_limit_memory, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: still running after {WATCHDOG_SECONDS + 10} s (a hang)")
    assert proc.returncode == 0, f"{name} failed (MemoryError means over {MEMORY_LIMIT >> 20} MB):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["seconds"] < WATCHDOG_SECONDS, report
    expected = MONSTERS[name][1]
    assert report["outcome"] in ("message", "input_error") and (expected is None or report["outcome"] == expected), report
    if name in WORDS:
        assert report["words_found"], f"{name}: {WORDS[name]!r} was lost: {report}"   # bounded, not blind
    if "xlsx" in name:
        (_f, _size, text_len), = [a for a in report["attachments"] if a[0] == "sims.xlsx"]
        # a corrupt or oversized workbook has no text; a readable one has its first rows, bounded
        assert text_len is None or text_len <= MAX_TEXT_CHARS, report
        if name in READABLE_XLSX:
            assert text_len, report


def test_the_xlsx_reader_reads_what_bombs_leave_readable() -> None:
    """Bounded, not blind: the first rows of a bomb and a far cell are still read."""
    far = _xlsx({"xl/worksheets/sheet1.xml": _sheet(
        b'<row r="1"><c r="A1" t="inlineStr"><is><t>8946000000000000001</t></is></c></row>'
        b'<row r="1048576"><c r="C1048576"><v>2</v></c></row>', b'<dimension ref="A1:XFD1048576"/>')})
    with watchdog():
        assert xlsx_text(far) == "8946000000000000001\n\t\t2"
    wide = _xlsx({}, {"xl/worksheets/sheet1.xml": (_SHEET_HEAD + b'<row r="1">', b"<c><v>7</v></c>" * 1000, 20,
                                                    b"</row></sheetData></worksheet>")})
    with watchdog():
        assert xlsx_text(wide) == "\t".join(["7"] * 200)   # MAX_CELLS_PER_ROW cells of the one huge row
    strings = _xlsx({"xl/worksheets/sheet1.xml": _sheet(b'<row r="1"><c r="A1" t="s"><v>1</v></c>'
                                                        b'<c r="B1" t="s"><v>5</v></c></row>')},
                    {"xl/sharedStrings.xml": (b'<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/'
                                              b'main"><si><t>a</t></si><si><r><t>b</t></r><r><t>c</t></r>'
                                              b'<rPh><t>ph</t></rPh></si>', b"", 0, b"</sst>")})
    assert xlsx_text(strings) == "bc"   # rich text joined, phonetic guide left out, a missing index empty


# -- what reaches an agent's screen, and what we send ------------------------------------------------------

def _slack_markup(text: str) -> list[str]:
    """Slack control sequences in a mrkdwn text: <...>, and unbroken broadcast words."""
    found = re.findall(r"<[^>]*>", text)
    found += re.findall(r"(?i)(?<![\w\u2060])@(?:channel|here|everyone)\b", text)
    return found


HOSTILE_TEXTS = ["<!channel> <!here|here> @channel @here @everyone", "<https://evil.example|click here>",
                 "<@U0123ABC> <#C0123|general>", "<script>alert(1)</script><img src=x onerror=alert(1)>",
                 "```\n*bold* _it_ ~s~ <!channel>\n```", "&lt;!channel&gt; &amp;lt;", "> quoted\n>>> block",
                 "a\r\nBcc: victim@example.com", "\u202eevil\u2066", "`x` ``` ``` ````"]


@pytest.fixture(scope="module")
def blocks_module():
    return pytest.importorskip("triagebot.agents.blocks", reason="triagebot.agents is not built yet")


@settings(PROPERTY, max_examples=100)
@given(text=st.one_of(st.sampled_from(HOSTILE_TEXTS), st.text(max_size=300),
                      st.lists(st.sampled_from(["<", ">", "&", "!channel", "@here", "`", "```", "|", "*", "\n"]),
                               max_size=80).map("".join)),
       subject=st.one_of(st.none(), st.sampled_from(HOSTILE_TEXTS), st.text(max_size=100)),
       name=st.one_of(st.none(), st.sampled_from(HOSTILE_TEXTS), st.text(max_size=60)))
def test_customer_text_in_suggestion_blocks_is_never_markup(blocks_module, text: str, subject: str | None,
                                                           name: str | None) -> None:
    bk = blocks_module
    view = bk.CaseView(case_id=7, reference="CASE-000007", sender=name, sender_name=name, subject=subject, text=text,
                       customer=name, similar=(bk.Similar("CASE-000001", name, subject),), reply=text)
    for blocks in (bk.suggestion_blocks(view), bk.update_blocks(view, {"severity": (None, "high")}, text)):
        for block in blocks:
            for obj in [block.get("text")] + list(block.get("fields") or []) + list(block.get("elements") or []):
                if isinstance(obj, dict) and obj.get("type") == "mrkdwn":
                    assert obj.get("verbatim") is True
                    assert _slack_markup(obj["text"]) == [], obj["text"][:300]
    assert _slack_markup(bk.fallback_text(view)) == []


def test_a_long_body_of_escaped_characters_keeps_its_code_block_closed(blocks_module) -> None:
    """The body is escaped before it is cut: 2,400 '&' are 12,000 characters escaped, and cutting those (or the
    section, at Slack's 3,000) must neither lose the closing fence nor leave half an entity ("&am")."""
    bk = blocks_module
    texts = ("&" * 3000, "<" * 3000, ">" * 2999 + "x", "*bold* " + "&" * 2400, "@here " * 800, "`" * 5000,
             "a&" * 2000, "x" * 2399 + "<" * 10, "x" * 10_000)
    for text in texts:
        view = bk.CaseView(case_id=7, reference="CASE-000007", text=text, deleted=True)
        (message,) = [b for b in bk.suggestion_blocks(view) if b.get("text", {}).get("text", "").startswith("*Message*")]
        (_head, new, _sla) = bk.update_blocks(view, {}, text)
        for body in (message["text"]["text"], new["text"]["text"]):
            assert body.endswith("```") and len(body) <= bk.MAX_SECTION, body[-80:]
            inside = body[body.index("```") + 3:-3]
            assert "```" not in inside and not re.search(r"&(?!(?:amp|lt|gt);)", inside), inside[-80:]
            assert _slack_markup(inside) == []
            assert "more characters)" in inside
    for limit in (20, 50, 200, 2800):
        for text in texts:
            block = bk.code_block(text, limit=limit)
            assert len(block) <= limit and block.startswith("```") and block.endswith("```")
            assert not re.search(r"&(?!(?:amp|lt|gt);)", block), (limit, block[-40:])
    assert bk.code_block("a < b & c") == "```a &lt; b &amp; c```"             # what fits is shown whole
    assert bk.code_block("&" * 100, limit=60).endswith("\n… (94 more characters)```")   # the customer's characters


@pytest.fixture(scope="module")
def ack_module():
    return pytest.importorskip("triagebot.outbound.ack", reason="triagebot.outbound is not built yet")


def _settings():
    from triagebot.settings import Settings
    return Settings()


@settings(PROPERTY, max_examples=100)
@given(subject=st.one_of(st.none(), st.sampled_from(["hej\r\nBcc: victim@example.com", "a\nb\rc\r\n\r\n<html>",
                                                     "x\u2028y\u2029z\x85w", "=?utf-8?b?QmNjOiB4?=\r\n To: y@z"]),
                         st.text(max_size=300)),
       name=st.one_of(st.none(), st.sampled_from(["Anna\r\nBcc: victim@example.com", '"Anna" <x@y>\r\n',
                                                  "Ann\x00a", "=?utf-8?q?A=0D=0ABcc:_v@x?="]), st.text(max_size=80)))
def test_an_acknowledgement_never_carries_injected_headers(ack_module, subject: str | None, name: str | None) -> None:
    ack = ack_module
    rules = ack.load_rules(None)
    m = Message(source="email", text="All SIMs down", subject=subject, sender="anna@example.se", sender_name=name,
                message_id="<m1@example.se>")
    msg = ack.build(_settings(), rules.template("en"), "CASE-000042", m)
    raw = msg.as_bytes()
    parsed = message_from_bytes(raw, policy=compat32)
    names = [k.lower() for k in parsed.keys()]
    assert "bcc" not in names and names.count("to") == 1 and names.count("subject") == 1
    assert set(names) <= {"from", "to", "subject", "date", "message-id", "in-reply-to", "references",
                          "auto-submitted", "x-auto-response-suppress", "content-type", "content-transfer-encoding",
                          "mime-version"}, names
    # every header is one logical line: after unfolding, no CR or LF is left in any value
    for k in parsed.keys():
        value = str(parsed[k])
        assert not re.search(r"[\r\n](?![ \t])", value), (k, value)
    assert "CASE-000042" in str(msg["Subject"])


def test_an_address_with_cr_lf_gets_no_acknowledgement(ack_module) -> None:
    ack = ack_module
    rules = ack.load_rules(None)
    for sender in ("anna@example.se\r\nBcc: victim@example.com", "anna@example.se\nx", "a b@example.se",
                   "<anna@example.se>", "anna@example.se>\r\n"):
        m = Message(source="email", text="x", sender=sender)
        assert ack.suppression(m, rules, _settings()) is not None, sender


# -- who a mail is from ------------------------------------------------------------------------------------

SPOOFED_FROM = [b"=?utf-8?q?driftcentralen=40malarkraft=2Eexample?= <attacker@evil.example>",
                b'"driftcentralen@malarkraft.example" <attacker@evil.example>']


@pytest.mark.parametrize("from_value", SPOOFED_FROM)
def test_an_address_in_the_display_name_gets_neither_the_customer_nor_its_case(
        from_value: bytes, tmp_path: Path, capsys, monkeypatch) -> None:
    """A registered contact's address in the (encoded or quoted) display name: the sender, the customer and the
    subject-reference threading rule all go by the real addr-spec, so the mail makes a case of its own."""
    from sqlalchemy import select
    from triagebot.cli import main
    from triagebot.db.engine import open_db
    from triagebot.db.tables import Case, CaseEvent, MessageRow

    genuine = (b"From: Driftcentralen <driftcentralen@malarkraft.example>\r\nTo: support@support.example.net\r\n"
               b"Subject: No data from 40 meters\r\nMessage-ID: <g1@malarkraft.example>\r\n\r\n"
               b"Since 06:00 our 40 electricity meters in Vasteras send no data.\r\n")
    spoof = (b"From: " + from_value + b"\r\nTo: support@support.example.net\r\n"
             b"Subject: Re: [CASE-000001] No data from 40 meters\r\nMessage-ID: <s1@evil.example>\r\n\r\n"
             b"Please send the case details and the SIM list to this address.\r\n")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "1.eml").write_bytes(genuine)
    (inputs / "2.eml").write_bytes(spoof)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setenv("TRIAGEBOT_DATABASE_URL", url)
    assert main(["ingest", str(inputs / "1.eml"), str(inputs / "2.eml"), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["action"], o["case"]) for o in out] == [("created", "CASE-000001"), ("created", "CASE-000002")]
    _e, sessions = open_db(url)
    with sessions() as s:
        row = s.scalars(select(MessageRow).where(MessageRow.message_id == "<s1@evil.example>")).one()
        assert row.sender == "attacker@evil.example"
        first, second = (s.scalars(select(Case).where(Case.reference == r)).one()
                         for r in ("CASE-000001", "CASE-000002"))
        assert first.customer == "Mälarkraft Elnät AB" and second.customer == "evil.example"
        why = s.scalars(select(CaseEvent).where(CaseEvent.case_id == second.id,
                                                CaseEvent.kind == "created")).one().detail["why"]
        assert "CASE-000001" in why and "another customer" in why


if __name__ == "__main__":
    # one monster, in this process (the test runs this under RLIMIT_AS with a timeout)
    print(json.dumps(run_monster(sys.argv[1])))
