"""`triagebot bench`: every performance figure issue 3 asks for, measured in one run, beside its bar.

Sections: language detection (ours vs seeded langdetect on lingua's en/sv/es test sets), classification cost and
model load time, start-up time and resident memory of a fresh process with everything loaded, and end-to-end
`triage` throughput on one core with a per-step breakdown. The table goes to stdout (progress to stderr);
`--json FILE` writes the same figures machine-readable. Timings are wall-clock on whatever else the machine is
doing; the CPU-time figures beside them show how much of a wall figure was other processes holding the core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from triagebot.bench.paths import ROOT, one_thread_env, pin, shared_dir

SECTIONS = ("langid", "classify", "startup", "triage")
QUICK_LIMIT = 100      # --quick: texts per language and set, classify messages, evaluation e-mails
LINGUA_SETS = ("sentences", "word-pairs", "single-words")


@dataclass(frozen=True)
class Bar:
    """One target of the issue: where its figure is in the report, the comparison and the threshold."""

    key: str
    label: str
    path: tuple[str, ...]
    op: str            # ">=", "<=", "<"
    threshold: float
    unit: str = ""
    fmt: str = "{:.1f}"
    cpu_path: tuple[str, ...] | None = None    # the same figure from CPU time, shown beside it (noise)

    def value(self, report: dict, path: tuple[str, ...] | None = None) -> float | None:
        node: Any = report
        for p in path or self.path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None

    def holds(self, v: float) -> bool:
        return {">=": v >= self.threshold, "<=": v <= self.threshold, "<": v < self.threshold}[self.op]


BARS: tuple[Bar, ...] = (
    *(Bar(f"langid_{s}_accuracy", f"language ID accuracy, {s}", ("langid", "sets", s, "ours", "accuracy"),
          ">=", t, "", "{:.4f}") for s, t in zip(LINGUA_SETS, (0.995, 0.95, 0.82))),
    *(Bar(f"langid_{s}_median_us", f"language ID median per text, {s}", ("langid", "sets", s, "ours", "median_us"),
          "<=", 300, "µs", "{:.0f}") for s in LINGUA_SETS),
    Bar("classify_us", "classification per message (mean, target ~1 ms)", ("classify", "per_message_us", "mean"),
        "<=", 1000, "µs", "{:.0f}", ("classify", "cpu_per_message_us")),
    Bar("models_load_s", "model load: all models + warm-up (fresh process)", ("startup", "models_s"),
        "<", 2.0, "s", "{:.2f}", ("startup", "cpu_s", "models")),
    Bar("cold_start_s", "fresh process: interpreter + imports + load", ("startup", "spawn_to_ready_s"),
        "<", 2.0, "s", "{:.2f}", ("startup", "cpu_s", "start_to_ready")),
    Bar("rss_mb", "resident memory, everything loaded (fresh process)", ("startup", "rss_mb", "after_triage"),
        "<", 500, "MB", "{:.0f}"),
    Bar("triage_msg_per_s", "triage throughput on one core", ("triage", "msg_per_s"), ">=", 300, "msg/s", "{:.0f}",
        ("triage", "msg_per_s_cpu")),
)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `triagebot bench` (also used by `python -m triagebot.bench.runner`)."""
    ap.add_argument("--quick", action="store_true",
                    help=f"fewer texts and passes (at most {QUICK_LIMIT} per set, one timed pass): a smoke run")
    ap.add_argument("--limit", type=int, metavar="N",
                    help="cap every input set: N lingua texts per language and set, N classify messages, "
                         "N evaluation e-mails (default: all; --quick: %d)" % QUICK_LIMIT)
    ap.add_argument("--passes", type=int, metavar="N", help="timed passes for classify and triage (default 5; --quick 1)")
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="leave a section out (repeatable)")
    ap.add_argument("--no-langdetect", action="store_true", help="skip the langdetect baseline (it is slow)")
    ap.add_argument("--profile", type=int, default=None, metavar="N",
                    help="print the N most expensive functions (cProfile, cumulative) of one triage pass; "
                         "done with 25 anyway when throughput is below its bar (except with --quick)")
    ap.add_argument("--cpu", type=int, help="the CPU to pin to (default: the idlest one this process may use)")
    ap.add_argument("--shared", type=Path, help="the shared corpora folder (default: $TRIAGEBOT_SHARED_DIR or ../shared)")
    ap.add_argument("--samples", type=Path, default=ROOT / "samples", help="demo e-mails (*.eml) for the triage mix")
    ap.add_argument("--eval-file", type=Path, default=ROOT / "training" / "eval" / "independent.jsonl",
                    help="labelled messages whose e-mails are rendered for the triage mix")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "training" / "data",
                    help="training data: classification is timed on its held-out split; its e-mails warm up the "
                         "triage pipeline before the throughput is measured")
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="also write the figures as JSON ('-': stdout only)")
    ap.add_argument("--check", action="store_true", help="exit with status 1 when a bar fails")


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _git_commit() -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_probe(cpu: int | None, config: str | None, inputs: list[Path]) -> dict:
    """Start `python -m triagebot.bench.probe` and return its figures."""
    import subprocess
    cmd = [sys.executable, "-m", "triagebot.bench.probe", "--spawned-at", repr(time.time())]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    if config:
        cmd += ["--config", config]
    cmd += [str(p) for p in inputs]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"probe exited with {out.returncode}: {tail[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, settings=None, progress: Callable[[str], None] = _progress) -> dict:
    """Measure every section not skipped; the report dict (see render())."""
    import platform
    import subprocess
    from datetime import datetime, timezone
    one_thread_env()
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if args.quick else None)
    passes = args.passes if args.passes is not None else (1 if args.quick else 5)
    skip = set(args.skip or ())
    shared = shared_dir(args.shared)
    original_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    report: dict[str, Any] = {
        "meta": {
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k in ("quick", "limit", "passes", "skip", "no_langdetect", "profile", "cpu", "shared",
                                 "samples", "eval_file", "data_dir")},
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus_allowed": sorted(original_affinity) if original_affinity else None,
            "quick": bool(args.quick), "limit": limit, "passes": passes, "shared": str(shared),
            "shared_present": shared.is_dir(), "loadavg_before": _loadavg(),
        },
        "skipped": [],
    }
    if not shared.is_dir():
        report["skipped"].append(f"shared corpora folder {shared} is absent: lingua test sets and real mails left out")
    try:
        cpu = pin(args.cpu)
        report["meta"]["cpu"] = cpu
        progress(f"pinned to CPU {cpu}")

        from triagebot.bench import triage as triage_bench
        corpus = triage_bench.build_corpus(args.samples, args.eval_file, args.shared, limit)
        report["skipped"] += [f"triage mix: {s}" for s in corpus.skipped]

        if "startup" in skip:
            report["startup"] = {"skipped": "--skip startup"}
        else:
            progress("fresh process: imports, model load, memory ...")
            inputs = sorted(args.samples.glob("*.eml")) if args.samples.is_dir() else []
            raw_dir = shared / triage_bench.EMAIL_RAW_SUBDIR
            inputs += [raw_dir / x for x in triage_bench.REAL_MAILS if (raw_dir / x).is_file()]
            try:
                report["startup"] = run_probe(cpu, getattr(args, "config", None), inputs)
            except (RuntimeError, ValueError, subprocess.SubprocessError, OSError) as e:
                report["startup"] = {"error": str(e)}

        if "langid" in skip:
            report["langid"] = {"skipped": "--skip langid"}
        else:
            from triagebot.bench import langid as langid_bench
            progress("language detection ...")
            fig = langid_bench.measure(limit, langdetect=not args.no_langdetect, shared=args.shared,
                                       data_dir=args.data_dir, progress=progress)
            report["skipped"] += [f"language detection: {s}" for s in fig["skipped"]]
            report["langid"] = fig

        if "classify" in skip:
            report["classify"] = {"skipped": "--skip classify"}
        else:
            from triagebot.bench import classify as classify_bench
            progress("classification ...")
            models_dir = settings.models_dir if settings is not None else classify_bench.MODELS_DIR
            try:
                report["classify"] = classify_bench.measure(models_dir, args.data_dir, repeat=passes, limit=limit)
            except classify_bench.NoModel as e:
                report["classify"] = {"error": f"no model: {e}"}

        if "triage" in skip:
            report["triage"] = {"skipped": "--skip triage"}
        elif not corpus.items:
            report["triage"] = {"error": "no messages for the triage mix"}
        else:
            warm = triage_bench.warm_up_mails(args.data_dir, limit)
            progress(f"triage throughput: warm-up on {len(warm)} training e-mails, then {len(corpus.items)} e-mails "
                     f"x {passes} pass(es) on CPU {cpu} ...")
            fig = triage_bench.measure(corpus, settings, passes=passes, profile_top=args.profile or 0, warm_up=warm,
                                       cpu=cpu)
            bar = next(b for b in BARS if b.key == "triage_msg_per_s")
            if not fig.get("profile") and not args.quick and args.profile is None and not bar.holds(fig["msg_per_s"]):
                progress("throughput below its bar: profiling one pass ...")
                fig["profile"] = triage_bench.profile(corpus, settings, top=25)
            report["triage"] = fig
    finally:
        if original_affinity:
            os.sched_setaffinity(0, original_affinity)
    report["meta"]["loadavg_after"] = _loadavg()
    report["bars"] = evaluate(report)
    return report


def evaluate(report: dict) -> list[dict]:
    """Each bar with its measured value and PASS / FAIL / SKIP."""
    out = []
    for b in BARS:
        v = b.value(report)
        cpu = b.value(report, b.cpu_path) if b.cpu_path else None
        out.append({"key": b.key, "what": b.label, "measured": v, "op": b.op, "bar": b.threshold, "unit": b.unit,
                    "result": "SKIP" if v is None else ("PASS" if b.holds(v) else "FAIL"),
                    "measured_cpu_time": cpu,
                    "result_cpu_time": None if cpu is None else ("PASS" if b.holds(cpu) else "FAIL")})
    return out


# -- rendering -------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(report: dict) -> str:
    """The readable report."""
    m = report["meta"]
    lines = [f"triagebot bench  {m['started']}  commit {m.get('commit') or '?'}  python {m['python']}  "
             f"CPU {m.get('cpu')} of {m.get('cpus_allowed')}  {'quick' if m['quick'] else 'full'} run",
             f"load average before {m.get('loadavg_before')} after {m.get('loadavg_after')}: the machine may be "
             "shared; wall times include time other processes held the core (compare the CPU-time figures).", ""]

    lid = report.get("langid", {})
    lines.append("LANGUAGE DETECTION  triagebot.langid vs langdetect (seeded, restricted to en/sv/es), same texts")
    if "sets" in lid:
        lines.append(f"  model {lid['model']} ({lid['model_mb']} MB, {lid['model_version']}), load {lid['model_load_s']:.3f} s;"
                     " µs per text, model loaded")
        lines.append(f"  {'set':16s} {'n':>5s}   {'ours acc':>8s} {'med µs':>7s} {'p95 µs':>7s}   "
                     f"{'langdetect':>10s} {'med µs':>7s} {'p95 µs':>7s}   ours per language")
        for name, row in lid["sets"].items():
            o, b = row["ours"], row.get("langdetect") or {}
            lines.append(f"  {name:16s} {row['n']:5d}   {o['accuracy']:8.4f} {o['median_us']:7.0f} {o['p95_us']:7.0f}   "
                         f"{_f(b.get('accuracy'), '{:.4f}'):>10s} {_f(b.get('median_us')):>7s} {_f(b.get('p95_us')):>7s}   "
                         + " ".join(f"{k} {v:.3f}" for k, v in o["per_language"].items()))
    else:
        lines.append(f"  {lid.get('skipped') or lid.get('error')}")
    lines.append("")

    c = report.get("classify", {})
    lines.append("CLASSIFICATION  the classify step on the held-out split of training/data, normalized beforehand")
    if "per_message_us" in c:
        pm = c["per_message_us"]
        lines += [f"  model {c['model_version']} ({c['model_file_mb']} MB), {c['messages']} messages "
                  f"(mean {c['mean_chars']:.0f} chars), fastest of {c['repeat']} pass(es), fast path "
                  f"{'on' if c['fast_path'] else 'OFF'}",
                  f"  per message: mean {pm['mean']:.0f} µs, median {pm['median']:.0f}, p95 {pm['p95']:.0f}, "
                  f"max {pm['max']:.0f}; CPU {c['cpu_per_message_us']:.0f} µs; e-mails only "
                  f"{_f(c['email_per_message_us_mean'])} µs",
                  f"  model load alone {c['load_only_s']:.3f} s, load + warm-up (ModelHandle) "
                  f"{c['load_and_warm_up_s']:.3f} s (in this process, imports done)"]
    else:
        lines.append(f"  {c.get('skipped') or c.get('error')}")
    lines.append("")

    s = report.get("startup", {})
    lines.append("START-UP AND MEMORY  fresh process (python -m triagebot.bench.probe): import, build the pipeline, "
                 "load and warm up every model, triage the samples")
    if "rss_mb" in s:
        cpu = s.get("cpu_s", {})
        r = s["rss_mb"]
        lines += [f"  imports {s['import_s']:.2f} s (CPU {_f(cpu.get('import'), '{:.2f}')}), pipeline/rules "
                  f"{s['pipeline_s']:.2f} s, models load + warm-up {s['models_s']:.2f} s (CPU "
                  f"{_f(cpu.get('models'), '{:.2f}')}); spawn → ready {_f(s.get('spawn_to_ready_s'), '{:.2f}')} s "
                  f"(CPU {_f(cpu.get('start_to_ready'), '{:.2f}')})",
                  f"  RSS: interpreter {r['start']:.0f} MB, imported {r['imported']:.0f}, models loaded "
                  f"{r['ready']:.0f}, after triaging {s['triaged']} mails {r['after_triage']:.0f}; peak "
                  f"{s['peak_rss_mb']:.0f} MB"]
    else:
        lines.append(f"  {s.get('skipped') or s.get('error')}")
    lines.append("")

    t = report.get("triage", {})
    lines.append("TRIAGE THROUGHPUT  raw RFC 822 bytes → normalize → pipeline → CONTRACT record, one process on one core")
    if "steps" in t:
        src = ", ".join(f"{v} {k}" for k, v in t["sources"].items())
        lines += [f"  {t['messages']} e-mails ({src}; mean {t['mean_bytes']} bytes; "
                  + ", ".join(f"{v} {k}" for k, v in t["dispositions"].items())
                  + (f"; {len(t['errors'])} input errors" if t["errors"] else "") + ")",
                  f"  after a warm-up on {t['warm_up_messages']} other e-mails (training data; {t['warm_up_s']:.1f} s), "
                  "each seen for the first time:",
                  f"  {t['msg_per_s']:.0f} msg/s (by CPU time {_f(t['msg_per_s_cpu'])}); per message p50 "
                  f"{t['p50_ms']:.2f} ms, p99 {t['p99_ms']:.2f} ms, max {t['max_ms']:.1f} ms"]
        if t.get("repeat_msg_per_s"):
            lines.append(f"  the same messages again ({t['passes'] - 1} more pass(es), their words cached): "
                         f"{t['repeat_msg_per_s']:.0f} msg/s best (by CPU time {_f(t['repeat_msg_per_s_cpu'])})")
        lines.append(f"  {'step':16s} {'µs/msg':>8s} {'share':>7s} {'ran on':>7s}")
        for name, st in t["steps"].items():
            mark = "  ← slowest" if name == t["slowest_step"] else ""
            lines.append(f"  {name:16s} {st['us_per_message']:8.0f} {st['share'] * 100:6.1f}% {st['ran_on']:7d}{mark}")
        lines.append("  (first-sight pass; µs/msg averages over all messages, also those a step skipped)")
        for label, key in (("first-sight pass", "core_first_sight"), ("repeat passes", "core_repeat")):
            core = t.get(key)
            if core:
                lines.append(f"  CPU {m.get('cpu')} during the {label} ({core['seconds']:.1f} s): this process "
                             f"{core['this_process']:.0%}, other processes {core['other_processes']:.0%}, "
                             f"hypervisor steal {core['steal']:.0%}, idle {core['idle']:.0%}")
        ratio = t["msg_per_s"] / t["msg_per_s_cpu"] if t.get("msg_per_s_cpu") else 1.0
        if ratio < 0.85:
            lines.append(f"  NOTE: wall time ran {1 / ratio:.1f}x this process's CPU time: other processes held the "
                         "core; on an idle core expect about the CPU-time figure")
        if t.get("profile"):
            lines += ["", "  cProfile of one triage pass (cumulative):"]
            lines += ["    " + x for x in t["profile"].strip().splitlines()]
    else:
        lines.append(f"  {t.get('skipped') or t.get('error')}")
    lines.append("")

    lines.append("BARS (issue 3)")
    lines.append(f"  {'what':52s} {'measured':>12s}  {'bar':>14s}  result  (by CPU time)")
    for b in report["bars"]:
        bar = next(x for x in BARS if x.key == b["key"])
        unit = f" {b['unit']}" if b["unit"] else ""
        meas = "-" if b["measured"] is None else bar.fmt.format(b["measured"]) + unit
        cpu = "" if b.get("measured_cpu_time") is None else \
            f"  ({bar.fmt.format(b['measured_cpu_time'])}{unit} {b['result_cpu_time']})"
        lines.append(f"  {b['what']:52s} {meas:>12s}  {b['op'] + ' ' + _num(b['bar']) + unit:>14s}  "
                     f"{b['result']:6s}{cpu}".rstrip())
    counts = {r: sum(1 for b in report["bars"] if b["result"] == r) for r in ("PASS", "FAIL", "SKIP")}
    lines.append(f"  {counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skipped (results from wall time; "
                 "the CPU-time figures show what other processes on the machine added)")
    if report["skipped"]:
        lines += ["", "SKIPPED"] + [f"  {x}" for x in report["skipped"]]
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:g}"


def cmd(args: argparse.Namespace, settings=None) -> int:
    """`triagebot bench`: run, print the table, write --json; 1 with --check when a bar fails."""
    report = run(args, settings)
    if args.json_out == "-":
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print(render(report), flush=True)
        if args.json_out:
            import tempfile
            path = Path(args.json_out)
            fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=".bench-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(report, fh, ensure_ascii=False, indent=1)
                fh.write("\n")
            os.replace(tmp, path)
            print(f"figures written to {path}")
    failed = [b for b in report["bars"] if b["result"] == "FAIL"]
    return 1 if args.check and failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="triagebot bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return cmd(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
