"""Split a plain-text email body into the new text, the quoted earlier mail and the signature.

Patterns (reply headers of en/sv/es clients, forward markers, sign-offs, legal footers) are data in
rules/reply_headers.yaml. The splitter is conservative: when unsure, text stays in `new`, because a
lost sentence of the writer costs more than a signature line that slips into the classifier.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from triagebot.rules_loader import RuleError, load_yaml, rules_path

MAX_TEXT = 200_000          # split_reply looks at most at this many characters (the rest counts as quoted)
MAX_FORWARD_DEPTH = 3       # forwards of forwards are unwrapped this deep
SIGNATURE_BLOCK_LINES = 8   # a sign-off may be followed by at most this many short non-empty lines
SIGNATURE_LINE_CHARS = 80   # ... each at most this long (a name, a title, a phone number, a company)
DASH_SIGNATURE_LINES = 20   # after the "-- " delimiter (RFC 3676 4.3) the signature may be longer


@dataclass(frozen=True)
class ReplyParts:
    """A body split into what the writer wrote now, what they quoted, and their signature."""

    new: str
    quoted: str
    signature: str
    forwarded: bool = False   # the quoted part starts with a forward marker (or the whole body is a forward)


@dataclass(frozen=True)
class _Patterns:
    verbs: re.Pattern
    opener: re.Pattern
    separator: re.Pattern
    separator_needs_block: re.Pattern
    forward: re.Pattern
    outlook_from: re.Pattern
    outlook_date: re.Pattern
    outlook_any: re.Pattern
    outlook_inline: re.Pattern
    signoff: re.Pattern
    sent_from: re.Pattern
    name_signoff: re.Pattern
    legal: tuple[tuple[re.Pattern, re.Pattern], ...]
    legal_start: re.Pattern


def _compile(path: Path, where: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise RuleError(path, None, f"{where}: bad regular expression {pattern!r}: {e}") from None


def _compile_cs(path: Path, where: str, pattern: object) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise RuleError(path, None, f"{where!r} must be a regular expression")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RuleError(path, None, f"{where}: bad regular expression {pattern!r}: {e}") from None


def _words(path: Path, data: dict, key: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RuleError(path, None, f"{key!r} must be a list of non-empty strings")
    return value


def _alt(words: list[str]) -> str:
    # longest first so "enviado el" wins over "enviado"
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def load_patterns(path: Path | None = None) -> _Patterns:
    """Load and compile rules/reply_headers.yaml (or another file of that shape); RuleError when wrong."""
    path = path or rules_path("reply_headers.yaml")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RuleError(path, 1, "expected a mapping")
    verbs = _words(path, data, "reply_verbs")
    openers = _words(path, data, "reply_openers")
    seps = []
    for i, item in enumerate(data.get("separators") or []):
        if not isinstance(item, dict) or not isinstance(item.get("pattern"), str):
            raise RuleError(path, None, f"separators[{i}] needs a 'pattern'")
        seps.append((str(item.get("name", f"separator{i}")), _compile(path, f"separators[{i}]", item["pattern"]),
                     bool(item.get("needs_outlook_block", False))))
    fwds = []
    for i, item in enumerate(data.get("forward_markers") or []):
        if not isinstance(item, dict) or not isinstance(item.get("pattern"), str):
            raise RuleError(path, None, f"forward_markers[{i}] needs a 'pattern'")
        fwds.append((str(item.get("name", f"forward{i}")), _compile(path, f"forward_markers[{i}]", item["pattern"])))
    o_from = _alt(_words(path, data, "outlook_from"))
    o_date = _alt(_words(path, data, "outlook_date"))
    o_other = _alt(_words(path, data, "outlook_other"))
    legal = []
    for i, item in enumerate(data.get("legal_footers") or []):
        if not isinstance(item, dict) or not isinstance(item.get("start"), str) or not isinstance(item.get("contains"), str):
            raise RuleError(path, None, f"legal_footers[{i}] needs 'start' and 'contains'")
        legal.append((_compile(path, f"legal_footers[{i}].start", item["start"]),
                      _compile(path, f"legal_footers[{i}].contains", item["contains"])))
    # one alternation per kind: split_reply runs on every message, line by line
    simple = [rx.pattern for _n, rx, needs in seps if not needs] or ["(?!)"]
    blocked = [rx.pattern for _n, rx, needs in seps if needs] or ["(?!)"]
    return _Patterns(
        separator=_compile(path, "separators", "|".join(f"(?:{x})" for x in simple)),
        separator_needs_block=_compile(path, "separators", "|".join(f"(?:{x})" for x in blocked)),
        forward=_compile(path, "forward_markers", "|".join(f"(?:{rx.pattern})" for _n, rx in fwds) or "(?!)"),
        verbs=_compile(path, "reply_verbs", rf"(?:{_alt(verbs)})\s*:\s*$"),
        opener=_compile(path, "reply_openers", rf"^(?:{_alt(openers)})\b"),
        outlook_from=_compile(path, "outlook_from", rf"^(?:{o_from})\s*:"),
        outlook_date=_compile(path, "outlook_date", rf"^(?:{o_date})\s*:"),
        outlook_any=_compile(path, "outlook_other", rf"^(?:{o_from}|{o_date}|{o_other})\s*:"),
        # HTML converted to text sometimes puts the whole Outlook block on one line
        outlook_inline=_compile(path, "outlook", rf"^(?:{o_from})\s*:.{{1,200}}\s(?:{o_date})\s*:.{{1,100}}\s(?:{o_other})\s*:"),
        signoff=_compile(path, "signoffs",
                         rf"^(?:{_alt(_words(path, data, 'signoffs'))})\s*[,.!:;-]*(?:\s+/?(?-i:[A-ZÅÄÖÆØÉÑÜ])[^\s,.!?]{{0,29}}){{0,3}}\s*[,.!]?$"),
        sent_from=_compile(path, "sent_from", "|".join(f"(?:{x})" for x in _words(path, data, "sent_from"))),
        legal=tuple(legal),
        name_signoff=_compile_cs(path, "name_signoff", data.get("name_signoff")),
        legal_start=_compile(path, "legal_footers", "|".join(f"(?:{a.pattern})" for a, _b in legal) or "(?!)"),
    )


@lru_cache(maxsize=1)
def _patterns() -> _Patterns:
    return load_patterns()


def _clean(line: str) -> str:
    """A line without surrounding whitespace and the '*' / '**' that HTML-to-text leaves around bold labels."""
    return line.strip().strip("*").strip()


def _is_quoted(line: str) -> bool:
    return line.lstrip().startswith(">")


def _outlook_block_at(lines: list[str], i: int, p: _Patterns) -> bool:
    """Does an Outlook/Hotmail header block start at lines[i]: consecutive "Label: value" lines (From:, Sent:,
    To:, Subject: in any order, in en/sv/es/...) that include both a from-label and a date-label?"""
    first = _clean(lines[i])
    if p.outlook_inline.match(first):
        return True
    has_from = has_date = False
    for j in range(i, min(i + 7, len(lines))):
        cl = _clean(lines[j])
        if not cl:
            break
        if not p.outlook_any.match(cl):
            if j > i and lines[j][:1] in (" ", "\t"):
                continue   # a wrapped value (a long To: list)
            break
        has_from = has_from or bool(p.outlook_from.match(cl))
        # the date label must carry a date: "Sent: yesterday evening." in prose is not a header
        has_date = has_date or bool(p.outlook_date.match(cl) and re.search(r"\d", cl))
        if has_from and has_date:
            return True
    return False


_DATEISH = re.compile(r"\d{1,2}:\d{2}|\d{1,4}[./-]\d{1,2}[./-]\d{2,4}|\b(19|20)\d{2}\b")
_ADDRESS_END = re.compile(r"[\w.+-]+@[\w.-]+\s*>?\)?\s*:\s*$")


def _reply_header_at(lines: list[str], i: int, p: _Patterns) -> int | None:
    """If a reply header ("On ... wrote:", "26.06.2014, 14:41, "A" <a@b>:") ends on line i, the index of its first line."""
    last = _clean(lines[i].lstrip("> "))
    if len(last) > 300:
        return None
    by_verb = bool(p.verbs.search(last))
    by_address = not by_verb and bool(_ADDRESS_END.search(last))
    if not by_verb and not by_address:
        return None
    start = i
    # Gmail, Apple and Android wrap long headers: walk back at most 2 non-empty lines to an opener word or a
    # date, or take the previous line when this one starts inside an address ("<a@b.se> wrote:")
    for j in (i - 1, i - 2):
        if j < 0 or not lines[j].strip():
            break
        prev = _clean(lines[j].lstrip("> "))
        if p.opener.match(prev) or prev[:1].isdigit():
            start = j
            break
        if j == i - 1 and (last[:1] in "<@" or "@" in last.split()[0]):
            start = j   # this line continues an address begun above; look one more line up for the opener
            continue
        break
    joined = " ".join(_clean(x.lstrip("> ")) for x in lines[start:i + 1])
    if len(joined) > 400:
        return None
    if by_verb and not re.search(r"\d|@", joined):
        return None
    if by_address and not _DATEISH.search(joined):
        return None
    return start


def _find_quote_start(lines: list[str], p: _Patterns) -> tuple[int, str, int] | None:
    """The first line where quoted earlier mail begins, what kind of marker begins it, and its last line."""
    for i, line in enumerate(lines):
        cl = _clean(line)
        if not cl:
            continue
        if p.forward.match(cl):
            return i, "forward", i
        if p.separator.match(cl):
            return i, "separator", i
        if cl[0] == "_" and p.separator_needs_block.match(cl):
            k = i + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k < len(lines) and _outlook_block_at(lines, k, p):
                return i, "outlook", i
        if ":" not in cl:
            continue
        if p.outlook_any.match(cl) and _outlook_block_at(lines, i, p):
            return i, "outlook", i
        if cl[-1] == ":":
            start = _reply_header_at(lines, i, p)
            if start is not None:
                return start, "reply_header", i
    return None


_IDENTIFIER_RUN = re.compile(r"\d(?:[ -]?\d){14,}")   # 15+ digits: an ICCID/IMSI/IMEI, never signature material
# a contact line is only the contact detail, with at most a short label: "Tel: +46 70 123 45 67",
# "anna@acme.se", "www.acme.se", "skype: anna.s" (not a sentence or an SMTP transcript that holds an address)
_CONTACT = re.compile(
    r"^(?:[\w .()/-]{0,20}[:.]\s*|\S{1,10})?(?:<?[\w.+-]+@[\w-]+\.[\w.-]+>?|(?:https?://|www\.)\S+|\+?\(?\d[\d ()./-]{6,}\d)$"
    r"|^(?:skype|linkedin|twitter|teams)\b.{0,60}$", re.IGNORECASE)
_GREATER_THAN = re.compile(r"^\s*>=?\s*\d")
_RULE_LINE = re.compile(r"^[-_=~*]{2,}$")


def _is_sentence(cl: str) -> bool:
    """A line of prose (body text), as opposed to a name, title, company or phone line."""
    words = cl.split()
    lower = sum(1 for w in words if w[:1].islower())
    return (len(words) >= 4 and lower >= 2 and cl[-1] in ".?!:") or lower >= 4 or len(words) > 9


def _sig_block(lines: list[str], i: int, p: _Patterns, max_lines: int = SIGNATURE_BLOCK_LINES,
               need_contact: bool = False) -> bool:
    """Is lines[i:] a short block of name/title/phone lines (optionally ending in a legal footer)?"""
    count = contacts = 0
    for j in range(i, len(lines)):
        cl = _clean(lines[j])
        if not cl:
            continue
        if _legal_at(lines, j, p) == j:
            break
        count += 1
        if count > max_lines or len(cl) > SIGNATURE_LINE_CHARS or _IDENTIFIER_RUN.search(cl):
            return False
        if _CONTACT.match(cl):
            contacts += 1
        elif _is_sentence(cl):
            return False
    return contacts > 0 if need_contact else True


def _name_forms(sender_name: str | None) -> set[str]:
    if not sender_name:
        return set()
    name = " ".join(sender_name.replace('"', " ").split()).lower()
    if "@" in name or not name:
        return set()
    if "," in name:   # "Svensson, Anna" (Outlook address book order)
        last, _, first = name.partition(",")
        name = f"{first.strip()} {last.strip()}".strip()
    parts = name.split()
    return {name, parts[0]} if len(parts[0]) >= 2 else {name}


def _find_signature(lines: list[str], p: _Patterns, sender_name: str | None = None) -> int | None:
    """Index of the line where the signature starts in the new text, or None. Conservative: every
    heuristic needs what follows to be a short block of name/title/contact lines without SIM identifiers."""
    n = len(lines)
    names = _name_forms(sender_name)
    nonempty = [i for i in range(n) if lines[i].strip()]
    if len(nonempty) < 2:
        return None
    tail = nonempty[-(DASH_SIGNATURE_LINES + 1):]   # a signature starts near the end
    last_block = set(nonempty[-SIGNATURE_BLOCK_LINES:])
    for i in tail:
        if i == nonempty[0]:
            continue   # the first line of the text is never the signature
        raw = lines[i].rstrip()
        cl = _clean(lines[i])
        if raw in ("--", "-- ") or lines[i] == "-- ":
            # RFC 3676 4.3 signature separator
            if _sig_block(lines, i + 1, p, DASH_SIGNATURE_LINES):
                return i
            continue
        if len(cl) > 60:
            continue
        if p.sent_from.match(cl) and _sig_block(lines, i + 1, p):
            return i
        if p.signoff.match(cl) and _sig_block(lines, i + 1, p):
            return i
        if names and cl.lstrip("-/–— ").lower() in names and _sig_block(lines, i + 1, p):
            return i
        if i in nonempty[-2:] and p.name_signoff.match(cl) and (cl[0] in "/-–" or i == nonempty[-1] and not lines[i - 1].strip()) \
                and _sig_block(lines, i + 1, p, 1):
            return i   # "/Tom" (and one line after it), or a bare name alone on the last line
        if _RULE_LINE.match(cl) and _sig_block(lines, i + 1, p, DASH_SIGNATURE_LINES, need_contact=True):
            return i
        prev_blank = not lines[i - 1].strip() if i > 0 else False
        if prev_blank and _legal_at(lines, i, p) == i:
            return i
        if prev_blank and i in last_block and _contact_paragraph(lines, i, p):
            return i
    return None


def _contact_paragraph(lines: list[str], i: int, p: _Patterns) -> bool:
    """The last paragraph(s) from line i: 2-8 short lines, two or more of them contact details."""
    block = [_clean(x) for x in lines[i:] if x.strip()]
    if not 2 <= len(block) <= SIGNATURE_BLOCK_LINES:
        return False
    return sum(1 for x in block if _CONTACT.match(x)) >= 2 and _sig_block(lines, i, p)


def _find_legal(lines: list[str], p: _Patterns) -> int | None:
    """The first legal footer paragraph below some text (it runs to the end, however long)."""
    seen_text = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if seen_text and not lines[i - 1].strip() and _legal_at(lines, i, p) == i:
            return i
        seen_text = True
    return None


def _legal_at(lines: list[str], i: int, p: _Patterns) -> int | None:
    """If a legal footer paragraph starts at line i (skipping blank lines), its index."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines):
        return None
    cl = _clean(lines[i])
    if not p.legal_start.match(cl):
        return None
    para = " ".join(_clean(x) for x in lines[i:i + 12])[:600]
    for start, contains in p.legal:
        if start.match(cl) and contains.search(para):
            return i
    return None


def _forward_body(lines: list[str], p: _Patterns) -> list[str]:
    """The lines of a forwarded message after its marker and header lines (From:, Date:, Subject:, To:)."""
    i = 0
    if lines and not p.outlook_any.match(_clean(lines[0])):
        i = 1   # the marker line ("---------- Forwarded message ---------", a row of underscores)
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines) and _is_rule(lines[i]):
        i += 1
    while i < len(lines) and lines[i].strip() and p.outlook_any.match(_clean(lines[i])):
        i += 1
        # a header value may wrap onto the next line when it holds many addresses
        while i < len(lines) and lines[i].startswith((" ", "\t")) and lines[i].strip() \
                and not p.outlook_any.match(_clean(lines[i])):
            i += 1
    return lines[i:]


def _is_rule(line: str) -> bool:
    return bool(_RULE_LINE.match(line.strip()))


def _unquote(lines: list[str]) -> list[str]:
    """Apple Mail quotes a forwarded message with '> ': remove one level when every line is quoted."""
    if not all(_is_quoted(x) for x in lines if x.strip()):
        return lines
    return [re.sub(r"^\s*> ?", "", x) for x in lines]


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n").rstrip()


def split_reply(text: str, sender_name: str | None = None) -> ReplyParts:
    """Split a plain-text body into new text, quoted earlier mail and signature (see module doc).

    `sender_name` (optional) lets a bare name line at the end ("Anna Svensson") start the signature.
    """
    return _split(text, 0, sender_name)


def _split(text: str, depth: int, sender_name: str | None = None) -> ReplyParts:
    p = _patterns()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    overflow = ""
    if len(text) > MAX_TEXT:
        text, overflow = text[:MAX_TEXT], text[MAX_TEXT:]
    if ">:" in text:
        # Gmail wraps "... skrev Anna <anna@x.se\n>:" so the header's end looks like a quoted line
        text = re.sub(r"\n(>\s*:)[ \t]*(?=\n|$)", r"\1", text)
    lines = text.split("\n")
    found = _find_quote_start(lines, p)
    forwarded = False
    if found is None:
        head, tail, kind = lines, [], ""
    else:
        idx, kind, end = found
        head, tail = lines[:idx], lines[idx:]
        hdr_len = end - idx + 1
        # Outlook puts a row of underscores (or a blank line and one) just above its header block
        while head and re.fullmatch(r"\s*_{10,}\s*", head[-1]):
            tail.insert(0, head.pop())

    quoted: list[str] = []
    new: list[str] = []
    if kind == "reply_header":
        # header, then its '>' lines; unquoted text after them is a bottom-posted or interleaved answer
        quoted.extend(tail[:hdr_len])
        rest = tail[hdr_len:]
        if any(_is_quoted(x) for x in rest):
            in_quote = True   # blank lines stay with the block they sit in
            for line in rest:
                if line.strip():
                    in_quote = _is_quoted(line)
                (quoted if in_quote else new).append(line)
        else:
            quoted.extend(rest)
    elif kind:
        quoted = tail
        forwarded = kind == "forward"
        if kind in ("outlook", "separator") and not any(x.strip() for x in head):
            # Outlook forwards have no marker: the body starts with the quoted header block itself
            forwarded = True

    # '>' quoted lines in the head without a header (interleaved replies): move them out
    head_quoted = [x for x in head if _is_quoted(x)]
    if len(head_quoted) == 1 and _GREATER_THAN.match(head_quoted[0]):
        head_quoted = []   # one line like "> 50 units down" means "more than", not a quote
    head_new = [x for x in head if x not in head_quoted] if head_quoted else head
    if head_quoted:
        quoted = head_quoted + quoted
    all_new = head_new + new

    if forwarded and not any(x.strip() for x in _strip_signature(head_new, p)[0]) and depth < MAX_FORWARD_DEPTH:
        body = quoted[:1] + _unquote(quoted[1:])
        inner = _split(_join(_forward_body(body, p)), depth + 1)   # the forwarded writer is not our sender
        return ReplyParts(inner.new, inner.quoted + overflow, inner.signature, True)

    body, signature = _strip_signature(all_new, p, sender_name)
    return ReplyParts(_join(body), _join(quoted) + overflow, _join(signature), forwarded)


def _strip_signature(lines: list[str], p: _Patterns, sender_name: str | None = None) -> tuple[list[str], list[str]]:
    sig = _find_signature(lines, p, sender_name)
    legal = _find_legal(lines, p)
    if legal is not None and (sig is None or legal < sig):
        sig = legal
    if sig is None:
        return lines, []
    return lines[:sig], lines[sig:]
