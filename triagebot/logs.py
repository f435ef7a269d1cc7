"""Log redaction: e-mail addresses, phone numbers and SIM identifiers never reach a log line unredacted.

`install()` (called by `triagebot.cli.main`) puts a `RedactingFilter` on the root logger *and on each of its
handlers*: a filter on a logger only sees records logged on that very logger, not those propagated from
`triagebot.*` children, while a handler's filter sees every record it writes.

What is redacted (STYLE.md, "Errors"; the data-protection issue):
* e-mail addresses: the local part (`***@example.net`; the domain names the customer, which helps debugging);
* phone numbers written as such: starting with `+`, `00`, `0` or `(`, or the US `555-123-4567` form, 8–15 digits;
* runs of 9 or more digits (ICCID, IMSI, IMEI, MSISDN without a prefix), unless part of a decimal number
  (Slack timestamps, measurements).
Message bodies are kept out of logs by the code that logs (log ids, not texts); a filter cannot tell a body
from any other string. Names in "Name <address>" stay.
"""
from __future__ import annotations

import logging
import re

EMAIL = re.compile(r"(?<![\w.+%-])[\w.+%-]+@((?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63})\b")
# an identifier: 9+ digits, an ICCID may end in F; not glued to a word, not a part of a decimal number
DIGITS = re.compile(r"(?<![\w.])(?<!\d\.)\d{9,}[Ff]?(?!\w)(?!\.\d)")
PHONE = re.compile(
    r"(?<![\w+])(?:\+|00)\d[\d \t().-]{5,22}\d(?![\w])"                 # +46 70 123 45 67, 0046-70-1234567
    r"|(?<![\w(])\(?0\d{1,4}\)?[ \t-]?\d[\d \t-]{4,16}\d(?![\w])"      # 070-123 45 67, (08) 123 456 78
    r"|(?<![\w(])\(\d{3}\)[ \t]?\d{3}[ \t-]\d{4}(?![\w])"              # (555) 123-4567
    r"|(?<![\w-])\d{3}-\d{3}-\d{4}(?![\w-])")                          # 555-123-4567
EMAIL_MASK, PHONE_MASK, ID_MASK = "***@{domain}", "[phone]", "[id]"


def _phone(m: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in m.group(0))
    return PHONE_MASK if 8 <= digits <= 15 else m.group(0)


def redact(text: str) -> str:
    """The text with e-mail addresses, phone numbers and long digit runs masked."""
    if not text:
        return text
    text = EMAIL.sub(lambda m: EMAIL_MASK.format(domain=m.group(1)), text)
    text = DIGITS.sub(ID_MASK, text)
    return PHONE.sub(_phone, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, exception text and stack with `redact` before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let logging report it as it always does
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            # Formatter.format uses exc_text when it is set: format the traceback now so it can be redacted
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> RedactingFilter:
    """Put one RedactingFilter on a logger (default the root) and every handler it has; idempotent."""
    logger = logger if logger is not None else logging.getLogger()
    found = [f for f in logger.filters if isinstance(f, RedactingFilter)]
    flt = found[0] if found else RedactingFilter()
    if not found:
        logger.addFilter(flt)
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
