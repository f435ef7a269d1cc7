"""Atheris (libFuzzer) target for the Slack side: JSON bytes -> normalize._load_json -> parse_slack -> DispositionStep.

    .venv/bin/python fuzz/fuzz_slack.py -max_total_time=60        # corpus: fuzz/corpus-slack, seeded on first run

Every input must end as a Slack Message fit to store or as an InputError (the same rule as load_input).
Seeds: samples/*.json and a few crafted events (edits, rich-text blocks, files, mrkdwn of every kind).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_CORPUS = Path(__file__).resolve().parent / "corpus-slack"
DEFAULT_ARGS = ["-timeout=20", "-rss_limit_mb=1536", "-max_len=16384"]

with atheris.instrument_imports(include=["triagebot", "json"]):
    from triagebot.errors import InputError
    from triagebot.model import Message, Triage
    from triagebot.normalize import _load_json
    from triagebot.normalize.slack import parse_slack
    from triagebot.steps.disposition import DispositionStep

STEP = DispositionStep()
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


_SUBTYPES = [None, "message_changed", "bot_message", "file_share", "thread_broadcast", "channel_join"]


def _event_from(data: bytes) -> dict:
    """Bytes that are not JSON become an event whose text, blocks and fields come from the bytes (mrkdwn coverage)."""
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 4096))
    event: dict = {"type": fdp.PickValueInList(["message", "app_mention"]), "channel": "C1",
                   "ts": str(fdp.ConsumeFloat()), "user": fdp.ConsumeUnicode(8), "text": text}
    subtype = fdp.PickValueInList(_SUBTYPES)
    if subtype:
        event["subtype"] = subtype
    if subtype == "message_changed":
        event["message"] = {"text": fdp.ConsumeUnicode(256), "ts": "1.0", "user": "U1"}
    if fdp.ConsumeBool():
        event["blocks"] = [{"type": "rich_text", "elements": [{"type": "rich_text_section", "elements": [
            {"type": fdp.PickValueInList(["text", "link", "user", "emoji", "channel", "broadcast"]),
             "text": fdp.ConsumeUnicode(64), "url": fdp.ConsumeUnicode(16)}]}]}]
        if fdp.ConsumeBool():
            event["text"] = ""
    return event


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    """One input: the bytes of a Slack event as a file or the Events API would hand them over."""
    try:
        m = _load_json(data)
    except InputError as e:
        assert "\n" not in str(e)
        if not str(e).startswith("not valid JSON"):
            return
        try:
            m = parse_slack(_event_from(data))
        except InputError as e2:
            assert "\n" not in str(e2)
            return
    assert isinstance(m, Message) and m.source == "slack" and m.channel and m.ts
    for t in (m.text, m.sender, m.sender_name, m.channel, m.ts, m.thread_ts, m.team_id, m.user_locale, m.message_id,
              *(x for a in m.attachments for x in (a.filename, a.content_type))):
        assert t is None or not _UNSTORABLE.search(t), f"unstorable character in {t[:80]!r}"
    assert STEP(m, Triage()).disposition == "case"


def _seeds() -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted((ROOT / "samples").glob("*.json"))}
    crafted = {
        "edit": {"type": "event_callback", "team_id": "T1", "event": {
            "type": "message", "subtype": "message_changed", "channel": "C1", "ts": "1712345678.000200",
            "message": {"type": "message", "user": "U1", "text": "*SIMs* _down_ ~again~ <@U2|anna> <#C2|ops> "
                        "<!here> <https://x.se|link> `code` ```block``` &lt;&gt;&amp;", "ts": "1712345678.000100"}}},
        "blocks": {"type": "message", "channel": "C1", "ts": "1.5", "user": "U1", "blocks": [
            {"type": "rich_text", "elements": [{"type": "rich_text_section", "elements": [
                {"type": "text", "text": "ICCID 8946"}, {"type": "link", "url": "https://x.se"},
                {"type": "user", "user_id": "U2"}, {"type": "emoji", "name": "fire"}]}]}]},
        "files": {"type": "app_mention", "channel": "C1", "ts": "2", "bot_id": "B1", "text": "list",
                  "files": [{"name": "sims.csv", "mimetype": "text/csv", "size": 10}]},
    }
    out.update({f"crafted-{k}.json": json.dumps(v).encode() for k, v in crafted.items()})
    return out


def seed(corpus: Path) -> None:
    """Fill an empty or absent corpus folder with the seeds."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for name, data in _seeds().items():
            (corpus / name).write_bytes(data)


def main(argv: list[str]) -> None:
    args = list(argv)
    inputs = [a for a in args[1:] if not a.startswith("-")]
    if not inputs:   # no corpus folder or crash file given: use (and seed) the default corpus
        seed(DEFAULT_CORPUS)
        args.append(str(DEFAULT_CORPUS))
    for a in inputs:
        if not Path(a).is_file():
            seed(Path(a))
    for flag in DEFAULT_ARGS:
        if not any(a.startswith(flag.split("=")[0] + "=") for a in args):
            args.insert(1, flag)
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
