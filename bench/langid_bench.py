"""Language-identification benchmark: triagebot.langid against plain langdetect, same run, same texts.

Run: .venv/bin/python bench/langid_bench.py [--limit N] [--no-langdetect]

Sets: lingua's en/sv/es test files (sentences, word pairs, single words; evaluation only, see
/work/shared/corpora/lingua-langid-testdata/SOURCE.md) and the project's own Slack lines from
training/data/*.jsonl (the model trains on e-mail messages only, never on Slack lines).
Accuracy = the predicted label equals the file's language; `other` counts as wrong.
langdetect runs with DetectorFactory.seed = 0 and its answer is restricted to en/sv/es by taking
the most probable of the three in its full probability vector.
Times are wall-clock microseconds per text (median and 95th percentile), model already loaded.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from triagebot.langid import MODEL_PATH, Model  # noqa: E402

LINGUA = ROOT.parent / "shared" / "corpora" / "lingua-langid-testdata"
TRAINING_DATA = ROOT / "training" / "data"
LANGS = ("en", "sv", "es")
SETS = ("sentences", "word-pairs", "single-words")


def lingua_set(kind: str, limit: int | None) -> list[tuple[str, str]]:
    """(text, language) pairs of one lingua test set."""
    out = []
    for lang in LANGS:
        lines = [x for x in (LINGUA / kind / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        out += [(x, lang) for x in lines[:limit]]
    return out


def slack_lines() -> list[tuple[str, str]]:
    """Slack messages of the project's training files with their labelled language."""
    out = []
    for path in sorted(TRAINING_DATA.glob("*.jsonl")) if TRAINING_DATA.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("channel") == "slack" and rec.get("language") in LANGS + ("other",):
                out.append((rec.get("body") or "", rec["language"]))
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


def run(detect, items: list[tuple[str, str]]) -> tuple[float, float, float, dict[str, float]]:
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
    return acc, statistics.median(times), times[int(0.95 * (len(times) - 1))], per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="texts per language and set (default: all)")
    ap.add_argument("--no-langdetect", action="store_true", help="skip the langdetect baseline")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = Model.load(MODEL_PATH)
    load_s = time.perf_counter() - t0
    print(f"model {MODEL_PATH.relative_to(ROOT)}: {MODEL_PATH.stat().st_size / 1e6:.2f} MB, "
          f"load {load_s:.3f} s, version {model.version}")
    ours = lambda text: model.detect(text)[0]  # noqa: E731
    baseline = None if args.no_langdetect else LangDetect()

    sets = {kind: lingua_set(kind, args.limit) for kind in SETS} if LINGUA.is_dir() else {}
    chat = slack_lines()
    if chat:
        sets["own slack lines"] = chat
    header = f"{'set':16s} {'n':>5s} | {'ours':>6s} {'med µs':>7s} {'p95 µs':>7s} | {'langdet':>7s} {'med µs':>7s} {'p95 µs':>7s} | ours per language"
    print(header)
    print("-" * len(header))
    for name, items in sets.items():
        acc, med, p95, per = run(ours, items)
        line = f"{name:16s} {len(items):5d} | {acc:6.4f} {med:7.0f} {p95:7.0f} | "
        if baseline:
            b_acc, b_med, b_p95, _ = run(baseline, items)
            line += f"{b_acc:7.4f} {b_med:7.0f} {b_p95:7.0f} | "
        else:
            line += f"{'-':>7s} {'-':>7s} {'-':>7s} | "
        print(line + " ".join(f"{lang} {a:.3f}" for lang, a in per.items()), flush=True)
    if not LINGUA.is_dir():
        print(f"(lingua test files not found at {LINGUA})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
