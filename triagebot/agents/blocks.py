"""Block Kit for the agents' suggestion messages, and the escaping that keeps customer text harmless.

Customer-controlled text (message body, subject, names, addresses) is never trusted as mrkdwn:

* `&`, `<` and `>` become `&amp;`, `&lt;`, `&gt;` (https://api.slack.com/reference/surfaces/formatting#escaping),
  so `<!channel>`, `<!here>`, `<@U123>`, `<#C123>` and `<https://evil|click>` are shown, not parsed;
* the broadcast words `@channel`, `@here` and `@everyone` get a word joiner after the `@`, so no client or
  `link_names` setting can turn the literal word into a notification;
* the message body sits in a code block (no bold, italics, links or quotes inside one) whose closing fence
  the customer cannot forge; short fields go into inline code;
* every mrkdwn text object that holds such text is `verbatim`, so Slack does not auto-link URLs or names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Sequence

from triagebot.model import CATEGORIES, SERVICES, SEVERITIES

# action ids: one per control; the value of each control is the case id
ACCEPT = "tb_accept"
SET_CATEGORY = "tb_category"
SET_SERVICE = "tb_service"
SET_SEVERITY = "tb_severity"
ESCALATE = "tb_escalate"
MERGE = "tb_merge"
SEND_REPLY = "tb_send_reply"
MERGE_MODAL = "tb_merge_modal"          # callback_id of the merge modal
MERGE_INPUT_BLOCK = "tb_merge_target"
MERGE_INPUT_ACTION = "tb_merge_reference"
LABEL_ACTIONS = {SET_CATEGORY: "category", SET_SERVICE: "service", SET_SEVERITY: "severity"}
LABEL_VALUES = {"category": CATEGORIES, "service": SERVICES, "severity": SEVERITIES}

MAX_SECTION = 3000       # Slack's limit for a section's text
MAX_FIELD = 2000         # ... and for one field of a section
BODY_CHARS = 2400        # how much of the customer's text goes into the suggestion
WORD_JOINER = "\u2060"   # invisible, and not a word boundary: "@\u2060channel" is no broadcast
ZERO_WIDTH_SPACE = "\u200b"
SEVERITY_MARK = {"critical": ":red_circle:", "high": ":large_orange_circle:", "medium": ":large_yellow_circle:",
                 "low": ":white_circle:"}

_BROADCAST = re.compile(r"@(?=(?:channel|here|everyone|group)\b)", re.IGNORECASE)
_FENCE = re.compile(r"`{3,}")
_SLACK_USER = re.compile(r"^[UW][A-Z0-9]{2,20}$")


def escape(text: str | None) -> str:
    """Text for a mrkdwn field: Slack's three control characters escaped and broadcast words broken."""
    s = (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCAST.sub("@" + WORD_JOINER, s)


_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
FENCE = "```"


def _escaped_pieces(s: str) -> list[str]:
    """escape(s) as one piece per character of s, so a cut between pieces never splits an entity or a fence break."""
    pieces = [_ESCAPES.get(c, c) for c in s]
    for m in _BROADCAST.finditer(s):
        pieces[m.start()] = "@" + WORD_JOINER
    # a run of three backticks would end the block: keep the backticks, break the run
    for m in _FENCE.finditer(s):
        for i in range(m.start(), m.end() - 1):
            pieces[i] = "`" + ZERO_WIDTH_SPACE
    return pieces


def code_block(text: str | None, limit: int = BODY_CHARS) -> str:
    """Customer text as a mrkdwn code block it cannot close early: no formatting, links or mentions inside.

    The text is escaped first and then cut, so the whole block (fences and note included) is at most `limit`
    (at least 7) characters and ends with its own fence. Cutting the escaped text afterwards (at Slack's 3,000
    for a section) could lose the closing fence, and cutting before escaping could not bound the length ('&' is
    five characters escaped). The cut falls between escaped characters, never inside `&amp;`.
    """
    s = (text or "").strip("\n")
    # each character escapes to one or more, so no more than `limit` of them can show; the few after them are
    # the context that decides a broadcast word ("@everyone") or a backtick run at the edge (a body may be 1 MB)
    pieces = _escaped_pieces(s[:limit + 16])
    body = "".join(pieces)
    if len(s) <= limit + 16 and len(body) + 2 * len(FENCE) <= limit:
        return FENCE + (body or " ") + FENCE
    note = f"\n… ({len(s)} more characters)"          # the longest the note can be
    if len(note) + 2 * len(FENCE) >= limit:
        note = "…"                                     # a tiny limit: only the mark that something is missing
    room = max(0, limit - 2 * len(FENCE) - len(note))
    shown = used = 0
    while shown < len(pieces) and used + len(pieces[shown]) <= room:
        used += len(pieces[shown])
        shown += 1
    while shown and s[shown - 1].isspace():
        shown -= 1
    if note != "…":
        note = f"\n… ({len(s) - shown} more characters)"
    return FENCE + "".join(pieces[:shown]) + note + FENCE


def inline(text: str | None, limit: int = 200) -> str:
    """A short customer-controlled value (name, subject, address) as inline code on one line."""
    s = " ".join((text or "").split())
    if len(s) > limit:
        s = s[:limit - 1] + "…"
    if not s:
        return "—"
    return "`" + escape(s.replace("`", "ˋ")) + "`"


def agent(user_id: str | None) -> str:
    """A Slack user id as a mention, only when it looks like one (it came from Slack's own payload)."""
    if user_id and _SLACK_USER.match(user_id):
        return f"<@{user_id}>"
    return inline(user_id)


def mrkdwn(text: str) -> dict:
    """A verbatim mrkdwn text object: Slack adds no links or mentions of its own."""
    return {"type": "mrkdwn", "text": text[:MAX_SECTION], "verbatim": True}


def plain(text: str) -> dict:
    """A plain_text object (buttons, headers, options)."""
    return {"type": "plain_text", "text": text[:150] or " ", "emoji": True}


def sla_left(due: datetime | None, now: datetime | None = None) -> str:
    """The SLA time left as people say it: '3 h 20 min left', 'overdue by 2 d 4 h', or '—'."""
    if due is None:
        return "—"
    now = now or datetime.now(timezone.utc)
    if due.tzinfo is None:
        due = due.replace(tzinfo=timezone.utc)
    seconds = int((due - now).total_seconds())
    span = abs(seconds)
    days, rest = divmod(span, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        text = f"{days} d {hours} h"
    elif hours:
        text = f"{hours} h {minutes} min"
    else:
        text = f"{minutes} min"
    return f"{text} left" if seconds >= 0 else f"overdue by {text}"


@dataclass(frozen=True)
class Similar:
    """Another open case that looks like the same problem."""

    reference: str
    customer: str | None
    subject: str | None


@dataclass(frozen=True)
class CaseView:
    """Everything a suggestion message shows about one case, read from the database."""

    case_id: int
    reference: str
    status: str = "open"
    source: str = "email"
    customer: str | None = None
    customer_tier: str | None = None
    sender: str | None = None
    sender_name: str | None = None
    slack_channel: str | None = None
    subject: str | None = None
    text: str = ""
    edited: bool = False
    deleted: bool = False
    language: str | None = None
    category: str | None = None
    service: str | None = None
    severity: str | None = None
    confidence: Mapping[str, float] = field(default_factory=dict)
    set_by_agent: Mapping[str, str] = field(default_factory=dict)   # label -> agent id that last set it
    blast_estimate: int | None = None
    blast_tier: str = "none"
    identifiers: Mapping[str, Sequence[str]] = field(default_factory=dict)
    sla_due: datetime | None = None
    parent: str | None = None
    parent_customers: str | None = None
    similar: tuple[Similar, ...] = ()
    reply: str | None = None
    reply_name: str | None = None
    history: tuple[str, ...] = ()       # recent agent actions, already rendered as mrkdwn
    merged_into: str | None = None
    reply_sent: bool = False


def _label(view: CaseView, name: str) -> str:
    value = getattr(view, name)
    if value is None:
        return "—"
    who = view.set_by_agent.get(name)
    if who:
        return f"*{escape(value)}* (set by {agent(who)})"
    conf = view.confidence.get(name)
    return f"*{escape(value)}* ({conf:.0%})" if isinstance(conf, (int, float)) else f"*{escape(value)}*"


def _who(view: CaseView) -> str:
    if view.source == "slack":
        where = f" in <#{view.slack_channel}>" if view.slack_channel and re.fullmatch(r"[CDG][A-Z0-9]{2,20}",
                                                                                     view.slack_channel) else ""
        return f"Slack user {inline(view.sender)}{where}"
    name = f"{inline(view.sender_name)} " if view.sender_name else ""
    return f"{name}{inline(view.sender)}"


def _identifiers(ids: Mapping[str, Sequence[str]], shown: int = 5) -> str:
    parts = []
    for kind in ("iccid", "imsi", "msisdn", "imei"):
        values = list(ids.get(kind) or [])
        if values:
            more = f" +{len(values) - shown}" if len(values) > shown else ""
            parts.append(f"{kind.upper()} " + ", ".join(inline(v, 40) for v in values[:shown]) + more)
    return "; ".join(parts) or "—"


def _select(action_id: str, name: str, current: str | None) -> dict:
    options = [{"text": plain(v), "value": v} for v in LABEL_VALUES[name]]
    element = {"type": "static_select", "action_id": action_id, "placeholder": plain(f"Change {name}"),
               "options": options}
    if current in LABEL_VALUES[name]:
        element["initial_option"] = {"text": plain(current), "value": current}
    return element


def _button(action_id: str, text: str, case_id: int, style: str | None = None) -> dict:
    b = {"type": "button", "action_id": action_id, "text": plain(text), "value": str(case_id)}
    if style:
        b["style"] = style
    return b


def suggestion_blocks(view: CaseView, now: datetime | None = None) -> list[dict]:
    """The suggestion message for one case: what the bot decided, the customer's text, and the controls."""
    mark = SEVERITY_MARK.get(view.severity or "", ":grey_question:")
    head = f"{view.reference} · {view.category or 'unclassified'} / {view.service or '—'} · {view.severity or '—'}"
    if view.status != "open":
        head += f" · {view.status}"
    blocks: list[dict] = [{"type": "header", "text": plain(head)}]
    customer = inline(view.customer) + (f" (tier {inline(view.customer_tier)})" if view.customer_tier else "")
    blast = view.blast_tier + (f" / {view.blast_estimate} SIMs" if view.blast_estimate is not None else "")
    fields = [
        f"*Who*\n{_who(view)}",
        f"*Customer*\n{customer}",
        f"*Language*\n{escape(view.language or '—')}" + (f" ({view.confidence['language']:.0%})"
                                                         if isinstance(view.confidence.get("language"), (int, float))
                                                         else ""),
        f"*Category*\n{_label(view, 'category')}",
        f"*Service*\n{_label(view, 'service')}",
        f"*Severity*\n{mark} {_label(view, 'severity')}",
        f"*Blast radius*\n{escape(blast)}",
        f"*SLA*\n{sla_left(view.sla_due, now)}",
    ]
    blocks.append({"type": "section", "fields": [mrkdwn(f[:MAX_FIELD]) for f in fields]})
    blocks.append({"type": "section", "text": mrkdwn(f"*Identifiers* {_identifiers(view.identifiers)}")})
    if view.subject:
        blocks.append({"type": "section", "text": mrkdwn(f"*Subject* {inline(view.subject, 300)}")})
    note = " _(deleted by the customer)_" if view.deleted else " _(edited by the customer)_" if view.edited else ""
    blocks.append({"type": "section", "text": mrkdwn(f"*Message*{note}\n" + code_block(view.text))})
    related = []
    if view.parent:
        related.append(f":rotating_light: Part of outage {escape(view.parent)}"
                       + (f" ({escape(view.parent_customers)})" if view.parent_customers else ""))
    for sim in view.similar[:5]:
        related.append(f"• {escape(sim.reference)} {inline(sim.customer, 60)} {inline(sim.subject, 80)}")
    if related:
        blocks.append({"type": "section", "text": mrkdwn("*Similar open cases*\n" + "\n".join(related))})
    if view.reply:
        title = f"*Suggested reply* ({escape(view.reply_name or 'acknowledgement')}, {escape(view.language or 'en')})"
        quoted = "\n".join("> " + line if line.strip() else ">" for line in escape(view.reply).splitlines())
        blocks.append({"type": "section", "text": mrkdwn(f"{title}\n{quoted}"[:MAX_SECTION])})
    if view.merged_into:
        blocks.append({"type": "context", "elements": [mrkdwn(f"Merged into {escape(view.merged_into)}")]})
    else:
        buttons = [_button(ACCEPT, "Accept", view.case_id, "primary")]
        if view.reply and not view.reply_sent and not view.deleted:
            buttons.append(_button(SEND_REPLY, "Send suggested reply", view.case_id))
        buttons.append(_button(ESCALATE, "Escalate", view.case_id, "danger"))
        buttons.append(_button(MERGE, "Merge into…", view.case_id))
        blocks.append({"type": "actions", "block_id": f"tb_buttons:{view.case_id}", "elements": buttons})
        blocks.append({"type": "actions", "block_id": f"tb_labels:{view.case_id}", "elements": [
            _select(SET_CATEGORY, "category", view.category),
            _select(SET_SERVICE, "service", view.service),
            _select(SET_SEVERITY, "severity", view.severity)]})
    if view.history:
        blocks.append({"type": "context", "elements": [mrkdwn(" · ".join(view.history[-5:]))]})
    return blocks


def fallback_text(view: CaseView) -> str:
    """The notification text of a suggestion: labels only, never the customer's words."""
    return escape(f"{view.reference}: {view.category or 'unclassified'}/{view.service or '—'}, "
                  f"severity {view.severity or '—'}, blast {view.blast_tier}")


def update_blocks(view: CaseView, changes: Mapping[str, Sequence], text: str,
                  now: datetime | None = None) -> list[dict]:
    """A threaded note for a significant update of a case: what changed and the customer's new text."""
    lines = []
    for name, (old, new) in changes.items():
        if name == "blast":
            old_s = f"{old[1]}/{old[0]}" if isinstance(old, (list, tuple)) else str(old)
            new_s = f"{new[1]}/{new[0]}" if isinstance(new, (list, tuple)) else str(new)
            lines.append(f"blast radius {escape(old_s)} → *{escape(new_s)}*")
        else:
            lines.append(f"{escape(name)} {escape(str(old))} → *{escape(str(new))}*")
    head = f":arrow_up: *Update on {escape(view.reference)}*: " + ("; ".join(lines) or "new message")
    return [{"type": "section", "text": mrkdwn(head)},
            {"type": "section", "text": mrkdwn("*New message*\n" + code_block(text))},
            {"type": "context", "elements": [mrkdwn(f"SLA {sla_left(view.sla_due, now)}")]}]


def case_summary_blocks(view: CaseView, now: datetime | None = None) -> list[dict]:
    """/case: the suggestion without controls, for one agent's eyes."""
    return [b for b in suggestion_blocks(view, now) if b["type"] != "actions"]


def merge_modal(case_id: int, reference: str, channel: str | None, ts: str | None) -> dict:
    """The modal that asks which case to merge into."""
    import json
    return {
        "type": "modal", "callback_id": MERGE_MODAL,
        "private_metadata": json.dumps({"case_id": case_id, "channel": channel, "ts": ts}),
        "title": plain("Merge case"), "submit": plain("Merge"), "close": plain("Cancel"),
        "blocks": [
            {"type": "section", "text": mrkdwn(f"Merge {escape(reference)} into which case?")},
            {"type": "input", "block_id": MERGE_INPUT_BLOCK, "label": plain("Case reference"),
             "element": {"type": "plain_text_input", "action_id": MERGE_INPUT_ACTION,
                         "placeholder": plain("CASE-000123")}},
        ],
    }


def triage_blocks(record: Mapping, trail: Sequence[str]) -> list[dict]:
    """/triage: what the bot would decide for a text, and why (the trail)."""
    conf = record.get("confidence") or {}

    def lab(name: str) -> str:
        v = record.get(name)
        c = conf.get(name)
        return f"*{escape(str(v))}*" + (f" ({c:.0%})" if isinstance(c, (int, float)) and v is not None else "")

    br = record.get("blast_radius") or {}
    fields = [f"*Disposition*\n{escape(str(record.get('disposition')))}", f"*Language*\n{lab('language')}",
              f"*Category*\n{lab('category')}", f"*Service*\n{lab('service')}",
              f"*Severity*\n{lab('severity')}",
              f"*Blast radius*\n{escape(str(br.get('tier')))} / {escape(str(br.get('estimate')))}"]
    return [{"type": "section", "fields": [mrkdwn(f) for f in fields]},
            {"type": "section", "text": mrkdwn("*Why*\n" + code_block("\n".join(trail), limit=2800))}]
