"""Benchmark of the classify step: model load time, resident memory with the model loaded, cost per message.

    .venv/bin/python bench/classify_bench.py [--models-dir models] [--data-dir training/data] [--repeat 5] [--json]

Runs on one core (sched_setaffinity, one BLAS thread). The measuring is triagebot/bench/classify.py, shared with
`triagebot bench` (which also measures start-up and memory of the whole pipeline in a fresh process); this script
adds the figures of its own process: resident memory with the model loaded and the time from start to ready.
Targets (the issue): classification <= ~1 ms per message (a full triage >= 300 messages/s), load < 2 s, RSS < 500 MB.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from triagebot.bench.paths import one_thread_env, rss_mb  # noqa: E402

one_thread_env()  # one core, one BLAS thread: before numpy is imported


def main(argv: list[str] | None = None) -> int:
    from triagebot.bench.classify import DATA_DIR, MODELS_DIR, NoModel, measure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--repeat", type=int, default=5, help="passes over the messages; the fastest pass counts")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rss_start = rss_mb()
    at_ready: dict[str, float] = {}

    def ready() -> None:
        at_ready["rss"] = rss_mb()
        at_ready["cold"] = time.perf_counter() - STARTED

    try:
        figures = measure(args.models_dir, args.data_dir, repeat=args.repeat, on_ready=ready)
    except NoModel as e:
        print(f"no model: {e}", file=sys.stderr)
        return 1
    figures["cold_start_to_ready_s"] = round(at_ready["cold"], 3)
    figures["rss_mb"] = {"interpreter": round(rss_start, 1), "model_loaded": round(at_ready["rss"], 1),
                         "after_benchmark": round(rss_mb(), 1)}
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
