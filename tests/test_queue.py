"""The intake queue on SQLite and PostgreSQL: durable enqueue, exclusive claims, leases, backoff, parking."""
from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import update

from triagebot.db import queue
from triagebot.db.engine import make_engine, migrate
from triagebot.db.tables import Intake, utcnow
from sqlalchemy.orm import sessionmaker


def _sessions(url):
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def test_enqueue_then_claim_returns_the_raw_bytes(db_url):
    s = _sessions(db_url)
    i = queue.enqueue(s, "email", b"Subject: x\r\n\r\nhello\xff")
    got = queue.claim(s, "w1", limit=5)
    assert [(c.id, c.raw, c.attempts) for c in got] == [(i, b"Subject: x\r\n\r\nhello\xff", 1)]
    assert queue.claim(s, "w2", limit=5) == []          # claimed rows are not handed out again


def test_delivery_key_makes_a_redelivery_a_no_op(db_url):
    s = _sessions(db_url)
    assert queue.enqueue(s, "slack", b"{}", delivery_key="slack:Ev1") is not None
    assert queue.enqueue(s, "slack", b"{}", delivery_key="slack:Ev1") is None
    assert queue.counts(s) == {"queued": 1}


def test_a_dead_workers_claim_is_taken_again_after_its_lease(db_url):
    s = _sessions(db_url)
    i = queue.enqueue(s, "email", b"x")
    assert [c.id for c in queue.claim(s, "dies", lease_seconds=300)] == [i]
    assert queue.claim(s, "other", lease_seconds=300) == []
    with s() as ss, ss.begin():
        ss.execute(update(Intake).values(claimed_at=utcnow() - timedelta(seconds=301)))
    again = queue.claim(s, "other", lease_seconds=300)
    assert [(c.id, c.attempts) for c in again] == [(i, 2)]


def test_failures_back_off_then_park_and_requeue_brings_them_back(db_url):
    s = _sessions(db_url)
    i = queue.enqueue(s, "email", b"x")
    for attempt in range(1, 3):
        [c] = queue.claim(s, "w")
        assert c.attempts == attempt
        assert queue.mark_failed(s, i, "boom", max_attempts=3, base_delay=0) == "queued"
    [c] = queue.claim(s, "w")
    assert queue.mark_failed(s, i, "boom", max_attempts=3) == "failed"
    assert queue.claim(s, "w") == []
    assert queue.counts(s) == {"failed": 1}
    assert queue.requeue(s) == 1
    assert [c.attempts for c in queue.claim(s, "w")] == [1]


def test_backoff_delays_the_next_attempt(db_url):
    s = _sessions(db_url)
    i = queue.enqueue(s, "email", b"x")
    queue.claim(s, "w")
    queue.mark_failed(s, i, "boom", max_attempts=5, base_delay=60)
    assert queue.claim(s, "w") == []   # not before a minute from now


def test_concurrent_claims_never_share_a_row(db_url):
    s = _sessions(db_url)
    ids = {queue.enqueue(s, "email", f"m{n}".encode()) for n in range(60)}
    seen: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        own = _sessions(db_url)
        while True:
            got = queue.claim(own, name, limit=3)
            if not got:
                return
            with lock:
                seen.extend(c.id for c in got)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(ids)      # every row once, none twice
