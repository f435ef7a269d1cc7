"""Language-identification benchmark: triagebot.langid against plain langdetect, same run, same texts.

Sets: lingua's en/sv/es test files (sentences, word pairs, single words; evaluation only, see
../shared/corpora/lingua-langid-testdata/SOURCE.md) and the project's own Slack lines from
training/data/*.jsonl (the model trains on e-mail messages only, never on Slack lines).
Accuracy = the predicted label equals the file's language; `other` counts as wrong.
langdetect runs with DetectorFactory.seed = 0 and its answer is restricted to en/sv/es by taking
the most probable of the three in its full probability vector.
Times are wall-clock microseconds per text (median and 95th percentile), model already loaded; each set starts
with a freshly loaded model (an empty word cache), so a set's figures do not depend on the sets before it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

from triagebot.bench.paths import ROOT, shared_dir

LINGUA_SUBDIR = Path("corpora") / "lingua-langid-testdata"
TRAINING_DATA = ROOT / "training" / "data"
LANGS = ("en", "sv", "es")
SETS = ("sentences", "word-pairs", "single-words")


def lingua_dir(shared: Path | None = None) -> Path:
    return shared_dir(shared) / LINGUA_SUBDIR


def lingua_set(kind: str, limit: int | None, lingua: Path | None = None) -> list[tuple[str, str]]:
    """(text, language) pairs of one lingua test set."""
    lingua = lingua or lingua_dir()
    out = []
    for lang in LANGS:
        lines = [x for x in (lingua / kind / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        out += [(x, lang) for x in lines[:limit]]
    return out


def slack_lines(data_dir: Path = TRAINING_DATA, limit: int | None = None) -> list[tuple[str, str]]:
    """Slack messages of the project's training files with their labelled language."""
    out = []
    for path in sorted(data_dir.glob("*.jsonl")) if data_dir.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("channel") == "slack" and rec.get("language") in LANGS + ("other",):
                out.append((rec.get("body") or "", rec["language"]))
    if limit and len(out) > limit:
        out = out[::len(out) // limit][:limit]   # every n-th: all files and languages stay in a short run
    return out


class LangDetect:
    """Plain langdetect, seeded, answer restricted to en/sv/es."""

    def __init__(self) -> None:
        from langdetect import DetectorFactory
        from langdetect import detector_factory

        DetectorFactory.seed = 0
        detector_factory.init_factory()
        self.factory = detector_factory._factory
        self.index = {lang: self.factory.get_lang_list().index(lang) for lang in LANGS}

    def __call__(self, text: str) -> str:
        from langdetect.lang_detect_exception import LangDetectException

        d = self.factory.create()
        d.append(text)
        try:
            d.get_probabilities()
        except LangDetectException:
            return "other"  # no letters it knows
        return max(LANGS, key=lambda lang: d.langprob[self.index[lang]])


def run(detect: Callable[[str], str], items: list[tuple[str, str]]) -> tuple[float, float, float, dict[str, float]]:
    """Accuracy, median µs, p95 µs and per-language accuracy of one detector on one set."""
    times, hits = [], {lang: [0, 0] for lang in LANGS + ("other",)}
    for text, want in items:
        t = time.perf_counter()
        got = detect(text)
        times.append((time.perf_counter() - t) * 1e6)
        hits[want][0] += got == want
        hits[want][1] += 1
    times.sort()
    acc = sum(h for h, _ in hits.values()) / max(1, len(items))
    per = {lang: h / n for lang, (h, n) in hits.items() if n}
    med = statistics.median(times) if times else float("nan")
    p95 = times[int(0.95 * (len(times) - 1))] if times else float("nan")
    return acc, med, p95, per


def _figures(acc: float, med: float, p95: float) -> dict:
    return {"accuracy": round(acc, 4), "median_us": round(med, 1), "p95_us": round(p95, 1)}


def measure(limit: int | None = None, langdetect: bool = True, shared: Path | None = None,
            data_dir: Path = TRAINING_DATA, progress: Callable[[str], None] | None = None) -> dict:
    """Both detectors on every set; a dict of figures (see `sets`), with `skipped` naming what was absent."""
    from triagebot.langid import MODEL_PATH, Model

    t0 = time.perf_counter()
    model = Model.load(MODEL_PATH)
    load_s = time.perf_counter() - t0
    baseline = LangDetect() if langdetect else None

    lingua = lingua_dir(shared)
    skipped: list[str] = []
    sets: dict[str, list[tuple[str, str]]] = {}
    if lingua.is_dir():
        sets = {kind: lingua_set(kind, limit, lingua) for kind in SETS}
    else:
        skipped.append(f"lingua test sets (not found at {lingua})")
    chat = slack_lines(data_dir, limit=3 * limit if limit else None)
    if chat:
        sets["own-slack-lines"] = chat
    if not langdetect:
        skipped.append("langdetect baseline (--no-langdetect)")
    out: dict = {"model": str(MODEL_PATH.relative_to(ROOT)) if MODEL_PATH.is_relative_to(ROOT) else str(MODEL_PATH),
                 "model_mb": round(MODEL_PATH.stat().st_size / 1e6, 2), "model_version": model.version,
                 "model_load_s": round(load_s, 3), "limit_per_language": limit, "sets": {}, "skipped": skipped}
    for i, name in enumerate(sets):
        items = sets[name]
        # a fresh model for each set: its word cache then holds no words of the sets before, so the
        # figures do not depend on the order of the sets
        fresh = model if i == 0 else Model.load(MODEL_PATH)
        acc, med, p95, per = run(lambda text: fresh.detect(text)[0], items)
        row: dict = {"n": len(items), "ours": {**_figures(acc, med, p95),
                                                "per_language": {k: round(v, 4) for k, v in per.items()}}}
        if baseline:
            b_acc, b_med, b_p95, _ = run(baseline, items)
            row["langdetect"] = _figures(b_acc, b_med, b_p95)
        out["sets"][name] = row
        if progress:
            progress(f"langid {name}: n={len(items)} ours {acc:.4f} {med:.0f} µs"
                     + (f", langdetect {row['langdetect']['accuracy']:.4f}" if baseline else ""))
    return out


def render(fig: dict) -> str:
    """The old script's table."""
    lines = [f"model {fig['model']}: {fig['model_mb']:.2f} MB, load {fig['model_load_s']:.3f} s, "
             f"version {fig['model_version']}"]
    header = (f"{'set':16s} {'n':>5s} | {'ours':>6s} {'med µs':>7s} {'p95 µs':>7s} | "
              f"{'langdet':>7s} {'med µs':>7s} {'p95 µs':>7s} | ours per language")
    lines += [header, "-" * len(header)]
    for name, row in fig["sets"].items():
        o = row["ours"]
        line = f"{name:16s} {row['n']:5d} | {o['accuracy']:6.4f} {o['median_us']:7.0f} {o['p95_us']:7.0f} | "
        b = row.get("langdetect")
        line += (f"{b['accuracy']:7.4f} {b['median_us']:7.0f} {b['p95_us']:7.0f} | " if b
                 else f"{'-':>7s} {'-':>7s} {'-':>7s} | ")
        lines.append(line + " ".join(f"{lang} {a:.3f}" for lang, a in o["per_language"].items()))
    lines += [f"(skipped: {s})" for s in fig["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="texts per language and set (default: all)")
    ap.add_argument("--no-langdetect", action="store_true", help="skip the langdetect baseline")
    ap.add_argument("--shared", type=Path, default=None, help="the shared folder (default: ../shared)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    fig = measure(args.limit, langdetect=not args.no_langdetect, shared=args.shared)
    print(json.dumps(fig) if args.json else render(fig), flush=True)
    return 0
