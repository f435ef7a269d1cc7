"""Raw input from any channel to a Message: e-mail bytes, Slack events, training-data fields, files on disk."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from triagebot.errors import InputError
from triagebot.model import Message
from triagebot.normalize.html import html_to_text
from triagebot.normalize.quotes import ReplyParts, split_reply

__all__ = ["ReplyParts", "html_to_text", "load_input", "message_from_text", "split_reply", "storable"]

MAX_INPUT_BYTES = 50_000_000   # a file larger than this is not one message we can triage

# PostgreSQL text (and jsonb) cannot hold NUL, and no UTF-8 encoder takes a lone surrogate; both reach us
# from mail (a NUL byte in a body, UTF-7 or unicode-escape "charsets" that decode to "\ud800")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_TEXT_FIELDS = ("text", "subject", "message_id", "sender", "sender_name", "quoted", "signature", "channel",
                "team_id", "ts", "thread_ts", "user_locale", "language_hint")


def _clean(value: str) -> str:
    return _UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)


def storable(message: Message) -> Message:
    """The message with every text fit for a database, JSON and UTF-8: NUL dropped, lone surrogates as U+FFFD."""
    changes: dict = {}
    for name in _TEXT_FIELDS:
        value = getattr(message, name)
        if isinstance(value, str) and _UNSTORABLE.search(value):
            changes[name] = _clean(value)
    for name in ("recipients", "in_reply_to", "references", "flags"):
        values = getattr(message, name)
        if any(_UNSTORABLE.search(v) for v in values):
            changes[name] = tuple(_clean(v) for v in values)
    if any(_UNSTORABLE.search(k) or _UNSTORABLE.search(v) for k, v in message.headers):
        changes["headers"] = tuple((_clean(k), _clean(v)) for k, v in message.headers)
    if any(_UNSTORABLE.search(f"{a.filename or ''}{a.content_type}{a.text or ''}") for a in message.attachments):
        changes["attachments"] = tuple(
            replace(a, filename=_clean(a.filename) if a.filename else a.filename, content_type=_clean(a.content_type),
                    text=_clean(a.text) if a.text else a.text) for a in message.attachments)
    return replace(message, **changes) if changes else message


def from_raw(channel: str, raw: bytes) -> Message:
    """Raw bytes of a channel (an RFC 822 mail, or a Slack event as JSON) to a Message; InputError when the
    content is unreadable."""
    from triagebot.normalize.email import parse_email
    from triagebot.normalize.slack import parse_slack
    if channel == "slack":
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd numbers, absurd nesting
            raise InputError(f"not valid JSON: {type(e).__name__}: {e}") from None
        return parse_slack(payload)
    return parse_email(raw)


def message_from_text(channel: str, subject: str | None, body: str, html: bool = False,
                      headers: dict | None = None) -> Message:
    """A Message from training-data fields: the body as received (HTML when html), split into new/quoted/signature."""
    source = "slack" if channel == "slack" else "email"
    flags: list[str] = []
    text = body or ""
    if html:
        text = html_to_text(text)
        flags.append("html_only")
    if source == "slack":
        from triagebot.normalize.slack import mrkdwn_to_text
        parts = ReplyParts(mrkdwn_to_text(text).strip(), "", "")
    else:
        parts = split_reply(text)
        if parts.forwarded:
            flags.append("forwarded")
    if not parts.new.strip():
        flags.append("no_text")
    hdrs = tuple((str(k), str(v)) for k, v in (headers or {}).items())
    return storable(Message(source=source, text=parts.new, subject=subject, headers=hdrs, quoted=parts.quoted,
                            signature=parts.signature, flags=tuple(flags)))


def load_input(path: Path) -> Message:
    """Read one input file (*.eml, *.json or sniffed) into a Message; InputError with one line when unreadable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise InputError(f"cannot read {path}: file too large ({size} bytes)")
        raw = path.read_bytes()
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw.strip():
        raise InputError("empty file")
    suffix = path.suffix.lower()
    if suffix == ".json" or (suffix != ".eml" and raw.lstrip()[:1] == b"{"):
        return _load_json(raw)
    from triagebot.normalize.email import parse_email
    return parse_email(raw)


def _load_json(raw: bytes) -> Message:
    from triagebot.normalize.slack import parse_slack
    try:
        payload = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"not valid JSON: not UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise InputError("not valid JSON: nested too deeply") from None
    except ValueError as e:   # an integer of more than 4,300 digits (Python's int conversion limit)
        raise InputError(f"not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise InputError(f"not valid JSON: expected an object, got {type(payload).__name__}")
    return parse_slack(payload)
