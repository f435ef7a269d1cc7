"""Raw RFC 5322 bytes to a Message with the standard library's email package (compat32 policy: fast,
lenient, and we decode headers and charsets ourselves so broken ones can be repaired).

Everything is bounded (parts, nesting, header count, decoded sizes) so hostile mail cannot hang us; any
unexpected failure becomes a flag ("malformed_mime") or, when nothing readable is left, an InputError.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import itertools
import quopri
import re
from datetime import datetime, timezone
from email import errors as email_errors
from email import utils as email_utils
from email.message import Message as EmailMessage
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr, parsedate_to_datetime

from triagebot.errors import InputError
from triagebot.model import Attachment, Message
from triagebot.normalize import storable
from triagebot.normalize.attachments import extract_text, is_attachment
from triagebot.normalize.html import html_to_text
from triagebot.normalize.quotes import split_reply

MAX_RAW = 30_000_000          # bytes of a message we parse at all
MAX_PARTS = 200               # MIME parts walked
MAX_DEPTH = 20                # MIME nesting followed
MAX_HEADERS = 300             # header fields kept on the Message
MAX_HEADER_VALUE = 8_000      # characters kept of one header value
MAX_PART_BYTES = 5_000_000    # decoded bytes of one body part looked at
MAX_BODY_CHARS = 1_000_000    # characters of body text kept
MAX_ADDRESSES = 200           # recipients kept
MAX_IDS = 100                 # References / In-Reply-To ids kept
MAX_LINES = 1_000_000         # lines handed to the parser (a 30 MB base64 mail has ~400,000)
MAX_DELIMITER_LINES = 10_000  # lines starting with "--" handed to the parser: each may open a MIME part
MAX_PARAM_HEADER = 8_000      # characters of a Content-Type/-Disposition whose parameters are parsed

# defects that mean the structure was guessed (RFC 2046 boundaries, header/body split), not cosmetic ones
_STRUCTURAL_DEFECTS = (
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.CloseBoundaryNotFoundDefect,
    email_errors.FirstHeaderLineIsContinuationDefect,
    email_errors.MisplacedEnvelopeHeaderDefect,
    email_errors.MissingHeaderBodySeparatorDefect,
    email_errors.MultipartInvariantViolationDefect,
    email_errors.InvalidMultipartContentTransferEncodingDefect,
    email_errors.InvalidBase64CharactersDefect,
    email_errors.InvalidBase64LengthDefect,
)

# Report parts that say what kind of machine message this is (read by the disposition step).
REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status", "message/feedback-report",
                "message/disposition-notification", "message/global-disposition-notification")

_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13, 27))   # ESC is ISO-2022-JP
_HEADER_LINE = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}[ \t]*:")   # a field name (RFC 5322 3.6.8, in practice)
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,60})\?([QqBb])\?([^?]*?)\?=")
_BETWEEN_WORDS = re.compile(r"(=\?[^?\s]{1,60}\?[QqBb]\?[^?]*?\?=)\s+(?==\?)")
_KNOWN_HEADERS = frozenset({"from", "to", "cc", "subject", "date", "message-id", "sender", "reply-to",
                            "received", "return-path", "delivered-to", "mime-version", "content-type",
                            "in-reply-to", "references", "x-mailer", "x-original-to"})
_C1_BYTES = re.compile(rb"[\x80-\x9f]")
_SURROGATE = re.compile("[\udc80-\udcff]")
_MSGID = re.compile(r"<[^<>\s]{1,500}>")
# typical traces of UTF-8 read as latin-1/cp1252 (Ã¥ Ã¤ Ã¶ Ã© Ã± â€™ Â ...)
_MOJIBAKE = re.compile("[ÃÂ][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013"
                       "\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]|â€")
# Labels that are not Python codec names but occur in real mail
_CHARSET_ALIASES = {"uft-8": "utf-8", "utf8": "utf-8", "unicode-1-1-utf-7": "utf-7", "x-unknown": "",
                    "unknown-8bit": "", "x-user-defined": "", "ansi_x3.4-1968": "ascii", "ks_c_5601-1987": "cp949",
                    "iso-8859-8-i": "iso-8859-8", "gb2312": "gb18030", "gbk": "gb18030", "x-sjis": "shift_jis",
                    "shift-jis": "shift_jis", "default": "", "_iso-2022-jp$esc": "iso-2022-jp"}
# encodings whose bytes are all ASCII but which are not ASCII text (RFC 2152 UTF-7, RFC 1468 ISO-2022-JP)
_ASCII_SHAPED = ("utf-7", "iso2022", "hz", "utf-16", "utf-32")


def _latin1_fallback(err: UnicodeError) -> tuple[str, int]:
    # the 5 bytes cp1252 leaves undefined (0x81 0x8D 0x8F 0x90 0x9D) are read as latin-1 controls
    if isinstance(err, UnicodeDecodeError):
        return "".join(chr(b) for b in err.object[err.start:err.end]), err.end
    raise err


codecs.register_error("triagebot-latin1", _latin1_fallback)


def _norm_charset(charset: str | None) -> str:
    cs = (charset or "").strip().strip("\"'").lower()
    cs = _CHARSET_ALIASES.get(cs, cs)
    if not cs:
        return ""
    try:
        return codecs.lookup(cs).name
    except (LookupError, ValueError):   # ValueError: a NUL in the label ("embedded null character")
        return ""


def _mojibake_score(text: str) -> int:
    return len(_MOJIBAKE.findall(text)) + 3 * text.count("\ufffd")


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode text bytes with the declared charset, repairing wrong or missing labels; (text, guessed)."""
    if not data:
        return "", False
    cs = _norm_charset(charset)
    ascii_only = data.isascii()
    if ascii_only and not cs.startswith(_ASCII_SHAPED):
        return data.decode("ascii"), False
    text: str | None = None
    if cs and cs not in ("ascii", "latin-1", "iso8859-1", "cp1252"):
        try:
            text = data.decode(cs)
        except (UnicodeDecodeError, LookupError, ValueError):
            text = None
        if text is not None and _mojibake_score(text) == 0:
            return text, False
    elif cs in ("latin-1", "iso8859-1", "cp1252"):
        # A latin-1 label on bytes that are valid UTF-8 is a mislabel (otherwise 'Ã¥' appears); else cp1252,
        # since bytes 0x80-0x9F in Outlook mail are cp1252 punctuation (’ – €), not C1 controls.
        if not ascii_only:
            try:
                utf = data.decode("utf-8")
                if _mojibake_score(utf) == 0:
                    return utf, True
            except UnicodeDecodeError:
                pass
        guessed = cs != "cp1252" and _C1_BYTES.search(data) is not None
        return _repair(data.decode("cp1252", "triagebot-latin1")), guessed
    # no label, ascii label with 8-bit bytes, a label that failed, or a decode that looks like mojibake
    candidates = []
    if text is not None:
        candidates.append(text)
    try:
        candidates.append(data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    candidates.append(data.decode("cp1252", "triagebot-latin1"))
    best = min(candidates, key=_mojibake_score)
    fixed = _repair(best)
    return fixed, True


def _repair(text: str) -> str:
    """Undo UTF-8 that was decoded as cp1252 once already upstream (double encoding), when that helps."""
    score = _mojibake_score(text)
    if not score:
        return text
    for enc in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(enc).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if _mojibake_score(fixed) < score:
            return fixed
    return text


def _decode_word(charset: str, enc: str, payload: str) -> tuple[str, bool]:
    try:
        if enc in "bB":
            payload = re.sub(r"[^A-Za-z0-9+/]", "", payload)
            raw = base64.b64decode(payload + "=" * (-len(payload) % 4))
        else:
            raw = quopri.decodestring(payload.replace("_", " ").encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return payload, True
    # RFC 2231 language suffix: charset*lang
    return decode_bytes(raw, charset.split("*", 1)[0])


def decode_header(value: str) -> tuple[str, bool]:
    """An RFC 2047 header value as text (broken encoded words and raw 8-bit bytes too); (text, guessed)."""
    value = value[:MAX_HEADER_VALUE * 2]
    guessed = False
    if not value.isascii() and _SURROGATE.search(value):
        # compat32 keeps raw 8-bit header bytes as surrogates (RFC 6532 UTF-8, or a cp1252 header)
        # RFC 6532 allows raw UTF-8 in headers; anything else (cp1252 from old clients) is a guess
        value, guessed = decode_bytes(value.encode("ascii", "surrogateescape"), "utf-8")
    value = re.sub(r"\r?\n[ \t]+", " ", value).replace("\r", "").replace("\n", " ")
    if "=?" not in value:
        return value.strip(), guessed
    value = _BETWEEN_WORDS.sub(r"\1", value)   # whitespace between adjacent encoded words is dropped

    def word(m: re.Match) -> str:
        nonlocal guessed
        text, g = _decode_word(m.group(1), m.group(2), m.group(3))
        guessed = guessed or g
        return text

    return _ENCODED_WORD.sub(word, value).strip(), guessed


def _looks_like_email(raw: bytes) -> bytes:
    """The raw bytes ready to parse (mbox line dropped, CR endings fixed), or InputError when not an email."""
    if not raw or not raw.strip():
        raise InputError("empty input")
    if len(raw) > MAX_RAW:
        raise InputError(f"not an email: {len(raw)} bytes is too large")
    head = raw[:4096]
    # a stray NUL or control byte occurs in real bounces; many of them mean a binary file
    if len(head) - len(head.translate(None, _CONTROL_BYTES)) > len(head) // 50 + 2:
        raise InputError("not an email: binary data")
    raw = raw.lstrip(b"\r\n\t ")
    if raw.startswith(b"From "):   # an mbox "From " envelope line
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    if b"\n" not in raw[:65536] and b"\r" in raw:
        raw = raw.replace(b"\r", b"\n")   # old Mac CR-only line endings
    first = raw.split(b"\n", 1)[0]
    if not _HEADER_LINE.match(first):
        raise InputError(f"not an email: first line is not a header ({first[:40].decode('ascii', 'replace')!r})")
    return raw


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_DELIMITER_LINE = re.compile(rb"(?:\A|[\r\n])--")


def _nth_match_start(rx: re.Pattern, raw: bytes, n: int) -> int | None:
    """Where the n-th (1-based) match of rx in raw starts, or None when there are fewer."""
    m = next(itertools.islice(rx.finditer(raw), n - 1, None), None)
    return None if m is None else m.start()


def _bound(raw: bytes) -> tuple[bytes, bool]:
    """Raw bytes cut so the stdlib parser's work is bounded; (bytes, cut).

    The parser keeps every line of a part in a list (about 60 bytes each: 30 MB of bare newlines is
    1.5 GB) and makes a Message for every boundary line (a 30 MB mail of "--B" lines is millions of
    parts, minutes and gigabytes). Real mail is far below both bounds; what lies beyond them is dropped.
    """
    cut = False
    if raw.count(b"\n") + raw.count(b"\r") > MAX_LINES:   # CRLF counts twice: a cheap over-estimate
        end = _nth_match_start(_LINE_BREAK, raw, MAX_LINES)
        if end is not None:
            raw, cut = raw[:end], True
    if raw.count(b"\n--") + raw.count(b"\r--") >= MAX_DELIMITER_LINES:
        end = _nth_match_start(_DELIMITER_LINE, raw, MAX_DELIMITER_LINES)
        if end is not None:
            raw, cut = raw[:end], True
    return raw, cut


def _split_params(value: str) -> list[str]:
    """email.message._parseparam in linear time: "a; b=\"x;y\"; c" -> ["a", "b=\"x;y\"", "c"].

    The stdlib recounts the quotes from the parameter's start at every ";" (quadratic: a 2 MB
    Content-Type of quotes and semicolons takes hours). A ";" splits when the count of '"' minus the
    count of '\\"' before it, from the start of the value, is even; that is the same rule.
    """
    plist: list[str] = []
    start = 0
    parity = 0
    for m in _PARAM_TOKEN.finditer(value):
        tok = m.group()
        if tok == ";":
            if parity:
                continue
            plist.append(_param(value[start:m.start()]))
            start = m.end()
        elif tok == '"':
            parity ^= 1
        # '\\"' counts as one quote and one escaped quote: no change of parity
    plist.append(_param(value[start:]))
    return plist


_PARAM_TOKEN = re.compile(r'\\"|[;"]')


def _param(f: str) -> str:
    if "=" in f:
        i = f.index("=")
        f = f[:i].strip().lower() + "=" + f[i + 1:].strip()
    return f.strip()


class _Part(EmailMessage):
    """compat32's Message with MIME parameters parsed in linear time and bounded (see _split_params)."""

    def _get_params_preserve(self, failobj, header):  # type: ignore[no-untyped-def]  # stdlib signature
        # the stdlib method (email/message.py), but the value is cut and split in linear time, and a
        # broken RFC 2231 parameter (name*=a; name*0=b, a 5,000-digit section number) leaves the
        # parameters undecoded instead of raising TypeError/ValueError inside the parser
        missing = object()
        value = self.get(header, missing)
        if value is missing:
            return failobj
        params = []
        for p in _split_params(str(value)[:MAX_PARAM_HEADER]):
            name, sep, val = p.partition("=")
            params.append((name.strip(), val.strip()) if sep else (name.strip(), ""))
        try:
            return email_utils.decode_params(params)
        except (TypeError, ValueError, LookupError):
            return params


def _addresses(values: list[str]) -> list[tuple[str, str]]:
    """email.utils.getaddresses, but nested comments deeper than the stack ("((((...") give no address."""
    try:
        return getaddresses(values)
    except RecursionError:
        return []


def _address(value: str) -> tuple[str, str]:
    try:
        return parseaddr(value)
    except RecursionError:
        return "", ""


def _unfold(value: str) -> str:
    """A raw header value on one line (RFC 5322 §2.2.3), cut like decode_header cuts it."""
    return re.sub(r"\r?\n[ \t]+", " ", value[:MAX_HEADER_VALUE * 2]).replace("\r", "").replace("\n", " ")


def _addr_text(addr: str) -> str:
    """An addr-spec as text: raw 8-bit bytes read as UTF-8 (RFC 6532); encoded words are left alone (RFC 2047 §5)."""
    if not addr.isascii() and _SURROGATE.search(addr):
        addr = decode_bytes(addr.encode("ascii", "surrogateescape"), "utf-8")[0]
    return addr


def _mailbox(raw_value: str) -> tuple[str, str]:
    """(display name, addr-spec) of a raw From/Sender value, the address found before any RFC 2047 decoding.

    Decoding first would let an encoded display name carry an address of its own
    (`=?utf-8?q?boss=40customer=2Ecom?= <attacker@evil.example>`) that the parser then takes for the sender.
    RFC 2047 §5: an encoded word never occurs in an addr-spec, so one found there is a display name alone.
    """
    name, addr = _address(_unfold(raw_value))
    addr = _addr_text(addr.strip())
    if _ENCODED_WORD.fullmatch(addr):
        name, addr = name or addr, ""
    return (decode_header(name)[0] if name else ""), addr


def _ids(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    found = _MSGID.findall(value)
    if not found:
        found = [t for t in value.split() if "@" in t]
    return tuple(dict.fromkeys(found))[:MAX_IDS]


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        d = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if d is None:
        return None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


class _Walk:
    """One pass over the MIME tree: body parts, attachments, flags, all bounded."""

    def __init__(self) -> None:
        self.parts = 0
        self.plain: list[str] = []
        self.html: list[str] = []
        self.attachments: list[Attachment] = []
        self.flags: set[str] = set()
        self.body_chars = 0
        self.enclosed: list[EmailMessage] = []

    def note_defects(self, part: EmailMessage) -> None:
        if any(isinstance(d, _STRUCTURAL_DEFECTS) for d in getattr(part, "defects", ())):
            self.flags.add("malformed_mime")

    def payload_bytes(self, part: EmailMessage) -> bytes:
        try:
            data = part.get_payload(decode=True)
        except Exception:  # noqa: BLE001 - a broken transfer encoding: keep the raw text
            self.flags.add("malformed_mime")
            data = None
        if data is None:
            raw = part.get_payload()
            data = raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
        elif isinstance(data, str):
            data = data.encode("ascii", "surrogateescape")
        return data[:MAX_PART_BYTES]

    def text_of(self, part: EmailMessage) -> str:
        data = self.payload_bytes(part)
        text, guessed = decode_bytes(data, part.get_content_charset())
        if guessed:
            self.flags.add("charset_guessed")
        room = MAX_BODY_CHARS - self.body_chars
        text = text[:max(room, 0)]
        self.body_chars += len(text)
        return text

    def attach(self, part: EmailMessage, ctype: str) -> None:
        if ctype.startswith("message/") or ctype == "text/rfc822-headers":
            payload = part.get_payload()
            if ctype == "message/rfc822" and isinstance(payload, list) and payload:
                self.enclosed.append(payload[0])
            # size 0: re-serializing an enclosed message costs more than it tells (and can nest deeply)
            self.attachments.append(Attachment(_filename(part), ctype, 0, None))
            return
        data = self.payload_bytes(part)
        filename = _filename(part)
        text = extract_text(filename, ctype, data, part.get_content_charset())
        self.attachments.append(Attachment(filename, ctype, len(data), text))

    def walk(self, part: EmailMessage, depth: int) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            self.flags.add("malformed_mime")
            return
        self.note_defects(part)
        ctype = part.get_content_type()
        if ctype.startswith("message/") or ctype == "text/rfc822-headers":
            # compat32 parses these as lists of sub-messages; they are reports or enclosed mail, not body
            self.attach(part, ctype)
            return
        if part.is_multipart():
            children = part.get_payload()
            if depth >= MAX_DEPTH:
                self.flags.add("malformed_mime")
                return
            if not isinstance(children, list):
                return
            if ctype == "multipart/alternative":
                self.alternative(children, depth)
            else:
                for child in children:
                    if self.parts > MAX_PARTS:
                        break
                    self.walk(child, depth + 1)
            return
        if ctype.startswith("multipart/"):
            # declared multipart but parsed as one part (no boundary): read it as text
            self.flags.add("malformed_mime")
            text = self.text_of(part)
            if text.strip():
                self.plain.append(text)
            return
        if is_attachment(part, ctype, _filename(part)):
            self.attach(part, ctype)
            return
        if ctype == "text/plain":
            self.plain.append(self.text_of(part))
        elif ctype == "text/html":
            self.html.append(self.text_of(part))
        else:
            self.attach(part, ctype)

    def alternative(self, children: list, depth: int) -> None:
        """multipart/alternative: take the text/plain branch when it has text, else the HTML one."""
        for prefer in ("plain", "html"):
            for child in children:
                if not isinstance(child, EmailMessage):
                    continue
                sub = _Walk()
                sub.parts = self.parts
                sub.body_chars = self.body_chars
                sub.walk(child, depth + 1)
                texts = sub.plain if prefer == "plain" else sub.html
                if any(t.strip() for t in texts):
                    self.parts = sub.parts
                    self.body_chars = sub.body_chars
                    self.plain.extend(sub.plain)
                    self.html.extend(sub.html)
                    self.attachments.extend(sub.attachments)
                    self.enclosed.extend(sub.enclosed)
                    self.flags |= sub.flags
                    return
        self.parts += len(children)


def _filename(part: EmailMessage) -> str | None:
    try:
        name = part.get_filename() or part.get_param("name")
    except Exception:  # noqa: BLE001 - malformed RFC 2231 parameters
        return None
    if isinstance(name, tuple):   # RFC 2231 (charset, language, value) left undecoded
        name = name[2]
    if not isinstance(name, str) or not name.strip():
        return None
    return decode_header(name)[0][:255] or None


def parse_email(raw: bytes) -> Message:
    """A Message from raw RFC 5322 bytes; InputError (one line) when it is not an email at all."""
    if not isinstance(raw, (bytes, bytearray)):
        raise InputError("not an email: expected bytes")
    raw, cut = _bound(_looks_like_email(bytes(raw)))
    try:
        return storable(_parse(raw, cut))
    except InputError:
        raise
    except RecursionError:
        raise InputError("not an email: MIME nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - unexpected parser failure: fall back to the readable text
        try:
            return storable(_fallback(raw, e))
        except Exception as e2:  # noqa: BLE001 - the fallback tripped too: the content, not the system, is bad
            raise InputError(f"not an email: unreadable ({type(e).__name__}, then {type(e2).__name__})") from None


def _fallback(raw: bytes, error: Exception) -> Message:
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    text, _ = decode_bytes(body[:MAX_PART_BYTES], None)
    parts = split_reply(text)
    headers = []
    for line in head.split(b"\n")[:MAX_HEADERS]:
        name, sep, value = line.partition(b":")
        if sep and not line[:1].isspace():
            headers.append((name.decode("ascii", "replace").strip(), decode_header(value.decode("ascii", "surrogateescape"))[0]))
    flags = ["malformed_mime", "charset_guessed"] + ([] if parts.new.strip() else ["no_text"])
    return Message(source="email", text=parts.new, quoted=parts.quoted, signature=parts.signature,
                   headers=tuple(headers), flags=tuple(flags),
                   subject=next((v for k, v in headers if k.lower() == "subject"), None))


def _parse(raw: bytes, cut: bool = False) -> Message:
    msg = BytesParser(_class=_Part, policy=compat32).parsebytes(raw)
    flags: set[str] = {"malformed_mime"} if cut else set()
    headers: list[tuple[str, str]] = []
    first: dict[str, str] = {}
    # address fields as received: addresses are parsed before RFC 2047 decoding (see _mailbox)
    raw_first: dict[str, str] = {}
    raw_recipients: list[tuple[str, str]] = []
    # raw_items: the stored values, with raw 8-bit bytes still as surrogates (items() would turn them into U+FFFD)
    for name, value in list(msg.raw_items())[:MAX_HEADERS]:
        if not isinstance(value, str):
            value = str(value)
        text, guessed = decode_header(value)
        if guessed:
            flags.add("charset_guessed")
        text = text[:MAX_HEADER_VALUE]
        headers.append((name, text))
        low = name.lower()
        first.setdefault(low, text)
        raw_first.setdefault(low, value)
        if low in ("to", "cc"):
            raw_recipients.append((low, value))
    if not headers or not _KNOWN_HEADERS.intersection(first):
        # "Note: call Anna" as the first line of a text file is a field, but no mail has only such fields
        raise InputError("not an email: no From, To, Subject, Date, Message-ID or MIME header")

    walker = _Walk()
    walker.walk(msg, 0)
    flags |= walker.flags
    body_plain = "\n\n".join(t for t in walker.plain if t.strip())
    if body_plain.strip():
        body = body_plain
    elif any(t.strip() for t in walker.html):
        body = "\n\n".join(html_to_text(t) for t in walker.html if t.strip())
        flags.add("html_only")
    else:
        body = ""
    if not body.strip() and walker.enclosed:
        # a mail forwarded as an attachment with nothing written around it: its text is the message
        inner = _Walk()
        inner.parts = walker.parts
        inner.walk(walker.enclosed[0], 1)
        body = "\n\n".join(t for t in inner.plain if t.strip()) or \
            "\n\n".join(html_to_text(t) for t in inner.html if t.strip())
        if body.strip():
            flags.add("forwarded")
    sender_name, sender = _mailbox(raw_first.get("from", ""))
    if not sender and raw_first.get("sender"):
        sender_name, sender = _mailbox(raw_first["sender"])
    parts = split_reply(body, sender_name=sender_name or None)
    if parts.forwarded:
        flags.add("forwarded")
    if not parts.new.strip():
        flags.add("no_text")

    recipients = []
    for name in ("to", "cc"):
        for k, v in raw_recipients:
            if k == name and len(recipients) < MAX_ADDRESSES:
                addrs = (_addr_text(a) for _, a in _addresses([_unfold(v)]))
                recipients.extend(a.lower() for a in addrs if a and "@" in a and not _ENCODED_WORD.search(a))
    mid = first.get("message-id", "").strip()
    mids = _MSGID.findall(mid)
    message_id = mids[0] if mids else ("".join(mid.split()) or None)
    return Message(
        source="email",
        text=parts.new,
        subject=first.get("subject"),
        message_id=message_id,
        sender=sender.strip().lower() or None,
        sender_name=sender_name.strip() or None,
        recipients=tuple(dict.fromkeys(recipients))[:MAX_ADDRESSES],
        in_reply_to=_ids(first.get("in-reply-to")),
        references=_ids(first.get("references")),
        date=_date(first.get("date")),
        headers=tuple(headers),
        quoted=parts.quoted,
        signature=parts.signature,
        attachments=tuple(walker.attachments),
        flags=tuple(f for f in ("malformed_mime", "charset_guessed", "html_only", "forwarded", "no_text")
                    if f in flags),
    )
