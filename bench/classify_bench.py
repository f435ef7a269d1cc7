"""Benchmark of the classify step: model load time, resident memory with the model loaded, cost per message.

    .venv/bin/python bench/classify_bench.py [--models-dir models] [--data-dir training/data] [--repeat 5] [--json]

Runs on one core (sched_setaffinity, one BLAS thread). Messages are the held-out split of the training data,
normalized before timing, so the figure is what the classify step adds to a triage. Targets (the issue):
classification <= ~1 ms per message (a full triage >= 300 messages/s), load < 2 s, RSS < 500 MB.
"""
from __future__ import annotations

import os

# one core, one BLAS thread: set before numpy is imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "training" / "data")
    ap.add_argument("--repeat", type=int, default=5, help="passes over the messages; the fastest pass counts")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rss_start = rss_mb()

    t0 = time.perf_counter()
    import skops.io  # noqa: F401 - imported by the first load; counted with the imports, not the load
    from triagebot.model import Triage
    from triagebot.steps.classify import ClassifyStep
    from triagebot.train import models  # noqa: F401
    from triagebot.train.registry import ModelHandle, Registry
    t_import = time.perf_counter() - t0

    t0 = time.perf_counter()
    # what a worker does: the handle loads the promoted model and warms it up (fast path, tokenizers)
    handle = ModelHandle(args.models_dir)
    loaded = handle.get()
    if loaded is None:
        print(f"no model: {handle.error or 'nothing promoted in ' + str(args.models_dir)}", file=sys.stderr)
        return 1
    t_ready = time.perf_counter() - t0
    rss_loaded = rss_mb()
    t_cold = time.perf_counter() - STARTED
    t0 = time.perf_counter()
    Registry(args.models_dir).load()
    t_load = time.perf_counter() - t0

    from triagebot.normalize import message_from_text
    from triagebot.train import dataset as ds

    _, test_ex = ds.load_dataset(args.data_dir).split()
    messages = [(message_from_text(e.channel, e.subject, e.body, e.html), e.language, e.channel) for e in test_ex]
    step = ClassifyStep(models_dir=args.models_dir, handle=handle)
    triages = [Triage(language=lang) for _, lang, _ in messages]

    best: list[float] | None = None
    best_cpu = float("inf")
    for _ in range(max(1, args.repeat)):
        times = []
        cpu0 = time.process_time()
        for (msg, _lang, _ch), tri in zip(messages, triages):
            s = time.perf_counter()
            step(msg, tri)
            times.append(time.perf_counter() - s)
        # CPU time too: on a shared machine wall time also counts the time other processes held the core
        best_cpu = min(best_cpu, (time.process_time() - cpu0) / len(messages))
        if best is None or sum(times) < sum(best):
            best = times
    assert best is not None
    us = [t * 1e6 for t in best]
    email_us = [u for u, (_, _, ch) in zip(us, messages) if ch == "email"]
    chars = [len(m.text) + len(m.subject or "") for m, _, _ in messages]
    figures = {
        "model_version": loaded.version,
        "messages": len(messages),
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
        "cold_start_to_ready_s": round(t_cold, 3),
        "rss_mb": {"interpreter": round(rss_start, 1), "model_loaded": round(rss_loaded, 1),
                   "after_benchmark": round(rss_mb(), 1)},
        "model_file_mb": round(loaded.card.get("file_bytes", 0) / 1e6, 2),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
