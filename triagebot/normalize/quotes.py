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
    separators: tuple[tuple[str, re.Pattern, bool], ...]
    forwards: tuple[tuple[str, re.Pattern], ...]
    outlook_from: re.Pattern
    outlook_date: re.Pattern
    outlook_any: re.Pattern
    outlook_inline: re.Pattern
    signoff: re.Pattern
    sent_from: tuple[re.Pattern, ...]
    legal: tuple[tuple[re.Pattern, re.Pattern], ...]


def _compile(path: Path, where: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
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
    return _Patterns(
        verbs=_compile(path, "reply_verbs", rf"(?:{_alt(verbs)})\s*:\s*$"),
        opener=_compile(path, "reply_openers", rf"^(?:{_alt(openers)})\b"),
        separators=tuple(seps),
        forwards=tuple(fwds),
        outlook_from=_compile(path, "outlook_from", rf"^(?:{o_from})\s*:"),
        outlook_date=_compile(path, "outlook_date", rf"^(?:{o_date})\s*:"),
        outlook_any=_compile(path, "outlook_other", rf"^(?:{o_from}|{o_date}|{o_other})\s*:"),
        # HTML converted to text sometimes puts the whole Outlook block on one line
        outlook_inline=_compile(path, "outlook", rf"^(?:{o_from})\s*:.{{1,200}}\s(?:{o_date})\s*:.{{1,100}}\s(?:{o_other})\s*:"),
        signoff=_compile(path, "signoffs",
                         rf"^(?:{_alt(_words(path, data, 'signoffs'))})\s*[,.!:;-]*(?:\s+[^\s,.!?]{{1,30}}){{0,3}}\s*[,.!]?$"),
        sent_from=tuple(_compile(path, "sent_from", p) for p in _words(path, data, "sent_from")),
        legal=tuple(legal),
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
    """Is lines[i] the From: line of an Outlook header block (From:, then Sent:/Date: within 4 lines)?"""
    first = _clean(lines[i])
    if p.outlook_inline.match(first):
        return True
    if not p.outlook_from.match(first):
        return False
    for j in range(i + 1, min(i + 6, len(lines))):
        cl = _clean(lines[j])
        if not cl:
            return False
        if p.outlook_date.match(cl):
            return True
        if not p.outlook_any.match(cl):
            return False
    return False


def _reply_header_at(lines: list[str], i: int, p: _Patterns) -> int | None:
    """If a reply header ("On ... wrote:") ends on line i, the index of the line it starts on."""
    last = _clean(lines[i].lstrip("> "))
    if len(last) > 300 or not p.verbs.search(last):
        return None
    start = i
    # Gmail and Apple wrap long headers: walk back at most 2 non-empty lines to an opener word
    for j in (i - 1, i - 2):
        if j < 0 or not lines[j].strip():
            break
        if p.opener.match(_clean(lines[j])):
            start = j
            break
    joined = " ".join(_clean(x) for x in lines[start:i + 1])
    if len(joined) > 400 or not re.search(r"\d|@", joined):
        return None
    return start


def _find_quote_start(lines: list[str], p: _Patterns) -> tuple[int, str] | None:
    """The first line where quoted earlier mail begins, and what kind of marker begins it."""
    for i, line in enumerate(lines):
        cl = _clean(line)
        if not cl:
            continue
        for _name, rx in p.forwards:
            if rx.match(cl):
                return i, "forward"
        for _name, rx, needs_block in p.separators:
            if rx.match(cl):
                if not needs_block:
                    return i, "separator"
                k = i + 1
                while k < len(lines) and not lines[k].strip():
                    k += 1
                if k < len(lines) and _outlook_block_at(lines, k, p):
                    return i, "outlook"
        if (p.outlook_from.match(cl) or p.outlook_inline.match(cl)) and _outlook_block_at(lines, i, p):
            return i, "outlook"
        start = _reply_header_at(lines, i, p)
        if start is not None:
            return start, "reply_header"
    return None


def _find_signature(lines: list[str], p: _Patterns) -> int | None:
    """Index of the line where the signature starts in the new text, or None. Conservative."""
    n = len(lines)
    candidates: list[int] = []
    for i, line in enumerate(lines):
        raw = line.rstrip("\n")
        if raw in ("-- ", "--") and i > 0:
            rest = [x for x in lines[i + 1:] if x.strip()]
            if len(rest) <= DASH_SIGNATURE_LINES or _legal_at(lines, i + 1, p) is not None:
                candidates.append(i)
                break
    for i in range(n):
        cl = _clean(lines[i])
        if not cl:
            continue
        if any(rx.match(cl) for rx in p.sent_from):
            if _short_block(lines, i + 1, p):
                candidates.append(i)
                break
    for i in range(n):
        cl = _clean(lines[i])
        if not cl or len(cl) > 60:
            continue
        if p.signoff.match(cl) and _has_text_before(lines, i) and _short_block(lines, i + 1, p):
            candidates.append(i)
            break
    legal = None
    for i in range(n):
        # a footer is its own paragraph below some text
        if i > 0 and not lines[i - 1].strip() and _has_text_before(lines, i):
            legal = _legal_at(lines, i, p)
            if legal is not None:
                candidates.append(legal)
                break
    return min(candidates) if candidates else None


def _has_text_before(lines: list[str], i: int) -> bool:
    return any(x.strip() for x in lines[:i])


def _legal_at(lines: list[str], i: int, p: _Patterns) -> int | None:
    """If a legal footer paragraph starts at line i (skipping blank lines), its index."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines):
        return None
    cl = _clean(lines[i])
    para = " ".join(_clean(x) for x in lines[i:i + 12])[:600]
    for start, contains in p.legal:
        if start.match(cl) and contains.search(para):
            return i
    return None


def _short_block(lines: list[str], i: int, p: _Patterns) -> bool:
    """Is lines[i:] a short block of name/title/phone lines (optionally ending in a legal footer)?"""
    count = 0
    for j in range(i, len(lines)):
        cl = _clean(lines[j])
        if not cl:
            continue
        if _legal_at(lines, j, p) == j:
            return True
        count += 1
        if count > SIGNATURE_BLOCK_LINES or len(cl) > SIGNATURE_LINE_CHARS:
            return False
        # a sentence (ends in '.', '?' and is long) is body text, not a signature line
        if len(cl) > 40 and cl[-1] in ".?" and " " in cl:
            return False
    return True


def _forward_body(lines: list[str], p: _Patterns) -> list[str]:
    """The lines of a forwarded message after its marker and header lines (From:, Date:, Subject:, To:)."""
    i = 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines) and lines[i].strip() and p.outlook_any.match(_clean(lines[i])):
        i += 1
        # a header value may wrap onto the next line when it holds many addresses
        while i < len(lines) and lines[i].startswith((" ", "\t")) and lines[i].strip() \
                and not p.outlook_any.match(_clean(lines[i])):
            i += 1
    return lines[i:]


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n").rstrip()


def split_reply(text: str) -> ReplyParts:
    """Split a plain-text body into new text, quoted earlier mail and signature (see module doc)."""
    return _split(text, 0)


def _split(text: str, depth: int) -> ReplyParts:
    p = _patterns()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    overflow = ""
    if len(text) > MAX_TEXT:
        text, overflow = text[:MAX_TEXT], text[MAX_TEXT:]
    lines = text.split("\n")
    found = _find_quote_start(lines, p)
    forwarded = False
    if found is None:
        head, tail, kind = lines, [], ""
    else:
        idx, kind = found
        head, tail = lines[:idx], lines[idx:]
        # Outlook puts a row of underscores (or a blank line and one) just above its header block
        while head and re.fullmatch(r"\s*_{10,}\s*", head[-1]):
            tail.insert(0, head.pop())

    quoted: list[str] = []
    new: list[str] = []
    if kind == "reply_header":
        # header, then its '>' lines; unquoted text after them is a bottom-posted or interleaved answer
        hdr_end = next((j for j in range(len(tail)) if p.verbs.search(_clean(tail[j].lstrip("> ")))), 0)
        quoted.extend(tail[:hdr_end + 1])
        rest = tail[hdr_end + 1:]
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

    # '>' quoted lines in the head without a header (interleaved replies): move them out
    head_new = [x for x in head if not _is_quoted(x)]
    head_quoted = [x for x in head if _is_quoted(x)]
    if head_quoted:
        quoted = head_quoted + quoted
    all_new = head_new + new

    if forwarded and not any(x.strip() for x in _strip_signature(head_new, p)[0]) and depth < MAX_FORWARD_DEPTH:
        inner = _split(_join(_forward_body(quoted, p)), depth + 1)
        return ReplyParts(inner.new, inner.quoted + overflow, inner.signature, True)

    body, signature = _strip_signature(all_new, p)
    return ReplyParts(_join(body), _join(quoted) + overflow, _join(signature), forwarded)


def _strip_signature(lines: list[str], p: _Patterns) -> tuple[list[str], list[str]]:
    sig = _find_signature(lines, p)
    if sig is None:
        return lines, []
    return lines[:sig], lines[sig:]
