"""Attachments: which MIME parts are attachments, and the text of CSV/TXT/XLSX ones (SIM lists arrive that way)."""
from __future__ import annotations

import io
import zipfile
from datetime import date, datetime, time
from email.message import Message as EmailMessage

MAX_TEXT_CHARS = 2_000_000      # text kept from one attachment
MAX_ROWS = 10_000               # spreadsheet/CSV rows kept from one attachment
MAX_XLSX_BYTES = 20_000_000     # compressed XLSX size we open at all
MAX_XLSX_UNPACKED = 200_000_000  # uncompressed size of its members (zip bombs stop here)
MAX_CELLS_PER_ROW = 200

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
    """Cells of every sheet, joined by tabs and newlines; at most MAX_ROWS rows and MAX_TEXT_CHARS characters."""
    if len(data) > MAX_XLSX_BYTES:
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if sum(i.file_size for i in z.infolist()) > MAX_XLSX_UNPACKED:
                return None
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    try:
        from openpyxl import load_workbook
    except ImportError:   # openpyxl is a dependency; without it the attachment simply has no text
        return None
    out: list[str] = []
    size = rows = 0
    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        try:
            for ws in wb.worksheets:
                if rows >= MAX_ROWS or size >= MAX_TEXT_CHARS:
                    break
                if len(wb.worksheets) > 1:
                    out.append(f"# {ws.title}")
                for row in ws.iter_rows(values_only=True):
                    cells = [_cell(v) for v in row[:MAX_CELLS_PER_ROW]]
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
        finally:
            wb.close()
    except Exception:  # noqa: BLE001 - a corrupt workbook is a content problem: no text, not a crash
        return None
    return "\n".join(out)[:MAX_TEXT_CHARS]
