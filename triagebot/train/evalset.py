"""The independent evaluation set through the whole triage pipeline.

training/eval/independent.jsonl holds messages written apart from the training data (same schema as
training/SCHEMA.md, plus `tier`, `estimate` and `identifiers` labels). Each one is turned into a Message
the way training and the bench do it (`normalize.message_from_text`: HTML to text, quoted mail and
signature split off, Slack mrkdwn) and run through `Pipeline.default`: disposition, language detection,
customer, the classifiers of the model under evaluation, blast radius and the severity policy. The figures
are therefore what the bot decides, not what one classifier scores on the labelled language: `severity` is
the final severity after the policy table, `severity_model` the classifier's before it.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from triagebot.model import CATEGORIES, ID_KINDS, LANGUAGES, SERVICES, SEVERITIES, TIERS, Message, Triage
from triagebot.settings import ROOT, Settings
from triagebot.train import dataset as ds
from triagebot.train.registry import LoadedModel

EVAL_DIR = ROOT / "training" / "eval"
EVAL_SET = EVAL_DIR / "independent.jsonl"
# the labels scored with classes (per-class precision/recall/F1 and a confusion matrix)
CLASS_LABELS = ("language", "category", "service", "severity", "severity_model", "tier")
# the labels reported first, in this order (the ones the issue names)
HEADLINE = ("language", "category", "service", "severity", "tier", "estimate")
ORDER: dict[str, tuple[str, ...]] = {"language": LANGUAGES, "category": CATEGORIES, "service": SERVICES,
                                     "severity": SEVERITIES, "severity_model": SEVERITIES, "tier": TIERS}
NONE = "(none)"          # what the pipeline left empty (a message it did not treat as a case)
MAX_MISTAKES = 40


def default_eval_set() -> Path | None:
    """training/eval/ (every *.jsonl in it) when it has one (a checkout without it evaluates without the section)."""
    return EVAL_DIR if eval_files(EVAL_DIR) else None


def eval_files(path: Path | str) -> list[Path]:
    """The files of an evaluation set: the file itself, or the *.jsonl of a directory in name order."""
    path = Path(path)
    return sorted(path.glob("*.jsonl")) if path.is_dir() else ([path] if path.is_file() else [])


def load_eval_set(path: Path | str) -> list[ds.LabelledExample]:
    """The labelled messages of an evaluation file or directory, validated like training data
    (DatasetError names file:line)."""
    files = eval_files(path)
    if not files:
        raise ds.DatasetError(f"{path}: no such evaluation set")
    examples, errors = [], []
    for f in files:
        exs, errs = _load_records(f)
        examples += exs
        errors += errs
    for ex in examples:
        if ex.extra.get("disposition", "case") != "case":
            continue
        if "tier" not in ex.extra:
            errors.append(f"{ex.origin}: labels: missing 'tier'")
        if "estimate" not in ex.extra:
            errors.append(f"{ex.origin}: labels: missing 'estimate'")
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.id in seen:
            errors.append(f"{ex.origin}: id {ex.id!r} already used at {seen[ex.id]}")
        seen.setdefault(ex.id, ex.origin)
    if errors:
        shown = errors[:ds.MAX_ERRORS_SHOWN]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise ds.DatasetError(f"{len(errors)} problem(s) in the evaluation set:\n" + "\n".join(shown) + more)
    if not examples:
        raise ds.DatasetError(f"{path}: no messages")
    return examples


NOT_CASES = ("auto_reply", "bounce")


def _load_records(path: Path) -> tuple[list[ds.LabelledExample], list[str]]:
    """Like dataset.load_file, and also lines labelled `disposition` auto_reply/bounce (their other labels
    are null: they are never classified) and an optional `headers` object the message arrives with."""
    examples: list[ds.LabelledExample] = []
    errors: list[str] = []
    for where, rec in ds.read_records(path, errors):
        labels = rec.get("labels") if isinstance(rec, dict) else None
        disposition = labels.get("disposition", "case") if isinstance(labels, dict) else "case"
        if disposition not in ("case",) + NOT_CASES:
            errors.append(f"{where}: labels: disposition {disposition!r} is not one of case, {', '.join(NOT_CASES)}")
            continue
        if disposition != "case":  # only the message fields are checked; the labels stay null
            rec = {**rec, "labels": {k: v for k, v in labels.items() if k not in ds.LABEL_VALUES}}
            problems = [p for p in ds._check({**rec, "labels": {}}, where) if "labels:" not in p]
        else:
            problems = ds._check(rec, where)
        if rec.get("headers") is not None and not isinstance(rec["headers"], dict):
            problems.append(f"{where}: 'headers' should be an object")
        if problems:
            errors.extend(problems)
            continue
        ex = ds.example_from_record(rec, where)
        extra = dict(ex.extra)
        extra.setdefault("disposition", "case")
        if rec.get("headers"):
            extra["headers"] = dict(rec["headers"])
        examples.append(replace(ex, extra=extra))
    return examples, errors


class _FixedHandle:
    """Stands in for ModelHandle: always the model under evaluation (which need not be the promoted one)."""

    error: str | None = None

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def get(self) -> LoadedModel:
        return self.loaded


class _Recording:
    """Wraps the classify step to keep what the classifiers said before the severity policy changed it."""

    def __init__(self, step: Any) -> None:
        self.step = step
        self.name = step.name
        self.last: Triage | None = None

    def __call__(self, message: Message, triage: Triage) -> Triage:
        self.last = self.step(message, triage)
        return self.last


def build_pipeline(loaded: LoadedModel, models_dir: Path | str, settings: Settings) -> tuple[Any, _Recording]:
    """Pipeline.default with the model under evaluation in the classify step (and the recorder around it).

    The language model is the one in models_dir/langid when there is one, else the shipped one.
    """
    from triagebot.langid import MODEL_PATH
    from triagebot.pipeline import Pipeline
    from triagebot.steps.classify import ClassifyStep

    lang_dir = Path(models_dir) if (Path(models_dir) / "langid" / MODEL_PATH.name).is_file() else MODEL_PATH.parents[1]
    pipeline = Pipeline.default(replace(settings, models_dir=lang_dir))
    recorder = _Recording(ClassifyStep(settings=settings, handle=_FixedHandle(loaded)))  # type: ignore[arg-type]
    steps = tuple(recorder if s.name == "classify" else s for s in pipeline.steps)
    if recorder not in steps:
        raise RuntimeError("Pipeline.default has no classify step")
    return Pipeline(steps), recorder


@dataclass(frozen=True)
class Outcome:
    """Expected and decided values of one message."""

    example: ds.LabelledExample
    expected: Mapping[str, Any]
    predicted: Mapping[str, Any]
    disposition: str


def expected_values(ex: ds.LabelledExample) -> dict[str, Any]:
    return {"disposition": ex.extra.get("disposition", "case"),
            "language": ex.language, "category": ex.labels["category"], "service": ex.labels["service"],
            "severity": ex.labels["severity"], "severity_model": ex.labels["severity"],
            "tier": ex.extra.get("tier"), "estimate": ex.extra.get("estimate"),
            "identifiers": {k: list((ex.extra.get("identifiers") or {}).get(k) or []) for k in ID_KINDS}}


def run_pipeline(examples: Sequence[ds.LabelledExample], loaded: LoadedModel, models_dir: Path | str,
                 settings: Settings, progress: Any = None) -> list[Outcome]:
    """Every example through the pipeline; its expected and decided labels."""
    from triagebot.normalize import message_from_text

    pipeline, recorder = build_pipeline(loaded, models_dir, settings)
    out = []
    for ex in examples:
        message = message_from_text(ex.channel, ex.subject, ex.body, ex.html, headers=ex.extra.get("headers"))
        recorder.last = None
        t = pipeline.run(message)
        before = recorder.last
        out.append(Outcome(ex, expected_values(ex), {
            "disposition": t.disposition, "language": t.language, "category": t.category, "service": t.service, "severity": t.severity,
            "severity_model": before.severity if before is not None else None,
            "tier": t.blast_radius.tier, "estimate": t.blast_radius.estimate,
            "identifiers": t.blast_radius.identifiers.as_dict()}, t.disposition))
        if progress:
            progress(1)
    return out


def _s(v: Any) -> str:
    return NONE if v is None else str(v)


def class_metrics(truth: Sequence[Any], pred: Sequence[Any], order: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the true classes), per-class precision/recall/F1 and the confusion matrix."""
    t = np.array([_s(v) for v in truth], dtype=object)
    p = np.array([_s(v) for v in pred], dtype=object)
    present = set(t) | set(p)
    labels = [c for c in order if c in present] + sorted(present - set(order))
    out: dict[str, Any] = {"n": int(len(t)), "accuracy": float(np.mean(t == p)) if len(t) else None}
    if not len(t):
        return {**out, "macro_f1": None, "per_class": {}, "confusion": {"labels": [], "matrix": []}}
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    true_classes = [c for c in labels if c in set(t)]
    out["macro_f1"] = float(np.mean([f1[labels.index(c)] for c in true_classes]))
    out["per_class"] = {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                            "support": int(sup[i]), "predicted": int(np.sum(p == c))} for i, c in enumerate(labels)}
    with warnings.catch_warnings():
        # "A single label was found in y_true and y_pred": expected for language within one language
        warnings.simplefilter("ignore", UserWarning)
        out["confusion"] = {"labels": labels, "matrix": confusion_matrix(t, p, labels=labels).tolist()}
    return out


def estimate_metrics(truth: Sequence[int | None], pred: Sequence[int | None]) -> dict[str, Any]:
    """Exact agreement of the affected-SIM estimate, and how it goes wrong."""
    pairs = list(zip(truth, pred))
    n = len(pairs)
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    rel = [abs(b - a) / a for a, b in both if a and a != b]
    return {
        "n": n,
        "accuracy": sum(a == b for a, b in pairs) / n if n else None,
        "both_null": sum(a is None and b is None for a, b in pairs),
        "expected_null_got_number": sum(a is None and b is not None for a, b in pairs),
        "expected_number_got_null": sum(a is not None and b is None for a, b in pairs),
        "both_number_exact": sum(a == b for a, b in both),
        "both_number_different": sum(a != b for a, b in both),
        "median_relative_error_when_different": float(np.median(rel)) if rel else None,
    }


def identifier_metrics(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Per identifier kind, micro precision/recall/F1 over the identifiers of each message."""
    out: dict[str, Any] = {}
    for kind in ID_KINDS:
        tp = fp = fn = 0
        for o in outcomes:
            want, got = set(o.expected["identifiers"][kind]), set(o.predicted["identifiers"][kind])
            tp, fp, fn = tp + len(want & got), fp + len(got - want), fn + len(want - got)
        p = tp / (tp + fp) if tp + fp else None
        r = tp / (tp + fn) if tp + fn else None
        f = 2 * p * r / (p + r) if p and r else (0.0 if (p is not None and r is not None) else None)
        out[kind] = {"expected": tp + fn, "found": tp + fp, "precision": p, "recall": r, "f1": f}
    exact = [all(set(o.expected["identifiers"][k]) == set(o.predicted["identifiers"][k]) for k in ID_KINDS)
             for o in outcomes]
    out["messages_all_identifiers_right"] = float(np.mean(exact)) if exact else None
    return out


def score(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """label -> language/"all" -> figures (by the labelled language), plus dispositions and identifiers."""
    everything = list(outcomes)
    outcomes = cases(everything)  # the labels of auto-replies and bounces are null: only disposition counts
    langs = np.array([o.example.language for o in outcomes], dtype=object)
    groups = {"all": np.ones(len(outcomes), dtype=bool)}
    groups.update({lang: langs == lang for lang in LANGUAGES if (langs == lang).any()})
    labels: dict[str, Any] = {}
    for lab in CLASS_LABELS + ("estimate",):
        labels[lab] = {}
        for g, m in groups.items():
            truth = [o.expected[lab] for o, k in zip(outcomes, m) if k]
            pred = [o.predicted[lab] for o, k in zip(outcomes, m) if k]
            labels[lab][g] = (estimate_metrics(truth, pred) if lab == "estimate"
                              else class_metrics(truth, pred, ORDER.get(lab, ())))
    if any(o.expected["disposition"] != "case" for o in everything):
        labels["disposition"] = {"all": class_metrics([o.expected["disposition"] for o in everything],
                                                      [o.predicted["disposition"] for o in everything],
                                                      ("case",) + NOT_CASES)}
    dispositions: dict[str, int] = {}
    for o in everything:
        dispositions[o.disposition] = dispositions.get(o.disposition, 0) + 1
    return {"labels": labels, "dispositions": dict(sorted(dispositions.items())),
            "identifiers": identifier_metrics(outcomes)}


def cases(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The outcomes of messages labelled `case` (the others have no category, service, severity, tier)."""
    return [o for o in outcomes if o.expected["disposition"] == "case"]


def mistakes(outcomes: Sequence[Outcome], labels: Iterable[str] = HEADLINE,
             limit: int = MAX_MISTAKES) -> dict[str, list[dict[str, Any]]]:
    """label -> the first `limit` messages the pipeline got wrong (id, language, subject, expected, decided)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for lab in labels:
        rows = [{"id": o.example.id, "language": o.example.language, "channel": o.example.channel,
                 "subject": o.example.subject, "expected": o.expected[lab], "predicted": o.predicted[lab]}
                for o in (outcomes if lab == "disposition" else cases(outcomes))
                if o.expected[lab] != o.predicted[lab]]
        out[lab] = rows[:limit]
    return out


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, or of a directory's evaluation files (name and bytes of each, in order)."""
    files = eval_files(path)
    if len(files) == 1 and files[0] == Path(path):
        return hashlib.sha256(files[0].read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()
