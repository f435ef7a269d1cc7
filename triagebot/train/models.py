"""The classifiers: one shared feature pipeline and one calibrated head per label, chosen by grouped CV."""
from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
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
from threadpoolctl import threadpool_limits

from triagebot.train.features import analyse as analyse_text
from triagebot.train.features import LEMMA_LANGUAGES, build_features, get_nlp, make_inputs

log = logging.getLogger(__name__)

LABELS = ("category", "service", "severity")
CALIBRATION_FOLDS = 5
CV_FOLDS = 5
# Every random choice in training takes this seed, so `triagebot train` on the same data, code and library
# versions gives the same model (same predictions, same figures). LinearSVC's dual solver shuffles the rows;
# with random_state=None it drew from NumPy's global generator, and two runs differed by ~1e-5 in probability.
SEED = 0
# what the model card records about randomness (models/<version>/model_card.json "reproducibility")
SEEDS = {"svm_random_state": SEED, "logreg_random_state": SEED, "calibration_split_seed": SEED,
         "cv": "GroupKFold by scenario (no shuffling)"}


def _calibrated(estimator: BaseEstimator, method: str) -> CalibratedClassifierCV:
    # ensemble=False: one estimator fitted on all data predicts, the calibrator learns from out-of-fold scores;
    # prediction then costs one linear model, not one per fold
    return CalibratedClassifierCV(estimator, method=method, cv=CALIBRATION_FOLDS, ensemble=False)


# name -> factory of an unfitted head; every head gives calibrated predict_proba. C values: grouped 5-fold CV
# on 1,257 training messages (svm C 0.1/0.3/0.5/1/2/5: mean macro-F1 .772/.785/.791/.795/.797/.794;
# logreg C 3/10/30: .788/.791/.793, at ten times the training time; Platt/sigmoid calibration because
# temperature scaling overflowed when a class was missing from a calibration fold).
CANDIDATES: dict[str, Callable[[], BaseEstimator]] = {
    "svm": lambda: _calibrated(LinearSVC(C=1.0, class_weight="balanced", random_state=SEED), "sigmoid"),
    "logreg": lambda: _calibrated(LogisticRegression(C=30.0, class_weight="balanced", max_iter=3000,
                                                     random_state=SEED), "sigmoid"),
    "cnb": lambda: _calibrated(ComplementNB(alpha=0.3), "sigmoid"),
}
DEFAULT_HEAD = "svm"


def grouped_splits(y: np.ndarray, groups: np.ndarray | None, n_splits: int,
                   seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
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
    # one BLAS/OpenMP thread: these fits are small, and lbfgs with a thread per core ran 7x slower on a
    # busy two-core machine than with one (oversubscription)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        # a class missing from one calibration fold is reported per fold; the class still gets scores
        warnings.filterwarnings("ignore", message=".*[Nn]umber of classes in training fold.*")
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        est.fit(Xt, y)
    if isinstance(est, CalibratedClassifierCV):
        # the split indices were only needed while fitting; keep the artifact free of them
        est.cv = CALIBRATION_FOLDS
    return est


class FastScorer:
    """The fitted model's arithmetic without scikit-learn's per-call input validation.

    scikit-learn 1.9 spends ~20 ms per single-row call validating input (dataframe sniffing in check_array)
    against well under 1 ms of arithmetic; the issue asks for ~1 ms for all three labels. This computes the
    same TF-IDF vector and the same linear scores and sigmoid calibration from the fitted attributes. It is
    built only for the head types it knows and checked against the scikit-learn path when built
    (`TriageClassifier.fast_path_error`); any difference disables it.
    """

    def __init__(self, model: "TriageClassifier") -> None:
        union = model.features_.named_steps["tfidf"]
        self.analyser = model.features_.named_steps["analyse"]
        self.lemmas = self.analyser.lemmas_
        self.vectorizers = []
        offset = 0
        for _name, vec in union.transformer_list:
            if vec.norm not in ("l2", None) or vec.binary or not vec.use_idf:
                raise ValueError(f"unsupported vectorizer settings ({vec.norm}, binary={vec.binary})")
            # char_wb n-grams never cross a word boundary, so each word's columns can be cached: words repeat
            # across messages, and generating ~600 n-grams per message in Python was half the cost
            per_word = ({} if vec.analyzer == "char_wb" and not vec.lowercase and vec.strip_accents is None
                        and vec.preprocessor is None else None)
            self.vectorizers.append((vec.build_analyzer(), vec.vocabulary_, np.asarray(vec.idf_, dtype=np.float64),
                                     bool(vec.sublinear_tf), vec.norm, offset, per_word))
            offset += len(vec.vocabulary_)
        self.n_features = offset
        self.heads = {}
        blocks_W, blocks_b, start = [], [], 0
        for label in model.labels:
            members = []
            for W, b, kind, pos, a, c0, n_classes in self._head(model.heads_[label]):
                # every linear score of every head in one matrix: one row gather and one product per message
                blocks_W.append(W)
                blocks_b.append(b)
                members.append((start, start + W.shape[1], kind, pos.tolist(), a.tolist(), c0.tolist(), n_classes))
                start += W.shape[1]
            self.heads[label] = members
        self.W = np.ascontiguousarray(np.hstack(blocks_W))
        self.b = np.concatenate(blocks_b)

    @staticmethod
    def _head(head: Any) -> list[tuple]:
        if not isinstance(head, CalibratedClassifierCV) or head.method != "sigmoid":
            raise ValueError(f"no fast path for {type(head).__name__}")
        members = []
        for cc in head.calibrated_classifiers_:
            est = cc.estimator
            if hasattr(est, "coef_") and hasattr(est, "intercept_") and hasattr(est, "decision_function"):
                # linear decision function: X @ coef.T + intercept; kept transposed for a row gather
                W = np.ascontiguousarray(np.asarray(est.coef_, dtype=np.float64).T)
                b = np.asarray(est.intercept_, dtype=np.float64).ravel()
                kind = "decision"
            elif isinstance(est, ComplementNB):
                W = np.ascontiguousarray(np.asarray(est.feature_log_prob_, dtype=np.float64).T)
                b = (np.asarray(est.class_log_prior_, dtype=np.float64) if len(est.classes_) == 1
                     else np.zeros(len(est.classes_)))
                kind = "softmax"
            else:
                raise ValueError(f"no fast path for {type(est).__name__}")
            pos = np.searchsorted(np.asarray(cc.classes, dtype=object).astype(str),
                                  np.asarray(est.classes_, dtype=object).astype(str))
            a = np.array([c.a_ for c in cc.calibrators], dtype=np.float64)
            c0 = np.array([c.b_ for c in cc.calibrators], dtype=np.float64)
            members.append((W, b, kind, pos, a, c0, len(cc.classes)))
        return members

    def vector(self, language: str, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(column indices, values) of the TF-IDF row for one message."""
        # what SpacyAnalyzer.transform does for one row, without building arrays around it
        tokens = " ".join(analyse_text(language, text[: self.analyser.max_chars], self.lemmas.get(language)))
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for analyse, vocab, idf, sublinear, norm, offset, per_word in self.vectorizers:
            if per_word is None:
                counts = Counter([j for j in map(vocab.get, analyse(tokens)) if j is not None])
            else:
                found: list[int] = []
                for word in tokens.split():
                    known = per_word.get(word)
                    if known is None:
                        known = [j for j in map(vocab.get, analyse(word)) if j is not None]
                        if len(per_word) < WORD_CACHE_SIZE:
                            per_word[word] = known
                    found.extend(known)
                counts = Counter(found)
            if not counts:
                continue
            idx = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            v = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            if sublinear:
                v = np.log(v) + 1.0
            v *= idf[idx]
            if norm == "l2":
                v /= np.sqrt(np.dot(v, v))
            cols.append(idx + offset)
            vals.append(v)
        if not cols:
            return np.zeros(0, dtype=np.intp), np.zeros(0)
        return np.concatenate(cols), np.concatenate(vals)

    def predict_one(self, language: str, text: str) -> dict[str, list[float]]:
        """label -> calibrated probabilities (classes_ order) for one message."""
        idx, val = self.vector(language, text)
        scores = (val @ self.W[idx] + self.b if len(idx) else self.b).tolist()
        # a handful of numbers per head: plain floats are faster here than numpy calls on tiny arrays
        out = {}
        for label, members in self.heads.items():
            total: list[float] | None = None
            for start, end, kind, pos, a, c0, n_classes in members:
                f = scores[start:end]
                if kind == "softmax":
                    top = max(f)
                    e = [math.exp(x - top) for x in f]
                    z = sum(e)
                    f = [x / z for x in e]
                    if len(f) == 2:
                        f = f[1:]
                cal = [_expit_neg(ai * fi + ci) for ai, fi, ci in zip(a, f, c0)]
                if n_classes == 2:
                    # binary: one score, for the second class (as _CalibratedClassifier does)
                    proba = [1.0 - cal[0], cal[0]]
                else:
                    proba = [0.0] * n_classes
                    for j, p in zip(pos, cal):
                        proba[j] = p
                    z = sum(proba)
                    proba = [p / z for p in proba] if z != 0 else [1.0 / n_classes] * n_classes
                proba = [1.0 if 1.0 < p <= 1.0 + 1e-5 else p for p in proba]
                total = proba if total is None else [t + p for t, p in zip(total, proba)]
            assert total is not None
            out[label] = [t / len(members) for t in total]
        return out


def _expit_neg(x: float) -> float:
    """1 / (1 + e^x), the sigmoid calibration of scikit-learn (expit(-x)), without overflow."""
    if x > 700.0:
        return 0.0
    return 1.0 / (1.0 + math.exp(x))


# words whose char n-gram columns are remembered (about 200 bytes each)
WORD_CACHE_SIZE = 100_000
# texts the fast path is checked on when it is built: one per language, with numbers and identifiers
FAST_PATH_PROBES = (
    ("en", "No data on 40 meters\nSince 06:00 about 40 of our water meters stopped reporting. ICCID 8946070120004815525"),
    ("sv", "Fråga om faktura\nHej! Vad kostar SMS i Danmark? Mvh Kalle, 070-123 45 67"),
    ("es", "Baja de SIM\nHola, por favor den de baja la SIM 8934011234567890128. Gracias."),
    ("other", "\n"),
)
FAST_PATH_TOLERANCE = 1e-5


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
        """label -> {class: probability} for one message (the fast path when it checked out)."""
        fast = self.fast_scorer()
        if fast is not None:
            probs = fast.predict_one(language, text)
            return {label: dict(zip(self.classes_[label], map(float, p))) for label, p in probs.items()}
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            full = self.predict_proba(make_inputs([language], [text]))
        return {label: dict(zip(self.classes_[label], map(float, p[0]))) for label, p in full.items()}

    def warm_up(self) -> None:
        """Build what the first prediction would otherwise build: the checked fast path, the spaCy tokenizers."""
        for language in LEMMA_LANGUAGES + ("other",):
            get_nlp(language)
        self.fast_scorer()

    def fast_scorer(self) -> FastScorer | None:
        """The validated fast path, built on first use; None when it is unsupported or disagrees."""
        if "_fast" not in self.__dict__:
            self._fast, self.fast_path_error = None, None
            try:
                fast = FastScorer(self)
                X = make_inputs([lang for lang, _ in FAST_PATH_PROBES], [t for _, t in FAST_PATH_PROBES])
                ref = self.predict_proba(X)
                for i, (lang, text) in enumerate(FAST_PATH_PROBES):
                    got = fast.predict_one(lang, text)
                    for label in self.labels:
                        diff = float(np.max(np.abs(np.asarray(got[label]) - ref[label][i])))
                        if not diff <= FAST_PATH_TOLERANCE:
                            raise ValueError(f"{label} differs by {diff:.2e} on probe {i}")
                self._fast = fast
            except Exception as e:  # noqa: BLE001 - any failure leaves the (slow, correct) scikit-learn path
                self.fast_path_error = f"{type(e).__name__}: {e}"
                log.warning("fast classification path disabled, using scikit-learn (about 20x slower): %s",
                            self.fast_path_error)
        return self._fast

    def __getstate__(self) -> dict:
        # the fast path is rebuilt (and re-checked) after loading, never saved
        state = dict(super().__getstate__())
        state.pop("_fast", None)
        state.pop("fast_path_error", None)
        return state


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
    folds: list[tuple[np.ndarray, np.ndarray]]
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
                   progress: Callable[[int], None] | None = None,
                   per_label_candidates: Mapping[str, Mapping[str, Callable[[], BaseEstimator]]] | None = None,
                   ) -> CVResult:
    """Grouped k-fold CV of every candidate head for every label; the features are refitted in each fold.

    `per_label_candidates` overrides `candidates` for the labels it names. `progress(1)` is called after
    each (fold, label, candidate) fit.
    """
    candidates = candidates or CANDIDATES
    per_label = {lab: dict((per_label_candidates or {}).get(lab) or candidates) for lab in labels}
    X = np.asarray(X, dtype=object)
    groups = np.asarray(groups, dtype=object)
    proto = features()
    # the spaCy analysis is stateless: run it once, refit only the vectorizers per fold
    tokens = proto.named_steps["analyse"].fit(X).transform(X)
    folds = list(GroupKFold(n_splits=min(n_splits, len(set(groups)))).split(tokens, groups=groups))
    classes = {lab: sorted({str(v) for v in Y[lab] if v is not None}) for lab in labels}
    oof = {lab: {c: np.full((len(X), len(classes[lab])), np.nan) for c in per_label[lab]} for lab in labels}
    for tr, te in folds:
        vec = clone(proto.named_steps["tfidf"])
        Xtr, Xte = vec.fit_transform(tokens[tr]), vec.transform(tokens[te])
        for lab in labels:
            y = np.asarray(Y[lab], dtype=object)
            mtr = np.array([v is not None for v in y[tr]])
            for name, make in per_label[lab].items():
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
                        for name in per_label[lab]}
    return CVResult(len(folds), folds, oof, classes, metrics)
