"""Attachments: which MIME parts are attachments, and the text of CSV/TXT/XLSX ones (SIM lists arrive that way)."""
from __future__ import annotations

import io
import re
import zipfile
from datetime import date, datetime, time
from email.message import Message as EmailMessage
from typing import IO, Iterator
from xml.etree import ElementTree as ET

MAX_TEXT_CHARS = 2_000_000      # text kept from one attachment
MAX_ROWS = 10_000               # spreadsheet/CSV rows kept from one attachment
MAX_XLSX_BYTES = 20_000_000     # compressed XLSX size we open at all
MAX_XLSX_UNPACKED = 200_000_000  # uncompressed size of its members (zip bombs stop here)
MAX_CELLS_PER_ROW = 200

# the XLSX reader's budgets (xlsx_text): every read and loop is bounded, whatever the zip says
MAX_SHEETS = 100                # sheets read from one workbook
MAX_XML_BYTES = 50_000_000      # decompressed bytes read from one sheet or the shared strings
MAX_META_BYTES = 5_000_000      # ... from workbook.xml, its relations and styles.xml
MAX_SHARED_CHARS = 20_000_000   # characters of shared strings kept
MAX_SHARED_STRINGS = 500_000    # shared strings read (only as far as the cells refer)
MAX_CELLS_SCANNED = 500_000     # cell elements looked at in one workbook (empty or not; 10,000 rows x 50)
MAX_ROWS_SCANNED = 200_000      # row elements looked at in one workbook (empty or not)
MAX_ROW_CELLS = 16_384          # cell elements in one row (Excel's column limit); more: reading stops

_TEXT_TYPES = ("text/csv", "text/plain", "text/tab-separated-values", "text/comma-separated-values",
               "application/csv", "application/x-csv", "text/x-csv")
_TEXT_EXTENSIONS = (".csv", ".txt", ".tsv", ".tab", ".lst", ".log")
_XLSX_TYPES = ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
               "application/vnd.ms-excel.sheet.macroenabled.12")
_XLSX_EXTENSIONS = (".xlsx", ".xlsm")
# types clients use for CSV/XLSX files they do not recognise (Windows labels CSV as application/vnd.ms-excel)
_GENERIC_TYPES = ("application/octet-stream", "application/vnd.ms-excel", "application/x-msexcel",
                  "application/excel", "application/download", "application/force-download", "binary/octet-stream")


def is_attachment(part: EmailMessage, ctype: str, filename: str | None) -> bool:
    """Is this leaf part an attachment rather than body text? (named, or Content-Disposition: attachment)."""
    if not ctype.startswith("text/") or ctype in ("text/rfc822-headers", "text/calendar", "text/x-vcard", "text/vcard"):
        return True
    disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    if disposition == "attachment":
        return True
    # a named text part is a file (a .txt/.csv SIM list), even when the client marked it inline
    return filename is not None


def _kind(filename: str | None, ctype: str) -> str | None:
    name = (filename or "").lower()
    if ctype in _XLSX_TYPES or (name.endswith(_XLSX_EXTENSIONS) and (ctype in _GENERIC_TYPES or not ctype)):
        return "xlsx"
    if ctype in _TEXT_TYPES or (name.endswith(_TEXT_EXTENSIONS) and (ctype in _GENERIC_TYPES or ctype.startswith("text/"))):
        return "text"
    return None


def extract_text(filename: str | None, ctype: str, data: bytes, charset: str | None = None) -> str | None:
    """The text of a CSV/TXT/XLSX attachment (bounded), or None for any other kind or an unreadable file."""
    kind = _kind(filename, ctype)
    if kind == "text":
        from triagebot.normalize.email import decode_bytes   # charset repair lives with the e-mail decoder
        if data.startswith(b"\xef\xbb\xbf"):
            data, charset = data[3:], "utf-8"
        elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
            charset = "utf-16"   # Excel's "Unicode text" export
        text, _ = decode_bytes(data[:MAX_TEXT_CHARS * 2], charset)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:MAX_ROWS]
        return "\n".join(lines)[:MAX_TEXT_CHARS]
    if kind == "xlsx":
        return xlsx_text(data)
    return None


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).upper()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return f"{value:.0f}"    # an ICCID or MSISDN stored as a number must not become 8.946e+18
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def xlsx_text(data: bytes) -> str | None:
    """Cells of every sheet, joined by tabs and newlines; at most MAX_ROWS rows and MAX_TEXT_CHARS characters.

    Read with a streaming parser of our own, not openpyxl's reader: openpyxl loads every shared string,
    pads each row to the sheet's declared width and walks every missing row up to the last row number,
    so a 4 kB file (one cell at XFD1048576) takes a minute, and a zip of one 200 MB row or 200 MB of
    shared strings takes gigabytes. Here every read and every loop is bounded (the MAX_* above).
    """
    if len(data) > MAX_XLSX_BYTES:
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            # the declared sizes bound the work (zipfile stops a member at its declared size and then
            # fails its CRC, so a member that lies about its size is cut there)
            if sum(i.file_size for i in z.infolist()) > MAX_XLSX_UNPACKED:
                return None
            book = _Book(z)
            if not book.sheets:
                return None
            return book.text()
    except Exception:  # noqa: BLE001 - a corrupt workbook (bad CRC, zlib error, encrypted member, ...) has no text
        return None


_CELL_REF = re.compile(r"([A-Za-z]{1,3})(\d*)$")
_REL_NS = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _Limited(io.RawIOBase):
    """A member of the zip read up to a number of bytes; past it the XML simply ends (and fails to parse)."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self.f, self.left = f, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:   # type: ignore[override]
        if self.left <= 0:
            return 0
        chunk = self.f.read(min(len(b), self.left, 1 << 16))
        n = len(chunk)
        b[:n] = chunk
        self.left -= n
        return n


def _column(ref: str | None) -> int | None:
    """1-based column of a cell reference ("C12" -> 3), None when there is none."""
    m = _CELL_REF.match(ref.strip()) if ref else None
    if not m:
        return None
    n = 0
    for ch in m.group(1).upper():
        n = n * 26 + ord(ch) - 64
    return n


def _is(tag: str, name: str) -> bool:
    """Is this element tag `name` in any (or no) namespace? (faster than _local on the hot path)"""
    return tag == name or (tag.endswith(name) and tag[-len(name) - 1] == "}")


def _number(text: str) -> int | float | str:
    text = text.strip()
    try:
        if "." in text or "e" in text or "E" in text or len(text) > 30:
            return float(text)
        return int(text)
    except ValueError:   # "#N/A" in a number cell, or a 5,000-digit integer
        return text


def _texts(el: ET.Element) -> Iterator[ET.Element]:
    """The <t> elements of a string item, leaving out phonetic guides (<rPh>)."""
    for child in el:
        tag = _local(child.tag)
        if tag == "t":
            yield child
        elif tag == "r":
            yield from (t for t in child if _local(t.tag) == "t")


class _Book:
    """The parts of an XLSX workbook needed for its text: sheet order and names, shared strings, date styles."""

    def __init__(self, z: zipfile.ZipFile) -> None:
        self.z = z
        self.names = {i.filename for i in z.infolist()}
        self.sheets: list[tuple[str, str]] = self._sheets()        # (title, member)
        self.date_styles, self.timedelta_styles, self.epoch = self._styles()
        self.strings: list[str] | None = None
        self._shared_iter: Iterator = iter(())
        self._shared_chars = 0
        self.rows_scanned = self.cells_scanned = 0

    def _iter(self, member: str, limit: int, events: tuple[str, ...] = ("end",)) -> Iterator:
        # expat (used by ElementTree) refuses entity-expansion bombs ("billion laughs") by itself
        return ET.iterparse(io.BufferedReader(_Limited(self.z.open(member), limit)), events=events)

    def _xml(self, member: str) -> ET.Element | None:
        if member not in self.names:
            return None
        root = None
        try:
            for _event, el in self._iter(member, MAX_META_BYTES):
                root = el
        except ET.ParseError:
            return None
        return root

    def _sheets(self) -> list[tuple[str, str]]:
        targets: dict[str, str] = {}
        rels = self._xml("xl/_rels/workbook.xml.rels")
        for rel in rels.iter() if rels is not None else ():
            if _local(rel.tag) == "Relationship" and rel.get("Id") and rel.get("Target"):
                target = rel.get("Target", "")
                targets[rel.get("Id", "")] = target.lstrip("/") if target.startswith("/") else "xl/" + target
        out: list[tuple[str, str]] = []
        wb = self._xml("xl/workbook.xml")
        for el in wb.iter() if wb is not None else ():
            if _local(el.tag) == "sheet":
                member = targets.get(el.get(_REL_NS) or el.get("id") or "", "")
                if member in self.names:
                    out.append((str(el.get("name") or member), member))
        if not out:   # no usable workbook.xml: the worksheets in name order
            out = [(m.rsplit("/", 1)[-1], m) for m in sorted(self.names)
                   if m.startswith("xl/worksheets/") and m.endswith(".xml")]
        return out[:MAX_SHEETS]

    def _styles(self) -> tuple[frozenset[int], frozenset[int], datetime]:
        from openpyxl.styles.numbers import BUILTIN_FORMATS, is_date_format, is_timedelta_format
        from openpyxl.utils.datetime import CALENDAR_MAC_1904, CALENDAR_WINDOWS_1900
        epoch = CALENDAR_WINDOWS_1900
        wb = self._xml("xl/workbook.xml")
        for el in wb.iter() if wb is not None else ():
            if _local(el.tag) == "workbookPr" and (el.get("date1904") or "").lower() in ("1", "true"):
                epoch = CALENDAR_MAC_1904
        styles = self._xml("xl/styles.xml")
        if styles is None:
            return frozenset(), frozenset(), epoch
        formats: dict[int, str] = dict(BUILTIN_FORMATS)
        dates: set[int] = set()
        deltas: set[int] = set()
        for el in styles.iter():
            if _local(el.tag) == "numFmt" and (el.get("numFmtId") or "").isdigit():
                formats[int(el.get("numFmtId", "0")[:9])] = el.get("formatCode") or ""
        for el in styles.iter():
            if _local(el.tag) == "cellXfs":
                for index, xf in enumerate(x for x in el if _local(x.tag) == "xf"):
                    fid = xf.get("numFmtId") or "0"
                    fmt = formats.get(int(fid[:9])) if fid.isdigit() else None
                    if fmt and is_date_format(fmt[:200]):
                        dates.add(index)
                        if is_timedelta_format(fmt[:200]):
                            deltas.add(index)
                break
        return frozenset(dates), frozenset(deltas), epoch

    def shared(self, index: int) -> str:
        """Shared string number `index`: the file is read only as far as cells refer, and bounded."""
        if self.strings is None:
            self.strings = []
            member = next((m for m in ("xl/sharedStrings.xml", "xl/SharedStrings.xml") if m in self.names), None)
            self._shared_iter = self._iter(member, MAX_XML_BYTES) if member else iter(())
            self._shared_chars = 0
        while len(self.strings) <= index and len(self.strings) < MAX_SHARED_STRINGS \
                and self._shared_chars <= MAX_SHARED_CHARS:
            try:
                _event, el = next(self._shared_iter)
            except (StopIteration, ET.ParseError):   # the end, or a cut or broken file
                self._shared_iter = iter(())
                break
            tag = el.tag
            if tag != "si" and not tag.endswith("}si"):
                continue
            if len(el) == 1 and (el[0].tag == "t" or el[0].tag.endswith("}t")) and not len(el[0]):
                text = el[0].text or ""   # the common <si><t>...</t></si>, without the general walk
            else:
                # text of <t> and of rich-text runs <r><t>, not of phonetic guides <rPh><t>
                text = "".join(t.text or "" for t in _texts(el))
            el.clear()
            self._shared_chars += len(text)
            self.strings.append(text)
        return self.strings[index] if 0 <= index < len(self.strings) else ""

    def value(self, c: ET.Element) -> object:
        """The value of one cell element, as openpyxl (data_only) would give it."""
        kind = c.get("t") or "n"
        if kind == "inlineStr":
            inline = next((x for x in c if _local(x.tag) == "is"), None)
            return "".join(t.text or "" for t in _texts(inline)) if inline is not None else None
        v = None
        for x in c:
            if _is(x.tag, "v"):
                v = x.text
                break
        if not v:
            return None
        if kind == "s":
            i = _number(v)
            return self.shared(i) if isinstance(i, int) else ""
        if kind == "b":
            return v.strip() in ("1", "true")
        if kind in ("str", "e", "d"):
            return v
        value = _number(v)
        style = c.get("s") or "0"
        if style.isdigit() and int(style[:9]) in self.date_styles and isinstance(value, (int, float)):
            from openpyxl.utils.datetime import from_excel
            try:
                return from_excel(value, self.epoch, timedelta=int(style[:9]) in self.timedelta_styles)
            except (OverflowError, ValueError):
                return "#VALUE!"
        return value

    def rows(self, member: str) -> Iterator[list[str]]:
        """The rows of one sheet as lists of cell texts (at most MAX_CELLS_PER_ROW), within the budgets."""
        # only "end" events: a cell ends before its row does, so the cells seen since the last row end are its cells
        cells: dict[int, str] = {}
        col = in_row = 0
        try:
            for _event, el in self._iter(member, MAX_XML_BYTES):
                tag = el.tag
                if _is(tag, "c"):
                    self.cells_scanned += 1
                    in_row += 1
                    if self.cells_scanned >= MAX_CELLS_SCANNED or in_row > MAX_ROW_CELLS:
                        if cells:   # the row so far, then no more of this workbook
                            yield [cells.get(i, "") for i in range(1, max(cells) + 1)]
                        self.cells_scanned = MAX_CELLS_SCANNED
                        return
                    ref = el.get("r")
                    col = (_column(ref) if ref else None) or col + 1
                    if col <= MAX_CELLS_PER_ROW:
                        text = _cell(self.value(el))
                        if text:
                            cells[col] = text
                    el.clear()
                elif _is(tag, "row"):
                    self.rows_scanned += 1
                    el.clear()
                    if cells:
                        yield [cells.get(i, "") for i in range(1, max(cells) + 1)]
                    cells, col, in_row = {}, 0, 0
                    if self.rows_scanned >= MAX_ROWS_SCANNED:
                        return
        except ET.ParseError:
            return   # a cut or broken sheet: the rows read so far

    def text(self) -> str:
        out: list[str] = []
        size = rows = 0
        for title, member in self.sheets:
            if rows >= MAX_ROWS or size >= MAX_TEXT_CHARS or self.rows_scanned >= MAX_ROWS_SCANNED \
                    or self.cells_scanned >= MAX_CELLS_SCANNED:
                break
            if len(self.sheets) > 1:
                out.append(f"# {title}")
            for cells in self.rows(member):
                while cells and not cells[-1]:
                    cells.pop()
                if not cells:
                    continue
                line = "\t".join(cells)
                out.append(line)
                rows += 1
                size += len(line) + 1
                if rows >= MAX_ROWS or size >= MAX_TEXT_CHARS:
                    break
        return "\n".join(out)[:MAX_TEXT_CHARS]
