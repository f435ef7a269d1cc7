"""parse_slack: Events API envelopes and bare events; mentions, links and mrkdwn to plain text."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from triagebot.errors import InputError
from triagebot.normalize.slack import mrkdwn_to_text, parse_slack

EVENT = {
    "type": "message",
    "channel": "C024BE91L",
    "user": "U2147483697",
    "text": "Hej <@U0LAN0Z89|anna> och <@U0ABC>! Se <#C012AB3CD|drift> <!here>",
    "ts": "1683100800.000200",
    "thread_ts": "1683090000.000100",
    "team": "T_EVENT",
}
ENVELOPE = {"token": "x", "team_id": "T061EG9R6", "api_app_id": "A0", "type": "event_callback",
            "event": EVENT, "event_id": "Ev0", "event_time": 1683100800}


def test_envelope_fields() -> None:
    m = parse_slack(ENVELOPE)
    assert m.source == "slack" and m.subject is None
    assert m.channel == "C024BE91L" and m.team_id == "T061EG9R6"
    assert m.ts == "1683100800.000200" and m.thread_ts == "1683090000.000100"
    assert m.sender == "U2147483697"
    assert m.message_id == "slack:T061EG9R6:C024BE91L:1683100800.000200"
    assert m.date == datetime(2023, 5, 3, 8, 0, 0, 200, tzinfo=timezone.utc)
    assert m.text == "Hej @anna och @U0ABC! Se #drift @here"


def test_bare_event_uses_event_team_or_none() -> None:
    assert parse_slack(EVENT).message_id == "slack:T_EVENT:C024BE91L:1683100800.000200"
    bare = {k: v for k, v in EVENT.items() if k not in ("team", "thread_ts")}
    m = parse_slack(bare)
    assert m.message_id == "slack::C024BE91L:1683100800.000200"
    assert m.team_id is None and m.thread_ts is None


@pytest.mark.parametrize("mrkdwn,plain", [
    ("*fet* _kursiv_ ~struken~", "fet kursiv struken"),
    ("`code_with_underscores*` and snake_case_name", "code_with_underscores* and snake_case_name"),
    ("```APN: iot.example\n*not bold*```", "APN: iot.example\n*not bold*"),
    ("<https://portal.example.com/sims?id=1|portalen> och <https://x.se>", "portalen och https://x.se"),
    ("<mailto:drift@kund.se|drift@kund.se> <tel:+46701234567>", "drift@kund.se +46701234567"),
    ("<!channel> <!everyone> <!subteam^S123|@ops>", "@channel @everyone @ops"),
    ("<!date^1392734382^{date_num}|2014-02-18>", "2014-02-18"),
    ("a &lt; b &amp;&amp; c &gt; d", "a < b && c > d"),
    ("2*3*4 and 5_000_000", "2*3*4 and 5_000_000"),
])
def test_mrkdwn_to_text(mrkdwn: str, plain: str) -> None:
    assert mrkdwn_to_text(mrkdwn) == plain


def test_thread_reply_keeps_thread_ts() -> None:
    reply = dict(EVENT, ts="1683100900.000300", text="fortfarande nere")
    m = parse_slack({"type": "event_callback", "team_id": "T1", "event": reply})
    assert m.thread_ts == "1683090000.000100" and m.ts == "1683100900.000300"


def test_bot_message_is_flagged() -> None:
    m = parse_slack(dict(EVENT, subtype="bot_message", bot_id="B1", user=None))
    assert "bot_message" in m.flags and m.sender == "B1"


def test_edited_message_uses_new_text() -> None:
    event = {"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "2.0",
             "message": {"type": "message", "user": "U1", "text": "ny *text*", "ts": "1.0"}}
    m = parse_slack(event)
    assert m.text == "ny text" and m.ts == "1.0" and m.channel == "C1" and "edited" in m.flags


def test_rich_text_blocks_when_text_is_missing() -> None:
    event = {"type": "message", "channel": "C1", "ts": "1.0", "user": "U1", "blocks": [
        {"type": "rich_text", "elements": [{"type": "rich_text_section", "elements": [
            {"type": "text", "text": "hej "}, {"type": "user", "user_id": "U9"},
            {"type": "link", "url": "https://x.se", "text": "länk"}]}]}]}
    assert parse_slack(event).text == "hej @U9länk"


def test_files_become_attachments() -> None:
    event = dict(EVENT, files=[{"name": "sims.csv", "mimetype": "text/csv", "size": 120}])
    (att,) = parse_slack(event).attachments
    assert (att.filename, att.content_type, att.size, att.text) == ("sims.csv", "text/csv", 120, None)


@pytest.mark.parametrize("payload", [
    {"type": "event_callback", "event": {"type": "reaction_added", "user": "U1"}},
    {"type": "event_callback", "team_id": "T1"},
    {"type": "url_verification", "challenge": "abc"},
    {"type": "message", "subtype": "message_deleted", "channel": "C1", "ts": "1.0"},
    {"type": "message", "subtype": "channel_join", "channel": "C1", "ts": "1.0", "user": "U1"},
    {"type": "message", "text": "no channel"},
    {},
])
def test_not_a_message_event(payload: dict) -> None:
    with pytest.raises(InputError, match="not a Slack message event"):
        parse_slack(payload)


def test_non_dict_payload() -> None:
    with pytest.raises(InputError):
        parse_slack(["not", "a", "dict"])  # type: ignore[arg-type]
