"""Slack Events API message events to a Message: mentions, links and mrkdwn resolved to plain text."""
from __future__ import annotations

import re
from datetime import datetime, timezone

from triagebot.errors import InputError
from triagebot.model import Attachment, Message
from triagebot.normalize import storable

MAX_TEXT = 200_000     # characters of Slack text kept (Slack itself caps messages at 40,000)
MAX_FILES = 50

_MESSAGE_TYPES = ("message", "app_mention")
# subtypes that carry no message a person wrote now
_NOT_MESSAGES = ("message_deleted", "channel_join", "channel_leave", "group_join", "group_leave",
                 "channel_topic", "channel_purpose", "channel_name", "channel_archive", "channel_unarchive",
                 "pinned_item", "unpinned_item", "ekm_access_denied")
_BOT_SUBTYPES = ("bot_message",)

_CODE_BLOCK = re.compile(r"```(.*?)```", re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_ANGLE = re.compile(r"<([^<>\n]{1,2000})>")
# mrkdwn emphasis: the marker must hug non-space text and not sit inside a word (snake_case, 2*3*4)
_BOLD = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
_ITALIC = re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"(?<![\w~])~(?=\S)([^~\n]+?)(?<=\S)~(?![\w~])")
_PLACEHOLDER = "\x00{}\x00"


def _angle(match: re.Match) -> str:
    """One Slack <...> control sequence as plain text."""
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if target.startswith("@"):                      # <@U123> or <@U123|name>
        return "@" + (label or target[1:])
    if target.startswith("#"):                      # <#C123|general>
        return "#" + (label or target[1:])
    if target.startswith("!"):                      # <!here>, <!channel>, <!subteam^S1|@ops>, <!date^..|fallback>
        cmd = target[1:]
        if cmd.startswith("subteam^"):
            return label if label.startswith("@") else "@" + (label or cmd.split("^", 1)[1])
        if cmd.startswith("date^"):
            return label or ""
        return label or "@" + cmd
    if label:
        return label
    # a bare link: Slack shows the address; mailto: and tel: without their scheme
    return re.sub(r"^(mailto|tel):", "", target)


def mrkdwn_to_text(text: str) -> str:
    """Plain text from Slack mrkdwn: control sequences, emphasis, code and HTML entities resolved."""
    # NUL marks our code placeholders below; one in the text itself ("\u00009\u0000" in the JSON) would be
    # read as a placeholder (IndexError, or someone else's code block put in its place). NUL is never text.
    text = text[:MAX_TEXT].replace("\x00", "")
    saved: list[str] = []

    def keep(m: re.Match) -> str:
        # code is literal: no emphasis or link processing inside it
        saved.append(m.group(1).strip("\n"))
        return _PLACEHOLDER.format(len(saved) - 1)

    text = _CODE_BLOCK.sub(keep, text)
    text = _INLINE_CODE.sub(keep, text)
    text = _ANGLE.sub(_angle, text)
    for rx in (_BOLD, _ITALIC, _STRIKE):
        text = rx.sub(r"\1", text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: saved[int(m.group(1))], text)
    # Slack escapes only these three (https://api.slack.com/reference/surfaces/formatting#escaping)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _rich_text(blocks: list) -> str:
    """Text from rich_text blocks, for events that carry blocks but no text."""
    out: list[str] = []

    def walk(el: object, depth: int) -> None:
        if depth > 20 or not isinstance(el, dict):
            return
        kind = el.get("type")
        if kind == "text":
            out.append(str(el.get("text", "")))
        elif kind == "link":
            out.append(str(el.get("text") or el.get("url", "")))
        elif kind == "user":
            out.append("@" + str(el.get("user_id", "")))
        elif kind == "channel":
            out.append("#" + str(el.get("channel_id", "")))
        elif kind == "broadcast":
            out.append("@" + str(el.get("range", "")))
        elif kind == "emoji":
            out.append(":" + str(el.get("name", "")) + ":")
        for child in el.get("elements", []) if isinstance(el.get("elements"), list) else []:
            walk(child, depth + 1)
        if kind in ("rich_text_section", "rich_text_preformatted", "rich_text_quote"):
            out.append("\n")

    for block in blocks[:50]:
        walk(block, 0)
    return "".join(out).strip()


def _str(value: object) -> str | None:
    if not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, int) and abs(value) >= 10 ** 100:
        return None   # str() of an integer of 4,300+ digits raises; no Slack id or ts is that long
    return str(value) or None


def parse_slack(payload: dict) -> Message:
    """A Message from a Slack Events API envelope or bare message event; InputError when it is not one."""
    if not isinstance(payload, dict):
        raise InputError("not a Slack message event: payload is not an object")
    team = _str(payload.get("team_id"))
    event = payload
    if payload.get("type") == "event_callback" or "event" in payload:
        event = payload.get("event")
        if not isinstance(event, dict):
            raise InputError("not a Slack message event: envelope has no event object")
    kind = event.get("type")
    if kind not in _MESSAGE_TYPES:
        raise InputError(f"not a Slack message event: type {str(kind)[:40]!r}")
    subtype = event.get("subtype")
    flags: list[str] = []
    if subtype in _NOT_MESSAGES:
        raise InputError(f"not a Slack message event: subtype {subtype}")
    if subtype == "message_changed":
        # an edit: the new version is in event["message"]; the channel stays on the outer event
        inner = event.get("message")
        if not isinstance(inner, dict):
            raise InputError("not a Slack message event: message_changed without message")
        event = {**inner, "channel": event.get("channel"), "channel_type": event.get("channel_type")}
        flags.append("edited")
    if event.get("subtype") in _BOT_SUBTYPES or event.get("bot_id"):
        flags.append("bot_message")
    channel = _str(event.get("channel"))
    ts = _str(event.get("ts"))
    if not channel or not ts:
        raise InputError("not a Slack message event: missing channel or ts")
    team = team or _str(event.get("team")) or _str(event.get("user_team"))
    raw_text = event.get("text")
    if isinstance(raw_text, str) and raw_text.strip():
        text = mrkdwn_to_text(raw_text).strip()
    elif isinstance(event.get("blocks"), list):
        text = _rich_text(event["blocks"])
    else:
        text = ""
    attachments = []
    files = event.get("files") if isinstance(event.get("files"), list) else []
    for f in files[:MAX_FILES]:
        if isinstance(f, dict):
            size = f.get("size")
            attachments.append(Attachment(_str(f.get("name")), _str(f.get("mimetype")) or "application/octet-stream",
                                          size if isinstance(size, int) else 0, None))
    if not text:
        flags.append("no_text")
    try:
        date = datetime.fromtimestamp(float(ts), tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        date = None
    return storable(Message(
        source="slack",
        text=text,
        subject=None,
        message_id=f"slack:{team or ''}:{channel}:{ts}",
        sender=_str(event.get("user")) or _str(event.get("bot_id")),
        sender_name=_str(event.get("username")),
        date=date,
        attachments=tuple(attachments),
        channel=channel,
        team_id=team,
        ts=ts,
        thread_ts=_str(event.get("thread_ts")),
        user_locale=_str(event.get("user_locale")),
        flags=tuple(flags),
    ))
