"""Training, evaluation and the model registry of the text classifiers (category, service, severity).

The CLI (`triagebot train | evaluate | models`) calls the three `cli_*` functions below; each prints
what a person needs and returns the exit status.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_PROMOTED = 2   # trained and saved, but worse than the promoted model on the held-out split


def cli_train(data_dir: Path | str | None = None, models_dir: Path | str | None = None,
              feedback_rows: Iterable[Any] = (), force: bool = False, progress: bool = True,
              select: bool = True, out: Callable[[str], None] = print) -> int:
    """`triagebot train [--force] [--no-select]`: retrain from training/ plus feedback rows and maybe promote."""
    from triagebot.train.dataset import DatasetError, examples_from_feedback
    from triagebot.train.registry import ModelError
    from triagebot.train.train import DATA_DIR, MODELS_DIR, train

    try:
        result = train(data_dir or DATA_DIR, examples_from_feedback(feedback_rows), force=force, progress=progress,
                       models_dir=models_dir or MODELS_DIR, select=select)
    except (DatasetError, ModelError) as e:
        out(f"error: {e}")
        return EXIT_ERROR
    out(f"version {result.version} ({result.seconds:.0f} s); heads: "
        + ", ".join(f"{k}={v}" for k, v in result.heads.items()))
    for label, per_lang in result.metrics["heldout"].items():
        out(f"  held-out {label:9s} " + "  ".join(
            f"{lang}: acc {m['accuracy']:.3f} F1 {m['macro_f1']:.3f}" for lang, m in per_lang.items()
            if m.get("accuracy") is not None and m.get("macro_f1") is not None))
    out(result.reason)
    return EXIT_OK if result.promoted else EXIT_NOT_PROMOTED


def cli_evaluate(out_dir: Path | str, models_dir: Path | str | None = None, data_dir: Path | str | None = None,
                 version: str | None = None, cv: bool = True, progress: bool = True,
                 eval_set: Path | str | None = None, use_eval_set: bool = True, settings: Any = None,
                 out: Callable[[str], None] = print) -> int:
    """`triagebot evaluate [OUT_DIR] [--version V] [--no-cv] [--eval-set PATH | --no-eval-set]`.

    Writes report.html and report.json. The evaluation set defaults to training/eval/independent.jsonl when
    it exists; a named file that does not exist is an error.
    """
    import json

    from triagebot.train.dataset import DatasetError
    from triagebot.train.evalset import HEADLINE, default_eval_set
    from triagebot.train.evaluate import REPORT_JSON, evaluate
    from triagebot.train.registry import ModelError
    from triagebot.train.train import DATA_DIR, MODELS_DIR

    chosen = (eval_set if eval_set is not None else default_eval_set()) if use_eval_set else None
    try:
        path = evaluate(out_dir, models_dir or MODELS_DIR, data_dir or DATA_DIR, version=version, cv=cv,
                        progress=progress, eval_set=chosen, settings=settings)
    except (DatasetError, ModelError) as e:
        out(f"error: {e}")
        return EXIT_ERROR
    report = json.loads((path.parent / REPORT_JSON).read_text(encoding="utf-8"))
    out(f"model {report['model']['version']}: held-out macro-F1 {_f(report.get('heldout_macro_f1'))} "
        f"({report['data']['n_test']} messages)")
    ev = report.get("eval_set")
    if ev:
        out(f"eval set {ev['path']} ({ev['n']} messages, whole pipeline), accuracy:")
        for group in ev["labels"]["category"]:
            out(f"  {group:5s} " + "  ".join(f"{lab} {_f(ev['labels'][lab][group]['accuracy'])}" for lab in HEADLINE))
    elif use_eval_set:
        out("no evaluation set (training/eval/independent.jsonl not found; --eval-set PATH names one)")
    out(f"report: {path}")
    out(f"figures: {path.parent / REPORT_JSON}")
    return EXIT_OK


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def cli_models(action: str = "list", version: str | None = None, models_dir: Path | str | None = None,
               out: Callable[[str], None] = print) -> int:
    """`triagebot models [list | promote VERSION | rollback | remove VERSION]`."""
    from triagebot.train.registry import ModelError, Registry
    from triagebot.train.train import MODELS_DIR

    registry = Registry(models_dir or MODELS_DIR)
    try:
        if action == "list":
            versions = registry.versions()
            if not versions:
                out(f"no models in {registry.dir}")
            for v in versions:
                f1 = f"{v.heldout_macro_f1:.4f}" if v.heldout_macro_f1 is not None else "–"
                out(f"{'*' if v.promoted else ' '} {v.version}  created {v.created}  held-out macro-F1 {f1}  "
                    f"n_train {v.n_train}  data {(v.data_hash or '')[:12]}")
        elif action == "promote":
            if not version:
                out("error: promote needs a VERSION (see `triagebot models`)")
                return EXIT_ERROR
            registry.load(version)   # refuse to promote what cannot be loaded here
            registry.promote(version, reason="promoted by hand")
            out(f"promoted {version}")
        elif action == "rollback":
            out(f"rolled back to {registry.rollback(reason='rolled back by hand')}")
        elif action == "remove":
            if not version:
                out("error: remove needs a VERSION (see `triagebot models`)")
                return EXIT_ERROR
            registry.remove(version, reason="removed by hand")
            out(f"removed {version}")
        else:
            out(f"error: unknown action {action!r} (list, promote, rollback, remove)")
            return EXIT_ERROR
    except ModelError as e:
        out(f"error: {e}")
        return EXIT_ERROR
    return EXIT_OK
