"""bench/load_bench.py on a small load: 150 messages through 2 real worker processes on PostgreSQL.

Only what must hold on any machine: every delivery ends exactly once, and the table has its rows.
Speed belongs to the benchmark itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("TRIAGEBOT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _bench():
    spec = importlib.util.spec_from_file_location("load_bench", ROOT / "bench" / "load_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["load_bench"] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lb():
    return _bench()


def test_traffic_is_seeded_and_mixed(lb):
    a, b = lb.generate(300, seed=3), lb.generate(300, seed=3)
    assert [x.raw for x in a] == [x.raw for x in b]
    kinds = Counter(x.kind for x in a)
    for kind in ("new", "reply", "burst", "autoreply", "bounce", "duplicate", "redelivery"):
        assert kinds[kind] > 0, kind
    assert {x.lang for x in a} == {"en", "sv", "es"}
    assert {x.channel for x in a} == {"email", "slack"}
    for x in a:
        if x.kind == "reply":
            assert x.root is not None and x.root <= x.idx - 100
            assert a[x.root].channel == x.channel
        if x.kind in ("duplicate", "redelivery"):
            assert a[x.dup_of].raw == x.raw
    # a sender never sends the same text twice unless it is a repeated delivery
    keys = [(x.sender, x.text_key) for x in a if x.expect == "case"]
    assert len(keys) == len(set(keys))


def test_two_workers_end_every_message_exactly_once(lb, pg_reason):
    if pg_reason:
        pytest.skip(pg_reason)
    out = lb.run_benchmark(messages=150, workers=[2], base_url=PG_URL, modes=("batch", "paced"), rate=40.0,
                           paced_messages=150, reply_min_gap=20, timeout=300, quiet=True)
    results = out["results"]
    redeliveries = sum(1 for x in lb.generate(150, reply_min_gap=20) if x.kind == "redelivery")
    assert [(r["mode"], r["workers"]) for r in results] == [("batch", 2), ("paced", 2)]
    for r in results:
        assert r["exactly_once"], r["problems"]
        assert r["failed"] == 0
        c = r["check"]
        assert set(c["intake_states"]) == {"done"}
        assert c["replies"].get("in_root_case", 0) > 0 and not c["replies"].get("elsewhere")
        assert c["outcomes"].get("duplicate", 0) > 0 and c["outcomes"].get("ignored", 0) > 0
        assert r["refused"] == redeliveries > 0        # every Slack redelivery stopped at intake
        assert r["cases"] > 0 and r["rows"] > 0
    lines = out["table"].splitlines()
    assert lines[0].split("|")[1].strip() == "mode" and "exactly-once OK" in lines[0]
    body = [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [(row[0], row[1], row[-1]) for row in body] == [("batch", "2", "yes"), ("paced 40/s", "2", "yes")]
    # the throwaway schemas are gone
    with lb._admin(lb.sa_url(PG_URL)) as conn:
        left = {r["schema"] for r in results} & {n for (n,) in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'lb\\_%'")}
    assert not left


def test_the_check_sees_a_lost_message_a_misthreaded_reply_and_a_failed_row(lb, pg_reason):
    if pg_reason:
        pytest.skip(pg_reason)
    from sqlalchemy import text

    from triagebot.settings import Settings
    from triagebot.worker import Worker
    items = lb.generate(150, reply_min_gap=20)
    schema = lb.Schema(PG_URL)
    engine = None
    try:
        engine, sessions = lb.open_schema(schema)
        settings = Settings(database_url=schema.url())
        enq = lb.enqueue(items, engine, sessions, settings)
        Worker(settings).run(until_empty=True)
        assert lb.check(engine, items, enq).ok
        reply = next(x for x in items if x.kind == "reply" and x.channel == "email")
        new = next(x for x in items if x.kind == "new" and x.idx not in {y.root for y in items if y.root is not None}
                   and x.channel == "email")
        ignored = next(x for x in items if x.kind == "autoreply")
        with engine.begin() as c:
            other = c.execute(text("SELECT max(id) FROM cases WHERE kind = 'case'")).scalar()
            c.execute(text("UPDATE messages SET case_id = :c WHERE intake_id = :i"),
                      {"c": other, "i": enq.ids[reply.idx]})
            c.execute(text("DELETE FROM messages WHERE intake_id = :i"), {"i": enq.ids[new.idx]})
            c.execute(text("UPDATE intake SET state = 'failed' WHERE id = :i"), {"i": enq.ids[ignored.idx]})
        got = lb.check(engine, items, enq)
        assert not got.ok
        text_ = " | ".join(got.problems)
        assert "1 intake rows failed" in text_
        assert "1 thread replies in another case" in text_
        assert "1 rows finished without a message row while no stored message is their original" in text_
        assert "1 cases without messages" in text_
    finally:
        if engine is not None:
            engine.dispose()
        schema.drop()
