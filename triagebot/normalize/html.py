"""HTML mail bodies to readable plain text with the standard library's HTMLParser.

Paragraphs and block elements become lines, <br> a line break, list items "- " lines, table rows one
line with cells separated by tabs, <blockquote> lines get "> " (so split_reply sees quoted mail as
quoted), <hr> a row of underscores (Outlook's separator above a quoted header block). <head>, <style>,
<script> and similar are dropped; entities are decoded.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

MAX_HTML = 1_000_000     # characters of HTML looked at; hostile or huge mail is cut here (about 1 s of parsing)
MAX_QUOTE_PREFIX = 10    # "> " levels written for nested <blockquote>
MAX_DEPTH = 200          # open elements tracked; deeper nesting is treated as flat
HR_LINE = "_" * 32
_CELL = "\x1f"           # cell separator that survives whitespace collapsing; becomes a tab

_SKIP = frozenset({"head", "style", "script", "title", "noscript", "template", "svg", "math", "object",
                   "iframe", "xml", "select", "option"})
_BLOCK = frozenset({"address", "article", "aside", "center", "dd", "details", "dialog", "div", "dl", "dt",
                    "fieldset", "figcaption", "figure", "footer", "form", "header", "main", "nav", "ol",
                    "section", "summary", "table", "tbody", "thead", "tfoot", "ul", "caption", "body", "html"})
_PARA = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre"})
_VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param",
                   "source", "track", "wbr"})
_WS = re.compile(r"[ \t\r\n\f\v\u00a0\u200b\u2002\u2003\u2009]+")


class _TextParser(HTMLParser):
    """Collects (quote depth, text) lines while walking the HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str]] = []
        self.cur: list[str] = []
        self.cur_depth = 0
        self.quote = 0
        self.skip = 0
        self.pre = 0
        self.lists: list[list] = []      # per open list: [ordered, counter]
        self.cells_in_row = 0
        self.pending_blank = False

    # line management ---------------------------------------------------------------------
    def _newline(self) -> None:
        text = "".join(self.cur)
        if self.pre:
            text = text.rstrip()
        else:
            text = _WS.sub(" ", text).strip()
            text = re.sub(r" ?\x1f ?", "\t", text).strip("\t ")
        if text:
            self._emit(self.cur_depth, text)
        self.cur = []

    def _emit(self, depth: int, text: str) -> None:
        if self.pending_blank and self.lines and self.lines[-1][1] != "":
            self.lines.append((depth, ""))
        self.lines.append((depth, text))
        self.pending_blank = False

    def _block(self, blank: bool = False) -> None:
        self._newline()
        if blank:
            self.pending_blank = True

    def _write(self, text: str) -> None:
        if not self.cur or not "".join(self.cur).strip():
            self.cur_depth = self.quote
        self.cur.append(text)

    # HTMLParser hooks ----------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            if tag not in ("meta", "link"):
                self.skip += 1
            return
        if self.skip:
            return
        if tag == "br":
            if self.pre:
                self.cur.append("\n")
            self._newline()
        elif tag == "hr":
            self._block()
            self._emit(self.quote, HR_LINE)
        elif tag == "blockquote":
            self._block(blank=True)
            self.quote += 1
        elif tag in ("ul", "ol"):
            self._block()
            self.lists.append([tag == "ol", 0])
        elif tag == "li":
            self._block()
            if self.lists and self.lists[-1][0]:
                self.lists[-1][1] += 1
                self._write(f"{self.lists[-1][1]}. ")
            else:
                self._write("- ")
        elif tag == "tr":
            self._block()
            self.cells_in_row = 0
        elif tag in ("td", "th"):
            if self.cells_in_row:
                self._write(_CELL)
            self.cells_in_row += 1
        elif tag in _PARA:
            self._block(blank=True)
            if tag == "pre":
                self.pre += 1
        elif tag in _BLOCK:
            self._block()
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and alt.strip() and len(alt) < 100:
                self._write(f" {alt.strip()} ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            return
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            if tag not in ("meta", "link") and self.skip:
                self.skip -= 1
            return
        if self.skip:
            return
        if tag == "blockquote":
            self._block(blank=True)
            self.quote = max(0, self.quote - 1)
        elif tag in ("ul", "ol"):
            self._block()
            if self.lists:
                self.lists.pop()
        elif tag in ("li", "tr"):
            self._block()
        elif tag in _PARA:
            self._block(blank=True)
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
        elif tag in _BLOCK:
            self._block()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        data = data.replace(_CELL, " ")
        if self.pre:
            parts = data.split("\n")
            for k, part in enumerate(parts):
                if k:
                    self._newline()
                self._write(part)
        else:
            self._write(data)

    def close(self) -> None:
        super().close()
        self._newline()


# A "<" that starts no tag, or whose tag never closes before the next "<": HTMLParser rescans such input
# from each "<" to the end, which is quadratic ("<a <a <a ..." of 100 kB takes minutes); escape it first.
_LONE_LT = re.compile(r"<(?![A-Za-z/!?])|<(?=[^<>]*(?:<|\Z))")


def _defuse(html: str) -> str:
    """HTML without comments and without "<" that cannot start a complete tag, in linear time."""
    out: list[str] = []
    i = 0
    while True:
        j = html.find("<!--", i)
        if j < 0:
            out.append(html[i:])
            break
        out.append(html[i:j])
        k = html.find("-->", j + 4)
        if k < 0:
            break            # an unclosed comment hides the rest, as in a browser
        i = k + 3
    return _LONE_LT.sub("&lt;", "".join(out))


def html_to_text(html: str) -> str:
    """Readable plain text from an HTML body (never raises on broken HTML)."""
    if not html:
        return ""
    parser = _TextParser()
    try:
        parser.feed(_defuse(html[:MAX_HTML]))
        parser.close()
    except Exception:  # noqa: BLE001 - HTMLParser can trip over hostile markup; keep what was read
        parser._newline()
    out: list[str] = []
    for depth, text in parser.lines:
        prefix = "> " * min(depth, MAX_QUOTE_PREFIX)
        out.append((prefix + text) if text else "")
    result = "\n".join(out).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", result)
