"""The classifiers: one shared feature pipeline and one calibrated head per label, chosen by grouped CV."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.naive_bayes import ComplementNB
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from triagebot.train.features import build_features, make_inputs

LABELS = ("category", "service", "severity")
CALIBRATION_FOLDS = 5
CV_FOLDS = 5


def _calibrated(estimator: BaseEstimator, method: str) -> CalibratedClassifierCV:
    # ensemble=False: one estimator fitted on all data predicts, the calibrator learns from out-of-fold scores;
    # prediction then costs one linear model, not one per fold
    return CalibratedClassifierCV(estimator, method=method, cv=CALIBRATION_FOLDS, ensemble=False)


# name -> factory of an unfitted head; every head gives calibrated predict_proba
CANDIDATES: dict[str, Callable[[], BaseEstimator]] = {
    "logreg": lambda: _calibrated(LogisticRegression(C=10.0, class_weight="balanced", max_iter=3000), "sigmoid"),
    "svm_sigmoid": lambda: _calibrated(LinearSVC(C=0.5, class_weight="balanced"), "sigmoid"),
    "cnb": lambda: _calibrated(ComplementNB(alpha=0.3), "sigmoid"),
}
DEFAULT_HEAD = "svm_sigmoid"


def grouped_splits(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """CV splits that keep a scenario group on one side, stratified where the data allows.

    Paraphrases of one scenario on both sides of a split make scores (and so the calibration learnt from
    them) look better than they will be on new messages; see TRAINING_DATA.md "Keep an honest split".
    """
    n_groups = len(set(groups)) if groups is not None else 0
    idx = np.zeros(len(y))
    if groups is not None and n_groups >= n_splits:
        with warnings.catch_warnings():
            # "The least populated class in y has only 1 members": expected for rare classes
            warnings.simplefilter("ignore", UserWarning)
            try:
                return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                            .split(idx, y, groups))
            except ValueError:
                return list(GroupKFold(n_splits=n_splits).split(idx, y, groups))
    k = max(2, min(n_splits, int(np.min(np.unique(y, return_counts=True)[1]))))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y))


def fit_head(head: BaseEstimator, Xt: Any, y: np.ndarray, groups: np.ndarray | None) -> BaseEstimator:
    """Fit one head; a calibrated head calibrates on grouped out-of-fold scores."""
    est = clone(head)
    if isinstance(est, CalibratedClassifierCV) and not isinstance(est.cv, list):
        n = est.cv if isinstance(est.cv, int) else CALIBRATION_FOLDS
        est.set_params(cv=grouped_splits(y, groups, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # a class missing from one calibration fold is reported per fold; the class still gets scores
        warnings.filterwarnings("ignore", message=".*[Nn]umber of classes in training fold.*")
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        est.fit(Xt, y)
    if isinstance(est, CalibratedClassifierCV):
        # the split indices were only needed while fitting; keep the artifact free of them
        est.cv = CALIBRATION_FOLDS
    return est


class TriageClassifier(BaseEstimator):
    """Category, service and severity from (language, text) rows: shared features, one head per label.

    `heads` maps a label to an unfitted classifier (by default the CANDIDATES entry `DEFAULT_HEAD`).
    Learned: `features_` (fitted feature pipeline), `heads_` (fitted heads), `classes_` (label -> classes).
    """

    def __init__(self, heads: Mapping[str, BaseEstimator] | None = None, features: Pipeline | None = None,
                 labels: Sequence[str] = LABELS) -> None:
        self.heads = heads
        self.features = features
        self.labels = labels

    def fit(self, X: Any, Y: Mapping[str, np.ndarray], groups: np.ndarray | None = None) -> "TriageClassifier":
        """Fit the features on all rows, then each head on the rows that carry its label."""
        X = np.asarray(X, dtype=object)
        self.features_ = clone(self.features) if self.features is not None else build_features()
        Xt = self.features_.fit_transform(X)
        groups = None if groups is None else np.asarray(groups, dtype=object)
        self.heads_ = {}
        self.classes_ = {}
        for label in self.labels:
            y = np.asarray(Y[label], dtype=object)
            mask = np.array([v is not None for v in y])
            head = (self.heads or {}).get(label) or CANDIDATES[DEFAULT_HEAD]()
            fitted = fit_head(head, Xt[mask], y[mask].astype(str), None if groups is None else groups[mask])
            self.heads_[label] = fitted
            self.classes_[label] = [str(c) for c in fitted.classes_]
        return self

    def predict_proba(self, X: Any) -> dict[str, np.ndarray]:
        """label -> (n, n_classes) calibrated probabilities, columns in classes_[label] order."""
        Xt = self.features_.transform(np.asarray(X, dtype=object))
        with sklearn.config_context(assume_finite=True):
            return {label: self.heads_[label].predict_proba(Xt) for label in self.labels}

    def predict(self, X: Any) -> dict[str, np.ndarray]:
        """label -> predicted class per row (the most probable)."""
        return {label: np.asarray(self.classes_[label], dtype=object)[p.argmax(axis=1)]
                for label, p in self.predict_proba(X).items()}

    def predict_one(self, language: str, text: str) -> dict[str, dict[str, float]]:
        """label -> {class: probability} for one message."""
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            probs = self.predict_proba(make_inputs([language], [text]))
        return {label: dict(zip(self.classes_[label], map(float, p[0]))) for label, p in probs.items()}


@dataclass(frozen=True)
class HeadChoice:
    """Which candidate was chosen for a label and the CV figures of every candidate."""

    label: str
    chosen: str
    scores: Mapping[str, Mapping[str, float]]


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: how far confidence is from accuracy, averaged over equal-width confidence bins."""
    conf = np.asarray(conf, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if len(conf) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def label_metrics(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, log loss, ECE and per-class precision/recall/F1 for one label."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=object).astype(str)
    classes = [str(c) for c in classes]
    pred = np.asarray(classes, dtype=object)[proba.argmax(axis=1)].astype(str)
    conf = proba.max(axis=1)
    correct = pred == y_true
    present = sorted(set(y_true) | set(pred))
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=present, zero_division=0)
    known = np.isin(y_true, classes)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)) if len(y_true) else float("nan"),
        # macro over the classes that occur in the truth: a class absent from a small test set is not scored
        "macro_f1": float(f1_score(y_true, pred, labels=sorted(set(y_true)), average="macro", zero_division=0))
        if len(y_true) else float("nan"),
        "log_loss": float(log_loss(y_true[known], proba[known], labels=classes)) if known.sum() > 0 else float("nan"),
        "ece": expected_calibration_error(conf, correct),
        "mean_conf_correct": float(conf[correct].mean()) if correct.any() else float("nan"),
        "mean_conf_wrong": float(conf[~correct].mean()) if (~correct).any() else float("nan"),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(present)},
    }
    return out


def metrics_by_language(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str],
                        languages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """label_metrics for all rows ("all") and for each language separately."""
    languages = np.asarray(languages, dtype=object)
    y_true = np.asarray(y_true, dtype=object)
    out = {"all": label_metrics(y_true, proba, classes)}
    for lang in sorted(set(languages)):
        m = languages == lang
        out[str(lang)] = label_metrics(y_true[m], proba[m], classes)
    return out


@dataclass
class CVResult:
    """Out-of-fold probabilities and metrics per label and candidate from grouped cross-validation."""

    n_splits: int
    oof: dict[str, dict[str, np.ndarray]]           # label -> candidate -> (n, k) probabilities
    classes: dict[str, list[str]]
    metrics: dict[str, dict[str, dict[str, Any]]]   # label -> candidate -> language/"all" -> metrics

    def best(self, label: str) -> str:
        """The candidate with the highest macro-F1 (ties: lower log loss)."""
        ms = self.metrics[label]
        return max(ms, key=lambda c: (round(ms[c]["all"]["macro_f1"], 4), -ms[c]["all"]["log_loss"]))


def cross_validate(X: Any, Y: Mapping[str, np.ndarray], groups: np.ndarray, languages: Sequence[str],
                   candidates: Mapping[str, Callable[[], BaseEstimator]] | None = None,
                   labels: Sequence[str] = LABELS, n_splits: int = CV_FOLDS,
                   features: Callable[[], Pipeline] = build_features,
                   progress: Callable[[int], None] | None = None) -> CVResult:
    """Grouped k-fold CV of every candidate head for every label; the features are refitted in each fold.

    `progress(1)` is called after each (fold, label, candidate) fit.
    """
    candidates = candidates or CANDIDATES
    X = np.asarray(X, dtype=object)
    groups = np.asarray(groups, dtype=object)
    proto = features()
    # the spaCy analysis is stateless: run it once, refit only the vectorizers per fold
    tokens = proto.named_steps["analyse"].transform(X)
    folds = list(GroupKFold(n_splits=min(n_splits, len(set(groups)))).split(tokens, groups=groups))
    classes = {lab: sorted({str(v) for v in Y[lab] if v is not None}) for lab in labels}
    oof = {lab: {c: np.full((len(X), len(classes[lab])), np.nan) for c in candidates} for lab in labels}
    for tr, te in folds:
        vec = clone(proto.named_steps["tfidf"])
        Xtr, Xte = vec.fit_transform(tokens[tr]), vec.transform(tokens[te])
        for lab in labels:
            y = np.asarray(Y[lab], dtype=object)
            mtr = np.array([v is not None for v in y[tr]])
            for name, make in candidates.items():
                est = fit_head(make(), Xtr[mtr], y[tr][mtr].astype(str), groups[tr][mtr])
                p = est.predict_proba(Xte)
                col = [classes[lab].index(str(c)) for c in est.classes_]
                block = np.zeros((len(te), len(classes[lab])))
                block[:, col] = p
                oof[lab][name][te] = block
                if progress:
                    progress(1)
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    langs = np.asarray(languages, dtype=object)
    for lab in labels:
        y = np.asarray(Y[lab], dtype=object)
        m = np.array([v is not None for v in y])
        metrics[lab] = {name: metrics_by_language(y[m].astype(str), oof[lab][name][m], classes[lab], langs[m])
                        for name in candidates}
    return CVResult(len(folds), oof, classes, metrics)
