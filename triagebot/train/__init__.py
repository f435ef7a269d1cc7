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
                 out: Callable[[str], None] = print) -> int:
    """`triagebot evaluate [OUT_DIR] [--version V] [--no-cv]`: write report.html and report.json."""
    from triagebot.train.dataset import DatasetError
    from triagebot.train.evaluate import REPORT_JSON, evaluate
    from triagebot.train.registry import ModelError
    from triagebot.train.train import DATA_DIR, MODELS_DIR

    try:
        path = evaluate(out_dir, models_dir or MODELS_DIR, data_dir or DATA_DIR, version=version, cv=cv,
                        progress=progress)
    except (DatasetError, ModelError) as e:
        out(f"error: {e}")
        return EXIT_ERROR
    out(f"report: {path}")
    out(f"figures: {path.parent / REPORT_JSON}")
    return EXIT_OK


def cli_models(action: str = "list", version: str | None = None, models_dir: Path | str | None = None,
               out: Callable[[str], None] = print) -> int:
    """`triagebot models [list | promote VERSION | rollback]`."""
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
        else:
            out(f"error: unknown action {action!r} (list, promote, rollback)")
            return EXIT_ERROR
    except ModelError as e:
        out(f"error: {e}")
        return EXIT_ERROR
    return EXIT_OK
