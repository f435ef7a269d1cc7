"""Many workers on one queue: per-thread serialization under real races, SIGKILL mid-batch, poison messages,
and the `worker --concurrency N` supervisor.

The race and kill tests start real worker processes (forked from the test, or `triagebot worker` subprocesses);
every test runs on a SQLite file and on the local PostgreSQL (the `db_url` fixture). No assertion is about time.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Case, CaseEvent, Intake, MessageRow, ThreadKey, utcnow

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = "support@support.example.net"


# -- messages ------------------------------------------------------------------------------------------

def email(mid: str | None, sender: str, subject: str, body: str, irt: str | None = None,
          refs: tuple[str, ...] = ()) -> bytes:
    lines = [f"From: {sender}", f"To: {SUPPORT}", f"Subject: {subject}"]
    if mid:
        lines.append(f"Message-ID: <{mid}>")
    if irt:
        lines.append(f"In-Reply-To: <{irt}>")
    if refs:
        lines.append("References: " + " ".join(f"<{r}>" for r in refs))
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def slack(channel: str, ts: str, user: str, text: str, thread_ts: str | None = None) -> bytes:
    event = {"type": "message", "channel": channel, "user": user, "text": text, "ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return json.dumps({"type": "event_callback", "team_id": "T0RACE", "event_id": f"Ev{channel}{ts}",
                       "event": event}).encode()


def stored_mid(mid: str) -> str:
    """A Message-ID as the messages table and the thread keys hold it."""
    return mid if mid.startswith("slack:") else f"<{mid}>"


def slack_mid(channel: str, ts: str) -> str:
    return f"slack:T0RACE:{channel}:{ts}"


def problem(n: int, tag: str) -> str:
    return (f"Hello, our tracker number {n} has stopped sending positions since this morning. "
            f"SIM 894607{n:013d}. Please check the connectivity. Reference {tag}.")


# -- checking a database after the workers are done ------------------------------------------------

def check_consistent(sessions, threads: dict[str, set[str]], *, partial: bool = False) -> dict:
    """Every intake row processed once, every thread in exactly one case, every case's trail complete.

    `threads` maps a thread name to the Message-IDs of its messages (those that should have a message row;
    mail Message-IDs without their angle brackets). With partial (workers killed half-way), only what must
    hold after any commit: what is stored is whole, nothing twice, no thread split. Returns facts.
    """
    threads = {name: {stored_mid(mid) for mid in mids} for name, mids in threads.items()}
    with sessions() as s:
        intake = {r.id: r for r in s.scalars(select(Intake))}
        rows = list(s.scalars(select(MessageRow)))
        cases = {c.id: c for c in s.scalars(select(Case))}
        events = list(s.scalars(select(CaseEvent)))
        keys = {k.key: k.case_id for k in s.scalars(select(ThreadKey))}
    per_intake = Counter(m.intake_id for m in rows)
    assert max(per_intake.values(), default=1) == 1, "an intake row produced two message rows"
    assert set(per_intake) <= set(intake)
    # a message row exists exactly when its intake row is done: processing is one transaction
    half = {i for i in per_intake if intake[i].state != "done"}
    assert half == set(), f"message rows for intake rows not done: {[(i, intake[i].state) for i in half]}"
    if not partial:
        not_done = {i: (r.state, r.last_error) for i, r in intake.items() if r.state != "done"}
        assert not_done == {}, f"intake rows not done: {not_done}"
        assert [(i, r.last_error) for i, r in intake.items() if r.last_error] == []   # no failed attempt either
    by_mid = defaultdict(list)
    for m in rows:
        by_mid[m.message_id].append(m)
    twice = {mid: len(v) for mid, v in by_mid.items() if mid and len(v) > 1}
    assert twice == {}, f"messages stored twice: {twice}"
    # each thread: all its messages stored, all in one case, and no other thread in that case
    thread_case = {}
    for name, mids in threads.items():
        missing = [mid for mid in mids if mid not in by_mid]
        if not partial:
            assert missing == [], f"thread {name}: messages without a message row: {missing}"
        present = [mid for mid in mids if mid in by_mid]
        if not present:
            continue
        in_cases = {by_mid[mid][0].case_id for mid in present}
        assert len(in_cases) == 1, f"thread {name} is split over {len(in_cases)} cases: " + str(
            {cases[c].reference: sorted(mid for mid in present if by_mid[mid][0].case_id == c) for c in in_cases})
        thread_case[name] = in_cases.pop()
    assert len(set(thread_case.values())) == len(thread_case), "two threads share a case"
    # cases: one created event, a threaded event for each threaded message and no other
    ev = defaultdict(Counter)
    threaded_ev = defaultdict(list)
    for e in events:
        ev[e.case_id][e.kind] += 1
        if e.kind == "threaded":
            threaded_ev[e.case_id].append(e.detail.get("message_id"))
    msgs = defaultdict(Counter)
    threaded_msgs = defaultdict(list)
    for m in rows:
        if m.case_id is not None:
            msgs[m.case_id][m.action] += 1
            if m.action == "threaded":
                threaded_msgs[m.case_id].append(m.message_id)
    for cid, c in cases.items():
        if c.kind == "incident":      # an outage parent (triagebot/outage.py) holds no messages of its own
            continue
        assert msgs[cid]["created"] == 1, f"{c.reference}: {dict(msgs[cid])}"
        assert ev[cid]["created"] == 1, f"{c.reference}: {dict(ev[cid])}"
        assert sorted(map(str, threaded_ev[cid])) == sorted(map(str, threaded_msgs[cid])), \
            f"{c.reference}: threaded events {threaded_ev[cid]} vs threaded messages {threaded_msgs[cid]}"
    for m in rows:
        assert (m.case_id is None) == (m.action == "ignored"), (m.id, m.action, m.case_id)
    assert set(keys.values()) <= set(cases)
    for name, mids in threads.items():
        for mid in mids:
            k = f"msgid:{mid.lower()}"
            if mid in by_mid:
                assert keys.get(k) == thread_case[name], \
                    f"thread key {k} -> case {keys.get(k)}, thread in case {thread_case[name]}"
    return {"intake": intake, "rows": rows, "cases": cases, "thread_case": thread_case, "keys": keys}


# -- 1. the race: replies to one thread at the same moment on several workers ---------------------------

WORKERS = 3


_WARM: list = []


def warm_pipeline():
    """One pipeline with its models loaded, built in the test process and inherited by forked workers."""
    if not _WARM:
        from triagebot.normalize import from_raw as normalize
        from triagebot.pipeline import Pipeline
        from triagebot.settings import Settings
        pipeline = Pipeline.default(Settings())
        pipeline.run(normalize("email", email("warm@x.example", "a@x.example", "warm up", problem(1, "warm"))))
        _WARM.append(pipeline)
    return _WARM[0]


def _race_child(url: str, name: str, barrier, inbox, outbox) -> None:
    """A worker process: claims the intake row it is told to, waits for the others, then processes it."""
    from sqlalchemy.orm import sessionmaker

    from triagebot.db.engine import make_engine
    from triagebot.ingest import Processor
    from triagebot.settings import Settings
    settings = Settings(database_url=url)
    # its own engine: the connections pooled in the parent stay untouched (forked, not spawned)
    sessions = sessionmaker(make_engine(url), expire_on_commit=False)
    processor = Processor(settings, sessions, pipeline=warm_pipeline(), after_commit=())
    outbox.put(("ready", name, None, None))
    while True:
        intake_id = inbox.get()
        if intake_id is None:
            return
        item = queue.claim_one(sessions, intake_id, name)
        try:
            barrier.wait(60)
        except Exception as e:  # noqa: BLE001 - a broken barrier: report it, the parent fails the test
            outbox.put((intake_id, None, None, f"barrier: {e!r}"))
            return
        try:
            out = processor.process(item)
        except Exception as e:  # noqa: BLE001 - what a worker does with an error: back off / park
            queue.mark_failed(sessions, intake_id, f"{type(e).__name__}: {e}", settings.max_attempts)
            outbox.put((intake_id, None, None, f"{type(e).__name__}: {e}"))
            continue
        outbox.put((intake_id, out.action, out.case, None))


class RacePool:
    """WORKERS processes; `step(raws)` processes raws[i] on worker i, all released by one barrier."""

    def __init__(self, url: str) -> None:
        self.url = url
        _e, self.sessions = open_db(url)
        warm_pipeline()
        ctx = multiprocessing.get_context("fork")   # the workers inherit the warm pipeline
        self.barrier = ctx.Barrier(WORKERS)
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(WORKERS)]
        self.procs = [ctx.Process(target=_race_child, daemon=True,
                                  args=(url, f"race{i}", self.barrier, self.inboxes[i], self.outbox))
                      for i in range(WORKERS)]
        for p in self.procs:
            p.start()
        for _ in range(WORKERS):
            self._get()

    def _get(self):
        import queue as stdqueue
        for _ in range(120):
            try:
                return self.outbox.get(timeout=1)
            except stdqueue.Empty:
                dead = [(p.name, p.exitcode) for p in self.procs if not p.is_alive()]
                if dead:
                    pytest.fail(f"race workers died: {dead}")
        pytest.fail("a race worker did not answer within 120 s")

    def step(self, raws: list[tuple[str, bytes]]) -> list[tuple]:
        assert len(raws) == WORKERS
        ids = [queue.enqueue(self.sessions, channel, raw, origin="race") for channel, raw in raws]
        for inbox, i in zip(self.inboxes, ids):
            inbox.put(i)
        got = {}
        for _ in ids:
            r = self._get()
            got[r[0]] = r
        errors = [r for r in got.values() if r[3]]
        assert errors == [], f"processing raised (a lost race must retry cleanly): {errors}"
        return [got[i] for i in ids]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


ROUNDS = 5


def test_concurrent_replies_to_one_thread_make_one_case(db_url):
    """Roots, replies, replies to replies, replies to a root nobody has seen, Slack threads, subject references
    and redeliveries — each step's messages processed at the same moment by WORKERS processes.

    On PostgreSQL the workers really overlap (with the per-thread advisory locks of threading.serialize switched
    off, this test fails: threads split over several cases, a duplicate stored as a second case). On SQLite every
    writing transaction is serialized, so there it shows the order does not matter: a reply processed before its
    root, or with no root at all, still lands in the thread's one case."""
    pool = RacePool(db_url)
    threads: dict[str, set[str]] = {}
    actions = Counter()
    try:
        for r in range(ROUNDS):
            dom = f"r{r}.fleet.example"
            a, b, c = f"ops@{dom}", f"noc@{dom}", f"lead@{dom}"
            # 1. a root and two replies at the same moment; the second reply answers the first
            root, rep1, rep2 = f"root{r}@{dom}", f"rep1-{r}@{dom}", f"rep2-{r}@{dom}"
            subj = f"Trackers silent in Norway round {r}"
            out = pool.step([
                ("email", email(root, a, subj, problem(r * 10 + 1, f"root {r}"))),
                ("email", email(rep1, b, f"Re: {subj}", problem(r * 10 + 2, f"rep1 {r}"), irt=root, refs=(root,))),
                ("email", email(rep2, c, f"Re: Re: {subj}", problem(r * 10 + 3, f"rep2 {r}"), irt=rep1,
                                refs=(root, rep1))),
            ])
            actions.update(o[1] for o in out)
            threads[f"mail{r}"] = {root, rep1, rep2}
            # 2. two replies to a message we never saw, and that message itself, at the same moment
            unseen = f"unseen{r}@{dom}"
            u1, u2 = f"u1-{r}@{dom}", f"u2-{r}@{dom}"
            s2 = f"Gateway reboots round {r}"
            third = (email(unseen, a, s2, problem(r * 10 + 4, f"unseen {r}")) if r % 2 == 0 else
                     email(f"u3-{r}@{dom}", c, f"Re: {s2}", problem(r * 10 + 7, f"u3 {r}"), irt=unseen, refs=(unseen,)))
            out = pool.step([
                ("email", email(u1, a, f"Re: {s2}", problem(r * 10 + 5, f"u1 {r}"), irt=unseen, refs=(unseen,))),
                ("email", email(u2, b, f"RE: {s2}", problem(r * 10 + 6, f"u2 {r}"), irt=unseen, refs=(unseen,))),
                ("email", third),
            ])
            actions.update(o[1] for o in out)
            threads[f"unseen{r}"] = {u1, u2, unseen if r % 2 == 0 else f"u3-{r}@{dom}"}
            # 3. Slack: replies in one thread (with or without its root) at the same moment
            ch, ts0 = f"CR{r}", f"17640000{r:02d}.000100"
            tss = [f"17640000{r:02d}.0002{i}0" for i in range(3)]
            msgs = [slack(ch, tss[0], "U0ONE", problem(r * 10 + 8, f"slack a {r}"), thread_ts=ts0),
                    slack(ch, tss[1], "U0TWO", problem(r * 10 + 9, f"slack b {r}"), thread_ts=ts0),
                    (slack(ch, ts0, "U0ONE", problem(r * 10 + 10, f"slack root {r}")) if r % 2 == 0 else
                     slack(ch, tss[2], "U0THREE", problem(r * 10 + 11, f"slack c {r}"), thread_ts=ts0))]
            out = pool.step([("slack", m) for m in msgs])
            actions.update(o[1] for o in out)
            threads[f"slack{r}"] = {slack_mid(ch, ts0 if r % 2 == 0 else tss[2]), slack_mid(ch, tss[0]),
                                    slack_mid(ch, tss[1])}
            # 4. subject references to the case of step 1 (no reply headers) and a redelivery of its root
            with pool.sessions() as s:
                ref = s.scalar(select(Case.reference).join(MessageRow, MessageRow.case_id == Case.id)
                               .where(MessageRow.message_id == stored_mid(root)))
            s1, s2_ = f"sref1-{r}@{dom}", f"sref2-{r}@{dom}"
            out = pool.step([
                ("email", email(s1, b, f"[{ref}] still down", problem(r * 10 + 12, f"sref1 {r}"))),
                ("email", email(s2_, c, f"SV: [{ref}] still down", problem(r * 10 + 13, f"sref2 {r}"))),
                ("email", email(root, a, subj, problem(r * 10 + 1, f"root {r}"))),   # the same mail again
            ])
            actions.update(o[1] for o in out)
            assert out[2][1] == "duplicate" and out[2][2] == ref
            threads[f"mail{r}"] |= {s1, s2_}
            # 5. the same content from the same sender, without a Message-ID, twice at the same moment
            same = email(None, a, f"No positions round {r}", problem(r * 10 + 14, f"nomid {r}"))
            other = email(f"other{r}@{dom}", b, f"Other issue {r}", problem(r * 10 + 15, f"o {r}"))
            out = pool.step([("email", same), ("email", same), ("email", other)])
            actions.update(o[1] for o in out)
            assert sorted(o[1] for o in out[:2]) == ["created", "duplicate"], out
            threads[f"other{r}"] = {f"other{r}@{dom}"}
    finally:
        pool.close()
    facts = check_consistent(pool.sessions, threads)
    # the messages without a Message-ID: one case each round, holding exactly one message
    nomid = [m for m in facts["rows"] if m.message_id is None]
    assert len(nomid) == ROUNDS and len({m.case_id for m in nomid}) == ROUNDS
    real_cases = [c for c in facts["cases"].values() if c.kind == "case"]
    assert len(real_cases) == len(threads) + ROUNDS
    assert actions["created"] == len(real_cases) and actions["duplicate"] == 2 * ROUNDS


# -- 2. SIGKILL workers in the middle of a batch, restart them --------------------------------------------

def corpus(seed: int, mail_threads: int, replies: int, slack_threads: int, autoreplies: int):
    """(channel, raw) in a shuffled order — replies often before their roots — and the threads they form."""
    rng = random.Random(seed)
    items: list[tuple[str, bytes]] = []
    threads: dict[str, set[str]] = {}
    for t in range(mail_threads):
        dom = f"k{t}.meters.example"
        chain: list[str] = []
        subj = f"Meters offline batch {t}"
        for n in range(replies + 1):
            mid = f"t{t}-{n}@{dom}"
            items.append(("email", email(mid, f"ops{n % 2}@{dom}", ("Re: " if n else "") + subj,
                                         problem(t * 100 + n, f"kill {t}/{n}"),
                                         irt=chain[-1] if chain else None, refs=tuple(chain))))
            chain.append(mid)
        threads[f"mail{t}"] = set(chain)
    for t in range(slack_threads):
        ch, root = f"CK{t}", f"1765000{t:03d}.000100"
        mids = set()
        for n in range(replies + 1):
            ts = root if n == 0 else f"1765000{t:03d}.00{n + 1:02d}00"
            items.append(("slack", slack(ch, ts, f"U0K{n % 2}", problem(t * 100 + 50 + n, f"slack kill {t}/{n}"),
                                         thread_ts=None if n == 0 else root)))
            mids.add(slack_mid(ch, ts))
        threads[f"slack{t}"] = mids
    for n in range(autoreplies):
        items.append(("email", (f"From: away{n}@ooo.example\r\nTo: {SUPPORT}\r\nSubject: Automatic reply: {n}\r\n"
                                f"Message-ID: <ooo{n}@ooo.example>\r\nAuto-Submitted: auto-replied\r\n\r\n"
                                f"I am out of office until Monday ({n}).\r\n").encode()))
    rng.shuffle(items)
    return items, threads


def children_of(pid: int) -> set[int]:
    """The live child processes of pid (from /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(cond, what: str, timeout: float = 120.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll cond() until it is true; fail (with the worker's log) if it never is or the worker exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the worker exited with {proc.returncode} while waiting for {what}\n"
                        + (log.read_text()[-3000:] if log else ""))
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what} after {timeout}s\n" + (log.read_text()[-3000:] if log else ""))


class WorkerProcess:
    """`triagebot worker --concurrency N` as a subprocess in its own process group."""

    def __init__(self, url: str, log: Path, lease: int = 3, concurrency: int = 2, **env) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGEBOT_", "SLACK_"))}
        self.env = {**base, "TRIAGEBOT_DATABASE_URL": url, "TRIAGEBOT_STALE_CLAIM_SECONDS": str(lease),
                    "TRIAGEBOT_WORKER_BATCH": "10", **env}
        self.log, self.concurrency = log, concurrency
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "triagebot.cli", "worker", "--concurrency",
                                          str(self.concurrency)], cwd=ROOT, env=self.env, stdout=fh, stderr=fh,
                                         start_new_session=True)
        return self.proc

    def children(self) -> set[int]:
        return children_of(self.proc.pid)

    def kill_all(self) -> None:
        """SIGKILL the supervisor and its workers at once, as a machine losing power would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def cleanup(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass


_READERS: dict[str, object] = {}


def state_counts(url: str) -> Counter:
    """Intake rows per state, read without taking SQLite's write lock (the project's engine begins every
    transaction with BEGIN IMMEDIATE, and a poller queueing behind busy workers would see the queue only
    rarely)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool
    engine = _READERS.get(url) or _READERS.setdefault(url, create_engine(url, poolclass=NullPool))
    with engine.connect() as c:
        return Counter(dict(c.execute(select(Intake.state, func.count()).group_by(Intake.state)).all()))


def test_sigkill_mid_batch_then_restart_processes_every_message_once(db_url, tmp_path):
    """Kill the whole `worker --concurrency 2` (supervisor and workers) in the middle of the queue, restart it:
    claims of the dead are taken again after their lease, nothing is half-written or stored twice. Then kill one
    worker alone: the supervisor starts another. At the end (one way per database, to save a start-up each):
    SIGTERM stops the supervisor and its workers; or the supervisor is SIGKILLed alone and its workers, orphaned,
    stop by themselves (Linux parent-death signal, else their parent check) instead of running on unsupervised."""
    _e, sessions = open_db(db_url)
    items, threads = corpus(seed=7, mail_threads=30, replies=3, slack_threads=6, autoreplies=6)
    ids = [queue.enqueue(sessions, channel, raw, origin="kill-test") for channel, raw in items]
    total = len(ids)
    # a worker on another machine claimed five rows and died: they come back after the lease
    dead = {c.id for c in queue.claim(sessions, "dead-host:1:0", limit=5, lease_seconds=3)}
    log = tmp_path / "worker.log"
    w = WorkerProcess(db_url, log)
    try:
        proc = w.start()
        wait_for(lambda: state_counts(db_url)["done"] >= total // 4, "a quarter of the queue done", proc=proc, log=log)
        w.kill_all()
        counts = state_counts(db_url)
        assert counts["done"] < total, "the queue was done before the kill"
        # whatever was committed is whole; what was not left no trace (but its row in `processing`)
        check_consistent(sessions, threads, partial=True)
        with sessions() as s:
            orphaned = set(s.scalars(select(Intake.id).where(Intake.state == "processing")))
        assert orphaned, "no claim was left behind by the kill (it did not happen in the middle of a batch)"

        proc = w.start()
        wait_for(lambda: len(w.children()) == 2, "two workers", proc=proc, log=log)
        victim = min(w.children())
        os.kill(victim, signal.SIGKILL)            # one worker dies; the supervisor reports it and starts another
        wait_for(lambda: len(w.children() - {victim}) == 2, "a replacement worker", proc=proc, log=log)
        wait_for(lambda: state_counts(db_url)["done"] == total, "the whole queue done", proc=proc, log=log)
        workers = w.children()
        if db_url.startswith("postgresql"):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(90) == 0
            assert not any(alive(p) for p in workers), "a worker outlived its supervisor"
        else:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            wait_for(lambda: not any(alive(p) for p in workers), "the orphaned workers to stop", timeout=60)
    finally:
        w.cleanup()
    text = log.read_text()
    assert f"pid {victim}) died with exit code -9" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    facts = check_consistent(sessions, threads)
    assert len(facts["rows"]) == total                  # one message row per intake row, none twice
    assert Counter(m.action for m in facts["rows"])["ignored"] == 6
    # the claims of dead workers (the one "on another machine", those killed above) were taken again
    with sessions() as s:
        retaken = list(s.scalars(select(Intake).where(Intake.id.in_(dead | orphaned))))
    assert all(r.state == "done" and r.attempts >= 2 for r in retaken), \
        [(r.id, r.state, r.attempts, r.claimed_by) for r in retaken]
    assert not any(r.claimed_by == "dead-host:1:0" for r in retaken)


# -- 3. poison messages: retried with backoff, parked with their error, visible, replayable ----------------

def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGEBOT_", "SLACK_"))}
    return subprocess.run([sys.executable, "-m", "triagebot.cli", "--actor", "admin:ops", *args], cwd=ROOT,
                          env={**env, "TRIAGEBOT_DATABASE_URL": url}, capture_output=True, text=True, timeout=120)


def test_a_poison_message_backs_off_is_parked_shown_and_requeued_while_the_rest_flows(db_url, monkeypatch):
    from triagebot.db.tables import Audit
    from triagebot.pipeline import Pipeline
    from triagebot.settings import Settings
    from triagebot.worker import Worker

    _e, sessions = open_db(db_url)
    good = [queue.enqueue(sessions, "email", email(f"g{n}@p.example", f"ops@p{n}.example", f"Issue {n}",
                                                   problem(n, f"good {n}"))) for n in range(3)]
    poison = queue.enqueue(sessions, "email", email("poison@p.example", "ops@bad.example", "Issue P",
                                                    problem(99, "POISON")))
    good += [queue.enqueue(sessions, "email", email(f"g{n}@p.example", f"ops@p{n}.example", f"Issue {n}",
                                                    problem(n, f"good {n}"))) for n in range(3, 12)]
    real_run = Pipeline.run
    broken = {"on": True}

    def run(self, message, triage=None):
        if broken["on"] and "POISON" in message.text:
            raise RuntimeError("the classifier exploded on this one")
        return real_run(self, message, triage)

    monkeypatch.setattr(Pipeline, "run", run)
    worker = Worker(Settings(database_url=db_url, max_attempts=3, worker_batch=4), name="w-test",
                    pipeline=warm_pipeline())
    while worker.run_once():
        pass
    # the others went on; the poison waits out its backoff
    assert state_counts(db_url) == Counter({"done": 12, "queued": 1})
    delays = []
    for attempt in (1, 2, 3):
        with sessions() as s:
            row = s.get(Intake, poison)
            assert (row.attempts, row.last_error) == (attempt, "RuntimeError: the classifier exploded on this one")
            if attempt < 3:
                assert row.state == "queued"
                nb = row.not_before if row.not_before.tzinfo else row.not_before.replace(tzinfo=utcnow().tzinfo)
                delays.append((nb - utcnow()).total_seconds())
        if attempt < 3:
            assert worker.run_once() == 0                  # not before its time
            with sessions() as s, s.begin():               # let the time pass
                s.execute(update(Intake).where(Intake.id == poison).values(not_before=utcnow() - timedelta(seconds=1)))
            assert worker.run_once() == 1
    assert delays[1] > delays[0] > 0                       # exponential backoff
    assert state_counts(db_url) == Counter({"done": 12, "failed": 1})

    st = cli(db_url, "status")
    assert st.returncode == 0, st.stderr
    assert "failed=1" in st.stdout
    assert f"failed intake {poison} after 3 attempts: RuntimeError: the classifier exploded on this one" in st.stdout
    rq = cli(db_url, "requeue", str(poison))
    assert (rq.returncode, rq.stdout.strip()) == (0, "requeued 1"), rq.stderr
    with sessions() as s:
        audited = [(a.actor, a.action) for a in s.scalars(select(Audit).order_by(Audit.id))]
    assert audited == [("admin:ops", "status"), ("admin:ops", "requeue")]

    broken["on"] = False                                   # the bug is fixed: the replay goes through
    assert worker.run_once() == 1
    assert state_counts(db_url) == Counter({"done": 13})
    with sessions() as s:
        row = s.get(Intake, poison)
        assert (row.attempts, row.last_error) == (1, None)
        assert s.scalar(select(func.count()).select_from(MessageRow).where(MessageRow.intake_id == poison)) == 1


def test_a_message_that_kills_its_worker_is_parked_after_max_attempts(db_url):
    """A row whose worker dies every time (OOM, segfault) comes back after each lease, then is parked."""
    _e, sessions = open_db(db_url)
    i = queue.enqueue(sessions, "email", b"Subject: x\r\n\r\nkills the worker")
    other = queue.enqueue(sessions, "email", b"Subject: y\r\n\r\nfine")

    def expire():
        with sessions() as s, s.begin():
            s.execute(update(Intake).where(Intake.id == i).values(claimed_at=utcnow() - timedelta(seconds=61)))

    for attempt in (1, 2):
        got = queue.claim(sessions, f"doomed{attempt}", limit=1, lease_seconds=60, max_attempts=2)
        assert [(c.id, c.attempts) for c in got] == [(i, attempt)]
        expire()                                            # the worker died; its lease ran out
    got = queue.claim(sessions, "next", limit=5, lease_seconds=60, max_attempts=2)
    assert [c.id for c in got] == [other]                   # the crasher is not handed out a third time
    with sessions() as s:
        row = s.get(Intake, i)
        assert row.state == "failed" and row.attempts == 2 and "doomed2 stopped while processing" in row.last_error
    assert queue.requeue(sessions, [i]) == 1
    assert [c.id for c in queue.claim(sessions, "next", limit=5, max_attempts=2)] == [i]


def test_a_worker_that_lost_its_claim_does_not_store_the_message_again(db_url):
    """Worker A is slower than its lease; B takes the row over. A must neither store it nor reset B's claim."""
    from triagebot.ingest import Processor
    from triagebot.settings import Settings

    _e, sessions = open_db(db_url)
    processor = Processor(Settings(database_url=db_url), sessions, pipeline=warm_pipeline(), after_commit=())
    i = queue.enqueue(sessions, "email", email("slow@l.example", "ops@l.example", "Slow", problem(5, "slow")))
    [a] = queue.claim(sessions, "A", lease_seconds=60)
    with sessions() as s, s.begin():
        s.execute(update(Intake).values(claimed_at=utcnow() - timedelta(seconds=61)))
    [b] = queue.claim(sessions, "B", lease_seconds=60)
    with pytest.raises(queue.ClaimLost):
        processor.process(a)
    assert queue.mark_failed(sessions, i, "A's error", max_attempts=5, claimed_by="A") == "processing"
    assert processor.process(b).action == "created"
    with pytest.raises(queue.ClaimLost):                    # finished: nobody processes it again
        processor.process(a)
    with sessions() as s:
        row = s.get(Intake, i)
        assert (row.state, row.claimed_by, row.attempts, row.last_error) == ("done", "B", 2, None)
        assert s.scalar(select(func.count()).select_from(MessageRow)) == 1


def test_a_stopping_worker_gives_back_the_rest_of_its_batch(db_url):
    from triagebot.settings import Settings
    from triagebot.worker import Worker

    _e, sessions = open_db(db_url)
    ids = [queue.enqueue(sessions, "email", email(f"s{n}@s.example", f"ops@s{n}.example", f"Stop {n}",
                                                  problem(n, f"stop {n}"))) for n in range(5)]
    worker = Worker(Settings(database_url=db_url, worker_batch=5), name="stopper", pipeline=warm_pipeline())
    real = worker.processor.process

    def process_then_stop(item):
        out = real(item)
        worker.stop()                                       # SIGTERM arrives during the first message
        return out

    worker.processor.process = process_then_stop
    assert worker.run_once() == 1
    with sessions() as s:
        rows = {r.id: (r.state, r.attempts, r.claimed_by) for r in s.scalars(select(Intake))}
    assert rows == {ids[0]: ("done", 1, "stopper"), **{i: ("queued", 0, None) for i in ids[1:]}}
