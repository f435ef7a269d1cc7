"""The worker: claims rows from the intake queue, runs the pipeline, parks what keeps failing.

`triagebot worker --concurrency N` runs N worker processes under a supervisor: a worker that dies is
reported and started again (with a growing pause when it keeps dying at once), SIGTERM or SIGINT stops them
all, each after the message it is on, and a worker whose supervisor is gone stops on its own.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback

from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.ingest import Processor
from triagebot.normalize import from_raw
from triagebot.pipeline import Pipeline
from triagebot.settings import Settings

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 60.0      # how long a stopping supervisor waits for its workers before it kills them
FAST_DEATH_SECONDS = 10.0      # a worker that dies sooner than this after its start is restarted after a pause
MAX_RESTART_PAUSE = 30.0


class Worker:
    """One worker loop; many may run against one database."""

    def __init__(self, settings: Settings, name: str | None = None, parent_pid: int | None = None,
                 pipeline: Pipeline | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        _engine, self.sessions = open_db(settings.database_url)
        self.processor = Processor(settings, self.sessions, pipeline=pipeline)
        self.stopping = False
        self.parent_pid = parent_pid

    def stop(self, *_args) -> None:
        self.stopping = True

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run_once(self) -> int:
        """Claim and process one batch; returns how many rows it handled."""
        items = queue.claim(self.sessions, self.name, self.settings.worker_batch, self.settings.stale_claim_seconds,
                            max_attempts=self.settings.max_attempts)
        for n, item in enumerate(items):
            if self.stopping or self._orphaned():
                # the rest of the batch goes back to the queue now, not after a lease
                queue.release(self.sessions, [i.id for i in items[n:]], self.name)
                return n
            try:
                self.processor.process(item)
            except queue.ClaimLost as e:  # our lease ran out and another worker has it: theirs now
                log.warning("%s", e)
            except Exception as e:  # a system problem or a bug: retry with backoff, then park
                state = queue.mark_failed(self.sessions, item.id, f"{type(e).__name__}: {e}",
                                          self.settings.max_attempts, claimed_by=self.name)
                log.error("intake %s failed (attempt %s, now %s): %s\n%s", item.id, item.attempts, state,
                          type(e).__name__, traceback.format_exc(limit=3))
        return len(items)

    def run(self, idle_sleep: float = 0.2, until_empty: bool = False) -> None:
        """Loop until stopped (SIGTERM/SIGINT), or until the queue is empty when until_empty.

        A database that is down or a claim that fails does not end the loop: it is logged and tried again."""
        pause = idle_sleep
        while not self.stopping:
            if self._orphaned():
                log.warning("worker %s: its supervisor is gone, stopping", self.name)
                return
            try:
                n = self.run_once()
            except Exception:
                if until_empty:
                    raise
                log.error("worker %s: claiming failed, retrying in %.1fs", self.name, pause, exc_info=True)
                time.sleep(pause)
                pause = min(pause * 2, MAX_RESTART_PAUSE)
                continue
            pause = idle_sleep
            if n == 0:
                if until_empty:
                    return
                time.sleep(idle_sleep)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (the supervisor killed with SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - the getppid check in the loop still stops an orphan
        pass


def warm_pipeline(settings: Settings) -> Pipeline | None:
    """A pipeline with its models loaded, for forked workers to share (copy-on-write) instead of each loading its
    own; None when workers are not forked or loading fails (each worker then loads its own and reports why)."""
    if multiprocessing.get_start_method() != "fork":
        return None
    try:
        pipeline = Pipeline.default(settings)
        pipeline.run(from_raw("email", b"From: warm@localhost\r\nSubject: warm up\r\n\r\nThe SIM in our tracker "
                                        b"has no data since this morning.\r\n"))
        return pipeline
    except Exception:  # noqa: BLE001
        log.warning("supervisor: could not load the models up front", exc_info=True)
        return None


def _child(settings: Settings, index: int, parent_pid: int, pipeline: Pipeline | None = None) -> None:
    worker: Worker | None = None

    def stop(*_args) -> None:
        if worker is not None:
            worker.stop()
        else:
            raise SystemExit(0)   # still starting up: nothing claimed yet, just go

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)   # Ctrl-C reaches the whole process group: stop after the message
    _die_with_parent()
    if os.getppid() != parent_pid:
        return
    try:   # forked: the supervisor's pooled connections are not ours to use
        open_db(settings.database_url)[0].dispose(close=False)
    except Exception:  # noqa: BLE001 - Worker() reports a database it cannot open
        pass
    worker = Worker(settings, name=f"{socket.gethostname()}:{os.getpid()}:{index}", parent_pid=parent_pid,
                    pipeline=pipeline)
    worker.run()


def run_workers(settings: Settings, concurrency: int = 1) -> int:
    """Run `concurrency` worker processes (one in-process when 1) until SIGTERM or SIGINT."""
    if concurrency <= 1:
        worker = Worker(settings)
        signal.signal(signal.SIGTERM, worker.stop)
        signal.signal(signal.SIGINT, worker.stop)
        worker.run()
        return 0
    return Supervisor(settings, concurrency).run()


class Supervisor:
    """Keeps `concurrency` worker processes running; stops them all on SIGTERM/SIGINT."""

    def __init__(self, settings: Settings, concurrency: int) -> None:
        self.settings, self.concurrency = settings, concurrency
        self.procs: dict[int, multiprocessing.Process] = {}
        self.started: dict[int, float] = {}
        self.due: dict[int, float] = {}          # index -> when to start it again
        self.quick_deaths: dict[int, int] = {}
        self.stopping = False
        self.restarts = 0
        self.pipeline: Pipeline | None = None

    def stop(self, signum, _frame) -> None:
        if not self.stopping:
            log.warning("supervisor: %s, stopping %d workers", signal.Signals(signum).name, len(self.procs))
        self.stopping = True

    def _start(self, index: int) -> None:
        p = multiprocessing.Process(target=_child, args=(self.settings, index, os.getpid(), self.pipeline),
                                    name=f"triagebot-worker-{index}", daemon=False)
        p.start()
        self.procs[index], self.started[index] = p, time.monotonic()
        log.info("supervisor: worker %d started (pid %s)", index, p.pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        # migrate once here rather than in N racing children; no connection stays open across the fork
        engine, _sessions = open_db(self.settings.database_url)
        engine.dispose()
        self.pipeline = warm_pipeline(self.settings)   # loaded once, shared by the forked workers
        for i in range(self.concurrency):
            self._start(i)
        while not self.stopping:
            sentinels = [p.sentinel for p in self.procs.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            now = time.monotonic()
            for i, p in list(self.procs.items()):
                if p.is_alive() or self.stopping:
                    continue
                p.join()
                lived = now - self.started[i]
                self.quick_deaths[i] = self.quick_deaths.get(i, 0) + 1 if lived < FAST_DEATH_SECONDS else 0
                pause = min(MAX_RESTART_PAUSE, 2.0 ** self.quick_deaths[i] - 1) if self.quick_deaths[i] else 0.0
                log.error("supervisor: worker %d (pid %s) died with exit code %s after %.1fs; restarting it%s",
                          i, p.pid, p.exitcode, lived, f" in {pause:.0f}s" if pause else "")
                del self.procs[i]
                self.due[i] = now + pause
            for i, when in list(self.due.items()):
                if when <= now and not self.stopping:
                    del self.due[i]
                    self.restarts += 1
                    self._start(i)
        return self._stop_all()

    def _stop_all(self) -> int:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()           # SIGTERM: the worker finishes its message and gives back the rest
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [p for p in self.procs.values() if p.is_alive()]
        for p in stuck:
            log.error("supervisor: worker pid %s did not stop within %.0fs, killing it", p.pid, STOP_GRACE_SECONDS)
            p.kill()
            p.join()
        log.warning("supervisor: all workers stopped")
        return 1 if stuck else 0
