"""`triagebot train`: fit the classifiers on the training split, score them on the held-out split, save them as a
new version and promote it unless it scores worse than the promoted one."""
from __future__ import annotations

import logging
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from triagebot.settings import ROOT
from triagebot.train import dataset as ds
from triagebot.train.models import (CANDIDATES, CV_FOLDS, DEFAULT_HEAD, LABELS, SEEDS, TriageClassifier,
                                    cross_validate, metrics_by_language)
from triagebot.train.registry import ModelError, Registry

log = logging.getLogger(__name__)

DATA_DIR = ROOT / "training" / "data"
MODELS_DIR = ROOT / "models"
# the short figures kept for each candidate in the card (the full per-class figures are in the report)
SUMMARY_KEYS = ("n", "accuracy", "macro_f1", "log_loss", "ece", "mean_conf_correct", "mean_conf_wrong")


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced and whether it was promoted."""

    version: str
    promoted: bool
    reason: str
    heldout_macro_f1: float
    current_version: str | None
    current_macro_f1: float | None
    heads: Mapping[str, str]
    metrics: Mapping[str, Any]
    card: Mapping[str, Any] = field(repr=False, default_factory=dict)
    seconds: float = 0.0


def summarize(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """language -> the SUMMARY_KEYS figures (drops per-class detail)."""
    return {lang: {k: _clean(m[k]) for k in SUMMARY_KEYS if k in m} for lang, m in metrics.items()}


def _clean(v: Any) -> Any:
    # JSON has no NaN; a figure that cannot be computed (no wrong predictions, say) is null
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 4)
    return v


def mean_macro_f1(heldout: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> float:
    """The promotion score: macro-F1 on the held-out split, averaged over the labels."""
    vals = [heldout[lab]["all"]["macro_f1"] for lab in LABELS if lab in heldout]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def score_model(model: TriageClassifier, X: np.ndarray, Y: Mapping[str, np.ndarray],
                languages: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """label -> language/"all" -> metrics of a fitted model on rows X."""
    out = {}
    probs = model.predict_proba(X) if len(X) else {}
    langs = np.asarray(languages, dtype=object)
    for lab in LABELS:
        y = np.asarray(Y[lab], dtype=object)
        m = np.array([v is not None for v in y], dtype=bool)
        if not m.any():
            continue
        out[lab] = metrics_by_language(y[m].astype(str), probs[lab][m], model.classes_[lab], langs[m])
    return out


def train(data_dir: Path | str = DATA_DIR, feedback: Iterable[ds.LabelledExample] = (), force: bool = False,
          progress: bool = True, models_dir: Path | str = MODELS_DIR, select: bool = True,
          cv_folds: int = CV_FOLDS, candidates: Sequence[str] | None = None) -> TrainResult:
    """Train, evaluate on the held-out split, save a new version and promote it unless it is worse.

    `feedback` are agent corrections (see dataset.examples_from_feedback). With `select` every candidate head
    is cross-validated (grouped by scenario) on the training split and the best per label is kept; without,
    the default head is used and no CV is run (quick, for tests). `force` promotes even a worse model.
    """
    started = time.time()
    dataset = ds.load_dataset(data_dir, feedback)
    train_ex, test_ex = dataset.split()
    if not train_ex:
        raise ds.DatasetError(f"{data_dir}: no training examples after the held-out split")
    names = list(candidates or CANDIDATES)
    n_cv = cv_folds * len(LABELS) * len(names) if select else 0
    bar = tqdm(total=len(dataset.examples) + n_cv + len(LABELS) + 2, disable=not progress, unit="step",
               desc="train", leave=True)
    try:
        bar.set_description("normalize")
        X_train = _inputs(train_ex, bar)
        X_test = _inputs(test_ex, bar)
        Y_train = {lab: ds.label_array(train_ex, lab) for lab in LABELS}
        Y_test = {lab: ds.label_array(test_ex, lab) for lab in LABELS}
        groups = ds.groups_array(train_ex)
        lang_train = [e.language for e in train_ex]
        lang_test = [e.language for e in test_ex]

        heads: dict[str, str] = {lab: DEFAULT_HEAD for lab in LABELS}
        cv_summary: dict[str, Any] = {}
        if select:
            bar.set_description("cross-validate")
            cv = cross_validate(X_train, Y_train, groups, lang_train, {n: CANDIDATES[n] for n in names},
                                n_splits=cv_folds, progress=bar.update)
            heads = {lab: cv.best(lab) for lab in LABELS}
            cv_summary = {"folds": cv.n_splits, "grouped_by": "scenario",
                          "candidates": {lab: {c: summarize(cv.metrics[lab][c]) for c in cv.metrics[lab]}
                                         for lab in LABELS},
                          "chosen": {lab: summarize(cv.metrics[lab][heads[lab]]) for lab in LABELS}}

        bar.set_description("fit")
        model = TriageClassifier(heads={lab: CANDIDATES[heads[lab]]() for lab in LABELS})
        model.fit(X_train, Y_train, groups)
        bar.update(len(LABELS))

        bar.set_description("held-out")
        heldout = score_model(model, X_test, Y_test, lang_test)
        score = mean_macro_f1(heldout)
        predicted = model.predict(X_test) if len(X_test) else {lab: [] for lab in LABELS}
        bar.update(1)

        registry = Registry(models_dir)
        current_version, current_score, why_no_current = _current_score(registry, X_test, Y_test, lang_test)
        card = {
            "kind": "triagebot text classifiers (category, service, severity)",
            "training_data": {
                "hash": dataset.data_hash, "hash_method": ds.HASH_METHOD,
                "files": [Path(f).name for f in dataset.files], "file_sha256": dict(dataset.file_sha256),
                # the model input rows (language, normalized text): changes when normalization does
                "inputs_sha256": ds.inputs_sha256(X_train, X_test),
                "n_examples": len(dataset.examples), "n_feedback": dataset.n_feedback,
                "n_train": len(train_ex), "n_test": len(test_ex),
                "n_train_groups": len({e.group for e in train_ex}), "n_test_groups": len({e.group for e in test_ex}),
                "split": {"by": "scenario", "salt": ds.SPLIT_SALT, "test_fraction": ds.TEST_FRACTION},
                "languages_train": _counts(lang_train), "languages_test": _counts(lang_test),
            },
            "input": "language + subject + '\\n' + Message.text (normalized new text) via features.model_text",
            "features": _feature_summary(model),
            "labels": {lab: {"classes": model.classes_[lab], "head": heads[lab],
                             "train_counts": _counts(v for v in Y_train[lab] if v is not None)} for lab in LABELS},
            "metrics": {
                "heldout_macro_f1": _clean(score),
                "heldout": {lab: summarize(heldout[lab]) for lab in heldout},
                "heldout_per_class": {lab: {c: {k: _clean(v) for k, v in d.items()}
                                            for c, d in heldout[lab]["all"]["per_class"].items()}
                                      for lab in heldout},
                "cv": cv_summary,
            },
            "reproducibility": {
                "command": "triagebot train" + ("" if select else " --no-select"),
                "note": ("the same training_data.hash (0 feedback rows: `triagebot train` adds the agents' "
                         "corrections from the database), code and libraries give the same predictions "
                         "(heldout_predictions_sha256) and figures"),
                "select": select, "cv_folds": cv_folds if select else None, "candidates": names if select else [],
                "seeds": dict(SEEDS, split_salt=ds.SPLIT_SALT),
                "heldout_predictions_sha256": ds.predictions_sha256([e.id for e in test_ex], predicted),
                "code": code_version(),
            },
        }
        bar.set_description("save")
        version = registry.save(model, card)
        bar.update(1)
    finally:
        bar.close()

    promote, reason = _decide(score, current_version, current_score, why_no_current, force)
    if promote:
        registry.promote(version, reason=reason, forced=force and current_score is not None and score < current_score)
    log.info("trained %s: held-out macro-F1 %.3f; %s", version, score, reason)
    return TrainResult(version, promote, reason, score, current_version, current_score, heads,
                       card["metrics"], registry.card(version), time.time() - started)


def code_version() -> dict[str, Any]:
    """The git commit of the code, and whether the files that shape a model differ from it (None without git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "triagebot", "training", "pyproject.toml") if commit else None
    return {"git_commit": commit, "uncommitted_changes": bool(status) if status is not None else None}


def _feature_summary(model: TriageClassifier) -> dict[str, Any]:
    """The feature settings and sizes, for the card."""
    out: dict[str, Any] = {"analyser": "spaCy blank tokenizer (punctuation rules) + spacy-lookups-data lemma_lookup",
                           "lemma_entries": {k: len(v) for k, v in model.features_.named_steps["analyse"].lemmas_.items()}}
    for name, vec in model.features_.named_steps["tfidf"].transformer_list:
        out[name] = {"analyzer": vec.analyzer, "ngram_range": list(vec.ngram_range), "min_df": vec.min_df,
                     "max_features": vec.max_features, "sublinear_tf": vec.sublinear_tf,
                     "n_features": len(vec.vocabulary_)}
    return out


def _counts(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _inputs(examples: Sequence[ds.LabelledExample], bar: tqdm) -> np.ndarray:
    rows = []
    for ex in examples:
        rows.append(ds.model_inputs([ex])[0])
        bar.update(1)
    arr = np.empty((len(rows), 2), dtype=object)
    for i, r in enumerate(rows):
        arr[i] = r
    return arr


def _current_score(registry: Registry, X_test: np.ndarray, Y_test: Mapping[str, np.ndarray],
                   lang_test: Sequence[str]) -> tuple[str | None, float | None, str]:
    """The promoted version and its macro-F1 on this run's held-out rows (None if it cannot be scored)."""
    try:
        current = registry.promoted()
    except ModelError as e:
        return None, None, str(e)
    if not current:
        return None, None, "no model was promoted before"
    try:
        loaded = registry.load(current)
    except ModelError as e:
        # a model this process cannot load is no baseline: it could not serve either
        return current, None, f"current model {current} cannot be loaded ({e})"
    if not len(X_test):
        return current, None, "the held-out split is empty"
    return current, mean_macro_f1(score_model(loaded.model, X_test, Y_test, lang_test)), ""


def _decide(score: float, current_version: str | None, current_score: float | None, why: str,
            force: bool) -> tuple[bool, str]:
    if current_version is None:
        return True, f"promoted: {why}"
    if current_score is None:
        if force:
            return True, f"promoted (forced): {why}"
        if "cannot be loaded" in why:
            return True, f"promoted: {why}"
        return False, f"not promoted: {why}; use --force to promote anyway"
    if math.isnan(score):
        return (True, "promoted (forced): no held-out score") if force else (
            False, "not promoted: no held-out score; use --force to promote anyway")
    if score < current_score:
        if force:
            return True, (f"promoted (forced): held-out macro-F1 {score:.4f} < {current_score:.4f} "
                          f"of {current_version}")
        return False, (f"not promoted: held-out macro-F1 {score:.4f} is worse than {current_score:.4f} "
                       f"of the promoted {current_version}; use --force to promote anyway")
    return True, f"promoted: held-out macro-F1 {score:.4f} >= {current_score:.4f} of {current_version}"
