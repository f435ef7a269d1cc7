"""Benchmark of the classify step: model load time and cost per message.

Messages are the held-out split of the training data, normalized before timing, so the figure is what the
classify step adds to a triage. Targets (issue 3): classification <= ~1 ms per message (a full triage >= 300
messages/s), load < 2 s. Resident memory is measured in a fresh process (triagebot.bench.probe), since this one
may hold other things.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

from triagebot.bench.paths import ROOT

MODELS_DIR = ROOT / "models"
DATA_DIR = ROOT / "training" / "data"


class NoModel(RuntimeError):
    """Nothing promoted (or the promoted model does not load)."""


def measure(models_dir: Path = MODELS_DIR, data_dir: Path = DATA_DIR, repeat: int = 5,
            limit: int | None = None, on_ready: Callable[[], None] | None = None) -> dict:
    """Figures of the classify step; NoModel when there is no usable model.

    `on_ready` is called once the model is loaded and warmed up, before anything else (memory, start-up time).
    """
    t0 = time.perf_counter()
    import skops.io  # noqa: F401 - imported by the first load; counted with the imports, not the load
    from triagebot.model import Triage
    from triagebot.steps.classify import ClassifyStep
    from triagebot.train import models  # noqa: F401
    from triagebot.train.registry import ModelHandle, Registry
    t_import = time.perf_counter() - t0

    t0 = time.perf_counter()
    # what a worker does: the handle loads the promoted model and warms it up (fast path, tokenizers)
    handle = ModelHandle(Path(models_dir))
    loaded = handle.get()
    if loaded is None:
        raise NoModel(handle.error or f"nothing promoted in {models_dir}")
    t_ready = time.perf_counter() - t0
    if on_ready is not None:
        on_ready()
    t0 = time.perf_counter()
    Registry(Path(models_dir)).load()
    t_load = time.perf_counter() - t0

    from triagebot.normalize import message_from_text
    from triagebot.train import dataset as ds

    _, test_ex = ds.load_dataset(data_dir).split()
    if limit:
        # every n-th, so a short run still has all languages and both channels
        test_ex = test_ex[::max(1, len(test_ex) // limit)][:limit]
    messages = [(message_from_text(e.channel, e.subject, e.body, e.html), e.language, e.channel) for e in test_ex]
    step = ClassifyStep(models_dir=models_dir, handle=handle)
    triages = [Triage(language=lang) for _, lang, _ in messages]

    best: list[float] | None = None
    best_cpu = float("inf")
    for _ in range(max(1, repeat)):
        times = []
        cpu0 = time.process_time()
        for (msg, _lang, _ch), tri in zip(messages, triages):
            s = time.perf_counter()
            step(msg, tri)
            times.append(time.perf_counter() - s)
        # CPU time too: on a shared machine wall time also counts the time other processes held the core
        best_cpu = min(best_cpu, (time.process_time() - cpu0) / max(1, len(messages)))
        if best is None or sum(times) < sum(best):
            best = times
    assert best is not None
    us = [t * 1e6 for t in best] or [float("nan")]
    email_us = [u for u, (_, _, ch) in zip(us, messages) if ch == "email"]
    chars = [len(m.text) + len(m.subject or "") for m, _, _ in messages] or [0]
    return {
        "model_version": loaded.version,
        "messages": len(messages),
        "repeat": max(1, repeat),
        "mean_chars": round(statistics.mean(chars), 1),
        "per_message_us": {"mean": round(statistics.mean(us), 1), "median": round(statistics.median(us), 1),
                           "p95": round(sorted(us)[int(0.95 * (len(us) - 1))], 1), "max": round(max(us), 1)},
        "cpu_per_message_us": round(best_cpu * 1e6, 1),
        "email_per_message_us_mean": round(statistics.mean(email_us), 1) if email_us else None,
        "messages_per_second": round(1e6 / statistics.mean(us), 1),
        "fast_path": loaded.model.fast_path_error is None and loaded.model.fast_scorer() is not None,
        "import_s": round(t_import, 3),
        "load_and_warm_up_s": round(t_ready, 3),
        "load_only_s": round(t_load, 3),
        "model_file_mb": round(loaded.card.get("file_bytes", 0) / 1e6, 2),
    }
