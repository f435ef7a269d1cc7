"""Raw input from any channel to a Message: e-mail bytes, Slack events, training-data fields, files on disk."""
from __future__ import annotations

import json
from pathlib import Path

from triagebot.errors import InputError
from triagebot.model import Message
from triagebot.normalize.html import html_to_text
from triagebot.normalize.quotes import ReplyParts, split_reply

__all__ = ["ReplyParts", "html_to_text", "load_input", "message_from_text", "split_reply"]

MAX_INPUT_BYTES = 50_000_000   # a file larger than this is not one message we can triage


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
    return Message(source=source, text=parts.new, subject=subject, headers=hdrs, quoted=parts.quoted,
                   signature=parts.signature, flags=tuple(flags))


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
    if not isinstance(payload, dict):
        raise InputError(f"not valid JSON: expected an object, got {type(payload).__name__}")
    return parse_slack(payload)
