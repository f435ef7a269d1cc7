"""Fresh-process probe: import the triage pipeline, load every model, triage a few messages; print one JSON line.

    python -m triagebot.bench.probe [--spawned-at UNIX_TIME] [--config FILE] [--cpu N] [FILE.eml ...]

Run by `triagebot bench` in a new interpreter so that import time, model load time and resident memory are those
of a process that does nothing else (a worker or `triagebot triage` at start-up).
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from importlib import import_module  # noqa: E402
from pathlib import Path  # noqa: E402

from triagebot.bench.paths import one_thread_env, peak_rss_mb, pin, rss_mb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spawned-at", type=float, help="time.time() just before the parent started this process")
    ap.add_argument("--config", help="a TOML settings file")
    ap.add_argument("--cpu", type=int, help="pin to this CPU")
    ap.add_argument("inputs", nargs="*", type=Path, help=".eml files to triage after loading")
    args = ap.parse_args(argv)
    one_thread_env()
    cpu = pin(args.cpu) if args.cpu is not None else None
    rss_start = rss_mb()

    t0, c0 = time.perf_counter(), time.process_time()
    import skops.io  # noqa: F401 - the model loader's import, counted with the imports
    from triagebot.normalize import from_raw as normalize
    from triagebot.pipeline import Pipeline, triage_record
    from triagebot.settings import Settings
    from triagebot.steps import TRIAGE_STEPS
    for _name, path in TRIAGE_STEPS:
        import_module(path.split(":")[0])
    t_import, c_import = time.perf_counter() - t0, time.process_time() - c0
    rss_imported = rss_mb()

    t0, c0 = time.perf_counter(), time.process_time()
    settings = Settings.load(toml_path=args.config)
    pipeline = Pipeline.default(settings)       # rules, customers, patterns
    t_pipeline, c_pipeline = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    versions = {}
    for step in pipeline.steps:                 # language model, classifier (+ fast path, tokenizers)
        warm = getattr(step, "warm_up", None)
        if warm is not None:
            versions[step.name] = warm()
    t_models, c_models = time.perf_counter() - t0, time.process_time() - c0
    ready, c_ready = time.perf_counter() - STARTED, time.process_time()
    spawn_to_ready = time.time() - args.spawned_at if args.spawned_at else None
    rss_ready = rss_mb()

    triaged = errors = 0
    t0 = time.perf_counter()
    first_s = None
    for path in args.inputs:
        try:
            message = normalize("email", path.read_bytes())
            triage_record(message, pipeline.run(message))
            triaged += 1
        except Exception:  # noqa: BLE001 - counted; the figures are about memory, not this message
            errors += 1
        if first_s is None:
            first_s = time.perf_counter() - t0
    print(json.dumps({
        "python": sys.version.split()[0],
        "cpu": cpu,
        "model_versions": versions,
        "import_s": round(t_import, 3),
        "pipeline_s": round(t_pipeline, 3),
        "models_s": round(t_models, 3),
        "start_to_ready_s": round(ready, 3),
        # CPU seconds of this process (user + system) for the same spans: what the wall figures would be on an
        # idle machine, give or take disk reads; the difference is time other processes held the core
        "cpu_s": {"import": round(c_import, 3), "pipeline": round(c_pipeline, 3), "models": round(c_models, 3),
                  "start_to_ready": round(c_ready, 3)},
        "spawn_to_ready_s": round(spawn_to_ready, 3) if spawn_to_ready is not None else None,
        "first_message_s": round(first_s, 4) if first_s is not None else None,
        "triaged": triaged,
        "errors": errors,
        "rss_mb": {"start": round(rss_start, 1), "imported": round(rss_imported, 1), "ready": round(rss_ready, 1),
                   "after_triage": round(rss_mb(), 1)},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
