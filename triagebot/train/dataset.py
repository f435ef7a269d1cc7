"""The labelled training data: loading and validating training/data/*.jsonl, agent feedback, the content hash
and the held-out split by scenario group."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from triagebot.model import CATEGORIES, LANGUAGES, SERVICES, SEVERITIES, TIERS
from triagebot.train.features import make_inputs, model_text

log = logging.getLogger(__name__)

LABELS = ("category", "service", "severity")
LABEL_VALUES: dict[str, tuple[str, ...]] = {"category": CATEGORIES, "service": SERVICES, "severity": SEVERITIES}
CHANNELS = ("email", "slack")
DATA_GLOB = "*.jsonl"
# Changing the salt or the fraction moves scenarios between train and test; held-out figures of models
# trained under different values are then not comparable, so both are part of the model card.
SPLIT_SALT = "triagebot-heldout-v1"
TEST_FRACTION = 0.2
MAX_ERRORS_SHOWN = 20
# how Dataset.data_hash is computed (the model card repeats it, so anyone can recompute the hash by hand)
HASH_METHOD = ("sha256 over, for each training/data/*.jsonl in name order: the file name, a NUL byte and the "
               "SHA-256 digest of its bytes; then for each feedback example b'feedback\\0' + its canonical JSON")


class DatasetError(ValueError):
    """The training data is wrong; the message names every file:line at fault."""


@dataclass(frozen=True)
class LabelledExample:
    """One labelled message: its raw fields, its labels and where it came from.

    `body` is the text as it arrives (greeting, signature, quoted mail); when `normalized` is true it is
    already the new text of a normalized Message (agent feedback stores that) and is used as it is.
    `labels` holds only the labels known for the example; a feedback row may correct one field only.
    """

    id: str
    group: str
    channel: str
    language: str
    subject: str | None
    body: str
    labels: Mapping[str, str]
    html: bool = False
    normalized: bool = False
    origin: str = ""
    writer: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> str:
        """A stable JSON form, for hashing."""
        return json.dumps({"id": self.id, "group": self.group, "channel": self.channel,
                           "language": self.language, "subject": self.subject, "body": self.body,
                           "html": self.html, "normalized": self.normalized, "labels": dict(self.labels)},
                          sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Dataset:
    """Examples from the data files and feedback, with the hash of exactly what was read."""

    examples: tuple[LabelledExample, ...]
    data_hash: str
    files: tuple[str, ...] = ()
    n_feedback: int = 0
    file_sha256: tuple[tuple[str, str], ...] = ()   # (file name, hex SHA-256 of its bytes) per data file

    def split(self) -> tuple[list[LabelledExample], list[LabelledExample]]:
        """(train, test): the held-out test side is a fixed ~20% of scenario groups."""
        train, test = [], []
        for ex in self.examples:
            (test if is_heldout(ex.group) else train).append(ex)
        return train, test


def is_heldout(group: str) -> bool:
    """Whether a scenario group belongs to the held-out split (stable as data grows: a hash of the slug)."""
    h = hashlib.sha256(f"{SPLIT_SALT}:{group}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < TEST_FRACTION


def _check(rec: Any, where: str) -> list[str]:
    """Every problem of one record, each prefixed with file:line."""
    if not isinstance(rec, dict):
        return [f"{where}: expected a JSON object"]
    errs = []

    def need(key: str, types: tuple[type, ...], allow_none: bool = False) -> None:
        if key not in rec:
            errs.append(f"{where}: missing {key!r}")
        elif rec[key] is None and not allow_none:
            errs.append(f"{where}: {key!r} is null")
        elif rec[key] is not None and not isinstance(rec[key], types):
            errs.append(f"{where}: {key!r} should be {'/'.join(t.__name__ for t in types)}")

    need("id", (str,))
    need("scenario", (str,))
    need("channel", (str,))
    need("language", (str,))
    need("subject", (str,), allow_none=True)
    need("body", (str,))
    need("labels", (dict,))
    if "html" in rec and not isinstance(rec["html"], bool):
        errs.append(f"{where}: 'html' should be true or false")
    if isinstance(rec.get("scenario"), str) and not rec["scenario"].strip():
        errs.append(f"{where}: empty 'scenario'")
    if isinstance(rec.get("body"), str) and not rec["body"].strip():
        errs.append(f"{where}: empty 'body'")
    if isinstance(rec.get("channel"), str) and rec["channel"] not in CHANNELS:
        errs.append(f"{where}: channel {rec['channel']!r} is not one of {', '.join(CHANNELS)}")
    if isinstance(rec.get("language"), str) and rec["language"] not in LANGUAGES:
        errs.append(f"{where}: language {rec['language']!r} is not one of {', '.join(LANGUAGES)}")
    labels = rec.get("labels")
    if isinstance(labels, dict):
        for name, allowed in LABEL_VALUES.items():
            if name not in labels:
                errs.append(f"{where}: labels: missing {name!r}")
            elif labels[name] not in allowed:
                errs.append(f"{where}: labels: {name} {labels[name]!r} is not one of {', '.join(allowed)}")
        if "tier" in labels and labels["tier"] not in TIERS:
            errs.append(f"{where}: labels: tier {labels['tier']!r} is not one of {', '.join(TIERS)}")
        est = labels.get("estimate")
        if est is not None and (isinstance(est, bool) or not isinstance(est, int) or est < 0):
            errs.append(f"{where}: labels: estimate should be a whole number >= 0 or null")
    return errs


def read_records(path: Path, errors: list[str]) -> Iterable[tuple[str, Any]]:
    """(file:line, parsed JSON) of each non-empty line; a line that is not JSON goes to `errors` instead."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON: {e.msg} (column {e.colno})")


def load_file(path: Path) -> tuple[list[LabelledExample], list[str]]:
    """The examples of one JSONL file and the problems found in it (file:line each)."""
    examples: list[LabelledExample] = []
    errors: list[str] = []
    for where, rec in read_records(path, errors):
        problems = _check(rec, where)
        if problems:
            errors.extend(problems)
            continue
        examples.append(example_from_record(rec, where))
    return examples, errors


def example_from_record(rec: Mapping[str, Any], where: str) -> LabelledExample:
    """A checked record as a LabelledExample; labels beyond LABELS (tier, estimate, ...) go to `extra`."""
    labels = rec["labels"]
    return LabelledExample(
        id=rec["id"], group=rec["scenario"].strip(), channel=rec["channel"], language=rec["language"],
        subject=rec["subject"], body=rec["body"], html=bool(rec.get("html", False)),
        labels={k: labels.get(k) for k in LABELS}, origin=where, writer=rec.get("writer"),
        extra={k: v for k, v in labels.items() if k not in LABELS})


def load_dataset(data_dir: Path | str, feedback: Iterable[LabelledExample] = ()) -> Dataset:
    """All examples of data_dir/*.jsonl (validated; DatasetError lists every file:line at fault) plus feedback."""
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob(DATA_GLOB))
    if not files:
        raise DatasetError(f"{data_dir}: no {DATA_GLOB} files")
    examples: list[LabelledExample] = []
    errors: list[str] = []
    digest = hashlib.sha256()
    seen: dict[str, str] = {}
    file_hashes = []
    for path in files:
        raw = path.read_bytes()
        file_digest = hashlib.sha256(raw)
        file_hashes.append((path.name, file_digest.hexdigest()))
        digest.update(path.name.encode() + b"\0" + file_digest.digest())
        exs, errs = load_file(path)
        errors.extend(errs)
        for ex in exs:
            if ex.id in seen:
                errors.append(f"{ex.origin}: id {ex.id!r} already used at {seen[ex.id]}")
            else:
                seen[ex.id] = ex.origin
                examples.append(ex)
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DatasetError(f"{len(errors)} problem(s) in the training data:\n" + "\n".join(shown) + more)
    fb = list(feedback)
    for ex in fb:
        digest.update(b"feedback\0" + ex.canonical().encode("utf-8"))
    return Dataset(tuple(examples + fb), digest.hexdigest(), tuple(str(p) for p in files), len(fb),
                   tuple(file_hashes))


def _field(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def examples_from_feedback(rows: Iterable[Any]) -> list[LabelledExample]:
    """Agent corrections as examples: one per message, its corrected fields as labels (the latest wins).

    A row is a mapping or an object (the `feedback` table row) with: message_id, case_id, field
    (category/service/severity), new_value, channel, language, subject, text (the message's new text),
    and optionally id, created_at and `labels` (the message's other, uncorrected labels).
    Rows with an unknown field or value are skipped with a warning.
    """
    def order(r: Any) -> tuple:
        return (str(_field(r, "created_at") or ""), _field(r, "id") or 0)

    by_message: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=order):
        name, value = _field(row, "field"), _field(row, "new_value")
        if name not in LABEL_VALUES or value not in LABEL_VALUES[name]:
            log.warning("feedback row %s skipped: %s=%r is not a label of TAXONOMY.md", _field(row, "id"), name, value)
            continue
        text = _field(row, "text") or ""
        mid = _field(row, "message_id")
        key = f"msg:{mid}" if mid is not None else "text:" + hashlib.sha256(
            f"{_field(row, 'subject')}\n{text}".encode("utf-8")).hexdigest()[:16]
        entry = by_message.setdefault(key, {"row": row, "labels": {}})
        base = _field(row, "labels") or {}
        for k, v in dict(base).items():
            if k in LABEL_VALUES and v in LABEL_VALUES[k]:
                entry["labels"].setdefault(k, v)
        entry["labels"][name] = value
        entry["corrected"] = entry.get("corrected", set()) | {name}
        entry["row"] = row
    out = []
    for key, entry in by_message.items():
        row = entry["row"]
        labels = dict(entry["labels"])
        case_id = _field(row, "case_id")
        language = _field(row, "language") or "other"
        out.append(LabelledExample(
            id=f"feedback:{key}", group=f"feedback:case:{case_id}" if case_id is not None else f"feedback:{key}",
            channel=_field(row, "channel") or "email", language=language if language in LANGUAGES else "other",
            subject=_field(row, "subject"), body=_field(row, "text") or "", labels=labels, normalized=True,
            origin=f"feedback:{key}"))
    return out


def _normalized_text(ex: LabelledExample) -> str:
    """The text a model sees for an example, built exactly as the classify step builds it at run time."""
    if ex.normalized:
        return model_text(ex.subject, ex.body)
    from triagebot.normalize import message_from_text
    msg = message_from_text(ex.channel, ex.subject, ex.body, ex.html)
    return model_text(msg.subject if msg.subject is not None else ex.subject, msg.text)


def model_inputs(examples: Sequence[LabelledExample]) -> np.ndarray:
    """The (language, text) input rows for examples (language: the data's label)."""
    return make_inputs([ex.language for ex in examples], [_normalized_text(ex) for ex in examples])


def inputs_sha256(*inputs: np.ndarray) -> str:
    """SHA-256 of model input rows (language, text): changes when normalization changes what a model sees."""
    h = hashlib.sha256()
    for X in inputs:
        for language, text in X:
            h.update(json.dumps([str(language), str(text)], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def predictions_sha256(ids: Sequence[str], predicted: Mapping[str, Sequence[str]]) -> str:
    """SHA-256 of the predicted labels per example id (sorted by id): equal predictions, equal digest."""
    rows = sorted([i, *(str(predicted[lab][k]) for lab in LABELS)] for k, i in enumerate(ids))
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def label_array(examples: Sequence[LabelledExample], label: str) -> np.ndarray:
    """One label's values as an object array; None where the example does not carry the label."""
    return np.array([ex.labels.get(label) for ex in examples], dtype=object)


def groups_array(examples: Sequence[LabelledExample]) -> np.ndarray:
    """The scenario group of each example, for grouped cross-validation."""
    return np.array([ex.group for ex in examples], dtype=object)
