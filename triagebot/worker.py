"""The worker: claims rows from the intake queue, runs the pipeline, parks what keeps failing."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
import traceback

from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.ingest import Processor
from triagebot.settings import Settings

log = logging.getLogger(__name__)


class Worker:
    """One worker loop; many may run against one database."""

    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        _engine, self.sessions = open_db(settings.database_url)
        self.processor = Processor(settings, self.sessions)
        self.stopping = False

    def run_once(self) -> int:
        """Claim and process one batch; returns how many rows it handled."""
        items = queue.claim(self.sessions, self.name, self.settings.worker_batch, self.settings.stale_claim_seconds)
        for item in items:
            try:
                self.processor.process(item)
            except Exception as e:  # a system problem or a bug: retry with backoff, then park
                state = queue.mark_failed(self.sessions, item.id, f"{type(e).__name__}: {e}",
                                          self.settings.max_attempts)
                log.error("intake %s failed (attempt %s, now %s): %s\n%s", item.id, item.attempts, state,
                          type(e).__name__, traceback.format_exc(limit=3))
        return len(items)

    def run(self, idle_sleep: float = 0.5, until_empty: bool = False) -> None:
        """Loop until stopped (SIGTERM/SIGINT), or until the queue is empty when until_empty."""
        while not self.stopping:
            n = self.run_once()
            if n == 0:
                if until_empty:
                    return
                time.sleep(idle_sleep)


def _child(settings: Settings, index: int) -> None:
    worker = Worker(settings, name=f"{socket.gethostname()}:{os.getpid()}:{index}")
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
    worker.run()


def run_workers(settings: Settings, concurrency: int = 1) -> None:
    """Run `concurrency` worker processes (one in-process when 1)."""
    if concurrency <= 1:
        worker = Worker(settings)
        signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
        try:
            worker.run()
        except KeyboardInterrupt:
            pass
        return
    procs = [multiprocessing.Process(target=_child, args=(settings, i), daemon=False) for i in range(concurrency)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
