"""Block Kit building and escaping, suggested replies and routing rules (no servers)."""
from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from triagebot.agents import blocks as bk
from triagebot.agents.replies import REPLY_LANGUAGES, load_replies, suggest_reply
from triagebot.agents.suggest import load_routing, route_channel
from triagebot.model import CATEGORIES, SERVICES, SEVERITIES
from triagebot.rules_loader import RuleError
from triagebot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 11, 24, 9, 0, tzinfo=timezone.utc)
SLACK_CONTROL = re.compile(r"<[^>]*>")      # anything Slack would parse: <!channel>, <@U1>, <#C1>, <url|text>


def view(**kw) -> bk.CaseView:
    base = dict(case_id=7, reference="CASE-000007", customer="acme.example", customer_tier="vip",
                sender="noc@acme.example", sender_name="NOC", subject="No data", text="No data on 40 SIMs",
                language="en", category="incident", service="data", severity="high",
                confidence={"category": 0.87, "service": 0.91, "severity": 0.74, "language": 0.99},
                blast_estimate=40, blast_tier="many", identifiers={"iccid": ["8946071234567890147"]},
                sla_due=NOW + timedelta(hours=3, minutes=20), reply="Hello,\n\nThanks. CASE-000007", reply_name=None)
    base.update(kw)
    return bk.CaseView(**base)


def strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def mrkdwn_objects(obj: object) -> list[dict]:
    if isinstance(obj, dict):
        return ([obj] if obj.get("type") == "mrkdwn" else []) + [o for v in obj.values() for o in mrkdwn_objects(v)]
    if isinstance(obj, list):
        return [o for v in obj for o in mrkdwn_objects(v)]
    return []


@pytest.mark.parametrize("raw", ["<!channel>", "<!here|here>", "<!everyone>", "<@U0CEO>", "<#C0GEN|general>",
                                 "<https://evil.example|click>", "<!subteam^S1|@ops>", "<mailto:a@b|mail>",
                                 "a & b < c > d"])
def test_escape_leaves_nothing_slack_would_parse(raw):
    out = bk.escape(raw)
    assert not SLACK_CONTROL.search(out) and "<" not in out and ">" not in out
    assert out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace(bk.WORD_JOINER, "") == raw


@pytest.mark.parametrize("word", ["@channel", "@here", "@everyone", "@Channel", "@HERE!"])
def test_broadcast_words_are_broken(word):
    out = bk.escape(f"hi {word} now")
    assert word.lower().rstrip("!") not in out.lower()
    assert out.replace(bk.WORD_JOINER, "") == f"hi {word} now"
    assert bk.escape("mail me at ops@hereford.example") == "mail me at ops@hereford.example"


def test_a_code_block_cannot_be_closed_by_the_customer():
    out = bk.code_block("before ``` *bold* <https://evil|x> ```` after")
    assert out.startswith("```") and out.endswith("```") and out.count("```") == 2
    assert "<https" not in out and "&lt;https://evil|x&gt;" in out


def test_long_text_is_cut_to_slacks_limits():
    out = bk.code_block("x" * 10_000)
    assert len(out) < bk.MAX_SECTION and "more characters" in out
    assert bk.inline("a\n b " * 200).count("\n") == 0 and len(bk.inline("a" * 500)) < 220


def test_inline_values_cannot_escape_their_code_span():
    out = bk.inline("Eve` *bold* `<!here>")
    assert out.count("`") == 2 and "<!here>" not in out


def test_suggestion_blocks_show_the_decision_and_offer_every_control():
    blocks = bk.suggestion_blocks(view(), NOW)
    text = "\n".join(strings(blocks))
    for shown in ("CASE-000007", "incident", "87%", "data", "91%", "high", "74%", "many / 40 SIMs",
                  "3 h 20 min left", "8946071234567890147", "Suggested reply", "No data on 40 SIMs"):
        assert shown in text, shown
    controls = {el["action_id"]: el for b in blocks if b["type"] == "actions" for el in b["elements"]}
    assert set(controls) == {bk.ACCEPT, bk.SEND_REPLY, bk.ESCALATE, bk.MERGE, bk.SET_CATEGORY, bk.SET_SERVICE,
                             bk.SET_SEVERITY}
    assert controls[bk.ACCEPT]["value"] == "7"
    assert [o["value"] for o in controls[bk.SET_CATEGORY]["options"]] == list(CATEGORIES)
    assert [o["value"] for o in controls[bk.SET_SERVICE]["options"]] == list(SERVICES)
    assert [o["value"] for o in controls[bk.SET_SEVERITY]["options"]] == list(SEVERITIES)
    assert controls[bk.SET_SEVERITY]["initial_option"]["value"] == "high"
    assert all(o["verbatim"] for o in mrkdwn_objects(blocks))
    assert len(blocks) <= 50 and len(json.dumps(blocks)) < 40_000


def test_hostile_fields_are_shown_escaped_everywhere():
    evil = "<!channel> *x* <https://evil.example|pay here> @here"
    blocks = bk.suggestion_blocks(view(subject=evil, text=evil, sender_name=evil, sender=evil, customer=evil,
                                       customer_tier=evil), NOW)
    for s in strings(blocks) + [bk.fallback_text(view(subject=evil))]:
        assert "<!channel>" not in s and "<https://evil" not in s and "@here" not in s
    for obj in mrkdwn_objects(blocks):
        assert obj["text"].count("```") % 2 == 0 and obj["verbatim"] is True


def test_fallback_text_never_carries_the_customers_words():
    text = bk.fallback_text(view(text="secret customer words", subject="secret subject"))
    assert "secret" not in text and "CASE-000007" in text


def test_agent_corrections_merges_and_sent_replies_change_the_message():
    corrected = bk.suggestion_blocks(view(set_by_agent={"service": "U0AGENT"}, history=("accepted by <@U0AGENT>",)))
    text = "\n".join(strings(corrected))
    assert "set by <@U0AGENT>" in text and "91%" not in text
    merged = bk.suggestion_blocks(view(merged_into="CASE-000001"))
    assert not [b for b in merged if b["type"] == "actions"]
    assert "Merged into CASE-000001" in "\n".join(strings(merged))
    sent = bk.suggestion_blocks(view(reply_sent=True))
    assert bk.SEND_REPLY not in json.dumps(sent)
    assert bk.agent("U0AGENT") == "<@U0AGENT>" and "<" not in bk.agent("<!channel>")


@pytest.mark.parametrize("delta,expected", [(timedelta(hours=3, minutes=20), "3 h 20 min left"),
                                            (timedelta(days=2, hours=4), "2 d 4 h left"),
                                            (timedelta(minutes=-45), "overdue by 45 min"),
                                            (None, "—")])
def test_sla_left(delta, expected):
    assert bk.sla_left(NOW + delta if delta is not None else None, NOW) == expected


def test_the_merge_modal_and_triage_blocks():
    modal = bk.merge_modal(7, "CASE-000007", "C0AGENTS", "1.2")
    assert modal["callback_id"] == bk.MERGE_MODAL and json.loads(modal["private_metadata"])["case_id"] == 7
    assert modal["blocks"][1]["block_id"] == bk.MERGE_INPUT_BLOCK
    tb = bk.triage_blocks({"disposition": "case", "language": "sv", "category": "incident", "service": "sms",
                           "severity": "medium", "confidence": {"category": 0.5},
                           "blast_radius": {"tier": "few", "estimate": 3}}, ["classify: <!channel>"])
    assert "<!channel>" not in json.dumps(tb) and "incident" in json.dumps(tb)


# -- replies --------------------------------------------------------------------------------------------------

def test_every_answer_has_every_language_and_the_kb_topics_are_there():
    replies = load_replies()
    assert set(replies.acknowledgement) == set(REPLY_LANGUAGES)
    names = {a.name for a in replies.answers}
    assert {"apn_settings", "sim_activation", "roaming", "billing_question", "portal_login",
            "sms_troubleshooting"} <= names
    for a in replies.answers:
        assert set(a.texts) == set(REPLY_LANGUAGES)


@pytest.mark.parametrize("lang,category,service,text,answer", [
    ("en", "information_request", "data", "Which APN should our routers use?", "apn_settings"),
    ("sv", "service_request", "sim", "Kan ni aktivera 50 SIM-kort i testläge?", "sim_activation"),
    ("es", "information_request", "billing", "¿Qué es este cargo en la factura?", "billing_question"),
    ("en", "incident", "data", "Our trackers in Germany lost data while roaming", "roaming"),
    ("sv", "incident", "platform", "Jag kan inte logga in i portalen, lösenordet fungerar inte", "portal_login"),
    ("es", "incident", "sms", "Los SMS no llegan a los dispositivos", "sms_troubleshooting"),
    ("en", "order", "sim", "We want to buy 500 new SIM cards", None),
])
def test_the_reply_fits_the_case_and_speaks_its_language(lang, category, service, text, answer):
    sug = suggest_reply(lang, category, service, None, text, "CASE-000042")
    assert sug.answer == answer and sug.language == lang and "CASE-000042" in sug.text
    greeting = {"en": "Hello", "sv": "Hej", "es": "Hola"}[lang]
    assert sug.text.startswith(greeting)


def test_other_languages_get_english():
    assert suggest_reply("other", "incident", "data", None, "Hallo, keine Daten", "CASE-1").language == "en"


def test_a_broken_replies_file_names_file_and_line(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    path = rules / "replies.yaml"
    text = path.read_text()
    path.write_text(text.replace("  - name: roaming\n", "  - name: roaming\n    colour: blue\n"))
    with pytest.raises(RuleError) as e:
        load_replies(rules)
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "name: roaming" in l)
    assert e.value.path == str(path) and e.value.line == line and "colour" in str(e.value)
    path.write_text(text.replace("{reference} and are looking", "{customer} and are looking"))
    with pytest.raises(RuleError, match="unknown placeholder"):
        load_replies(rules)


# -- routing --------------------------------------------------------------------------------------------------

def test_routes_by_tier_then_service_else_the_default_channel(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "routing.yaml").write_text(
        "routes:\n  - customer_tier: [vip, enterprise]\n    channel: C0VIP\n"
        "  - service: [billing]\n    channel: C0BILLING\ninternal_channels: [C0BOTTALK]\n")
    settings = Settings(rules_dir=rules, agent_channel="C0AGENTS")

    def case(**kw):
        return SimpleNamespace(**{"customer_tier": None, "service": "data", "category": "incident",
                                  "severity": "high", **kw})

    assert route_channel(settings, case(customer_tier="vip", service="billing")) == "C0VIP"
    assert route_channel(settings, case(service="billing")) == "C0BILLING"
    assert route_channel(settings, case()) == "C0AGENTS"
    routing = load_routing(rules)
    assert routing.agent_channels(settings) == {"C0VIP", "C0BILLING", "C0AGENTS"}
    assert routing.internal_channels == {"C0BOTTALK"} and routing.ignore_own_team_members


def test_a_broken_route_names_file_and_line(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "routing.yaml").write_text("routes:\n  - service: [data]\n    channel: C0DATA\n"
                                        "  - service: [wifi]\n    channel: C0WIFI\n")
    with pytest.raises(RuleError) as e:
        load_routing(rules)
    assert e.value.line == 4 and "wifi" in str(e.value)


def test_the_shipped_routing_file_loads():
    assert load_routing(ROOT / "rules").routes == ()


# -- the manifest -----------------------------------------------------------------------------------------------

def test_the_manifest_asks_for_what_the_app_handles():
    import yaml
    from triagebot.agents.slack_app import PATHS
    m = yaml.safe_load((ROOT / "slack-app-manifest.yaml").read_text())
    settings = m["settings"]
    assert set(settings["event_subscriptions"]["bot_events"]) == {"message.channels", "message.groups",
                                                                   "message.im", "message.mpim"}
    urls = [settings["event_subscriptions"]["request_url"], settings["interactivity"]["request_url"],
            *(c["url"] for c in m["features"]["slash_commands"])]
    assert all(url.startswith("https://") and url.endswith(PATHS) for url in urls)
    assert settings["interactivity"]["is_enabled"] is True
    assert {c["command"] for c in m["features"]["slash_commands"]} == {"/triage", "/case"}
    scopes = set(m["oauth_config"]["scopes"]["bot"])
    assert {"channels:history", "groups:history", "im:history", "mpim:history", "chat:write", "commands",
            "users:read"} == scopes
