"""`triagebot evaluate`: a report on the promoted (or a named) model: held-out precision/recall/F1 per label and
per language, confusion matrices and reliability diagrams as pictures, grouped cross-validation figures, and the
independent evaluation set through the whole pipeline (evalset.py); report.html for a person, report.json for a
script."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.metrics import confusion_matrix
from tqdm import tqdm

from triagebot.settings import Settings
from triagebot.train import dataset as ds
from triagebot.train import evalset as es
from triagebot.train.models import CV_FOLDS, LABELS, cross_validate
from triagebot.train.registry import LoadedModel, Registry
from triagebot.train.train import DATA_DIR, MODELS_DIR, _clean, mean_macro_f1, score_model

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
MAX_MISTAKES = 25


def evaluate(out_dir: Path | str, models_dir: Path | str = MODELS_DIR, data_dir: Path | str = DATA_DIR,
             version: str | None = None, cv: bool = True, cv_folds: int = CV_FOLDS, progress: bool = True,
             feedback: Iterable[ds.LabelledExample] = (), review_confidence: float | None = None,
             eval_set: Path | str | None = None, settings: Settings | None = None) -> Path:
    """Write report.html (with embedded PNG pictures) and report.json to out_dir; returns the HTML path.

    `eval_set`: a file of labelled messages (training/eval/independent.jsonl, see evalset.py) to run through the
    whole pipeline with this model; None leaves the section out. `settings` give the rules the pipeline uses.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or Settings.load()
    threshold = review_confidence if review_confidence is not None else settings.review_confidence
    loaded = Registry(models_dir).load(version)
    model = loaded.model
    dataset = ds.load_dataset(data_dir, feedback)
    train_ex, test_ex = dataset.split()
    eval_ex = es.load_eval_set(eval_set) if eval_set is not None else []
    n_cv = cv_folds * len(LABELS) if cv else 0
    bar = tqdm(total=len(dataset.examples) + 1 + n_cv + len(eval_ex), disable=not progress, unit="step",
               desc="evaluate")
    try:
        X_test = _inputs(test_ex, bar)
        Y_test = {lab: ds.label_array(test_ex, lab) for lab in LABELS}
        lang_test = [e.language for e in test_ex]
        heldout = score_model(model, X_test, Y_test, lang_test)
        probs = model.predict_proba(X_test) if len(test_ex) else {}
        runtime = _with_detected_language(model, X_test, Y_test, lang_test)
        bar.update(1)
        cv_metrics: dict[str, Any] = {}
        if cv and train_ex:
            X_train = _inputs(train_ex, bar)
            Y_train = {lab: ds.label_array(train_ex, lab) for lab in LABELS}
            # the model's own feature settings and head types, refitted fold by fold
            res = cross_validate(
                X_train, Y_train, ds.groups_array(train_ex), [e.language for e in train_ex],
                candidates={}, n_splits=cv_folds, features=lambda: clone(model.features_), progress=bar.update,
                per_label_candidates={lab: {"model": (lambda lab=lab: clone(model.heads_[lab]))} for lab in LABELS})
            cv_metrics = {"folds": res.n_splits, "grouped_by": "scenario",
                          "labels": {lab: res.metrics[lab]["model"] for lab in LABELS}}
        else:
            bar.update(len(train_ex))
        outcomes = es.run_pipeline(eval_ex, loaded, models_dir, settings, progress=bar.update) if eval_ex else []
    finally:
        bar.close()

    pictures: dict[str, str] = {}
    mistakes: dict[str, list[dict[str, Any]]] = {}
    review: dict[str, Any] = {}
    for lab in heldout:
        y = Y_test[lab]
        m = np.array([v is not None for v in y], dtype=bool)
        classes = model.classes_[lab]
        p = probs[lab][m]
        truth = y[m].astype(str)
        pred = np.asarray(classes, dtype=object)[p.argmax(axis=1)].astype(str)
        conf = p.max(axis=1)
        langs = np.asarray(lang_test, dtype=object)[m]
        pictures[f"cm-{lab}-all"] = _confusion_png(truth, pred, classes, f"{lab}: all languages (n={m.sum()})")
        for lang in sorted(set(langs)):
            k = langs == lang
            pictures[f"cm-{lab}-{lang}"] = _confusion_png(truth[k], pred[k], classes, f"{lab}: {lang} (n={k.sum()})")
        pictures[f"rel-{lab}"] = _reliability_png(conf, pred == truth, f"{lab}: reliability (held-out)")
        review[lab] = _review_figures(conf, pred == truth, threshold)
        exs = [e for e, keep in zip(test_ex, m) if keep]
        wrong = [i for i in np.argsort(-conf) if pred[i] != truth[i]][:MAX_MISTAKES]
        mistakes[lab] = [{"id": exs[i].id, "language": exs[i].language, "subject": exs[i].subject,
                          "truth": truth[i], "predicted": pred[i], "confidence": round(float(conf[i]), 3)}
                         for i in wrong]

    report = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"version": loaded.version, "created": loaded.card.get("created"),
                  "training_data_hash": loaded.card.get("training_data", {}).get("hash"),
                  "heads": {lab: loaded.card.get("labels", {}).get(lab, {}).get("head") for lab in LABELS},
                  "libraries": loaded.card.get("libraries")},
        "data": {"hash": dataset.data_hash, "same_as_training": dataset.data_hash ==
                 loaded.card.get("training_data", {}).get("hash"),
                 "n_train": len(train_ex), "n_test": len(test_ex), "n_feedback": dataset.n_feedback,
                 "split": {"by": "scenario", "salt": ds.SPLIT_SALT, "test_fraction": ds.TEST_FRACTION}},
        "heldout_macro_f1": _clean(mean_macro_f1(heldout)) if heldout else None,
        "heldout": _jsonable(heldout),
        "heldout_detected_language": runtime,
        "review_threshold": threshold,
        "review": review,
        "cv": _jsonable(cv_metrics),
        "mistakes": mistakes,
        "eval_set": _eval_set_report(eval_set, outcomes, settings) if eval_set is not None else None,
    }
    if outcomes:
        pictures.update(_eval_set_pictures(report["eval_set"]))
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    path = out / REPORT_HTML
    path.write_text(_html(report, pictures, loaded), encoding="utf-8")
    return path


def _with_detected_language(model: Any, X: np.ndarray, Y: Mapping[str, np.ndarray],
                            labelled: Sequence[str]) -> dict[str, Any] | None:
    """Held-out figures with the language triagebot.langid detects (as at run time) instead of the label."""
    try:
        from triagebot.langid import detect
    except ImportError:
        return None
    if not len(X):
        return None
    X2 = X.copy()
    try:
        X2[:, 0] = [detect(text)[0] for text in X[:, 1]]
    except Exception as e:  # noqa: BLE001 - the language model is another component; report, do not fail
        return {"error": f"triagebot.langid.detect failed: {type(e).__name__}: {e}"}
    agree = float(np.mean(X2[:, 0] == np.asarray(labelled, dtype=object)))
    scored = score_model(model, X2, Y, list(X2[:, 0]))
    return {"language_agreement": _clean(agree),
            "labels": {lab: {k: _clean(scored[lab]["all"][k]) for k in ("n", "accuracy", "macro_f1")}
                       for lab in scored},
            "heldout_macro_f1": _clean(mean_macro_f1(scored))}


def _eval_set_report(path: Path | str, outcomes: Sequence[es.Outcome], settings: Settings) -> dict[str, Any]:
    """The JSON section of the evaluation set: figures per label and language, confusion matrices, mistakes."""
    from triagebot.langid import get_model

    scored = es.score(outcomes)
    langs = [o.example.language for o in outcomes]
    return {
        "path": str(path),
        "sha256": es.file_sha256(path),
        "n": len(outcomes),
        "languages": {lang: langs.count(lang) for lang in sorted(set(langs))},
        "how": "each message built with normalize.message_from_text (as training does), then Pipeline.default "
               "with this model in the classify step; 'severity' is final (after rules/severity_policy.yaml), "
               "'severity_model' the classifier's before the policy; per language = by the labelled language",
        "rules_dir": str(settings.rules_dir),
        "langid_version": get_model().version,
        "accuracy": {lab: _clean(scored["labels"][lab]["all"]["accuracy"])
                     for lab in es.HEADLINE + ("disposition",) if lab in scored["labels"]},
        "labels": _jsonable(scored["labels"]),
        "identifiers": _jsonable(scored["identifiers"]),
        "dispositions": scored["dispositions"],
        "mistakes": _jsonable(es.mistakes(outcomes)),
    }


def _eval_set_pictures(section: Mapping[str, Any]) -> dict[str, str]:
    """A confusion matrix per class label and language of the evaluation set."""
    out = {}
    for lab in es.CLASS_LABELS:
        for group, m in section["labels"][lab].items():
            cm = m["confusion"]
            if cm["labels"]:
                out[f"ev-cm-{lab}-{group}"] = _matrix_png(
                    cm["labels"], np.asarray(cm["matrix"]),
                    f"eval set, {lab}: {'all languages' if group == 'all' else group} (n={m['n']})")
    return out


def _inputs(examples: Sequence[ds.LabelledExample], bar: tqdm) -> np.ndarray:
    X = ds.model_inputs(examples)
    bar.update(len(examples))
    return X


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return _clean(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _review_figures(conf: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """What the review threshold does on the held-out split: how many go to review, accuracy either side."""
    low = conf < threshold
    return {
        "threshold": threshold,
        "to_review": int(low.sum()),
        "share_to_review": _clean(float(low.mean())) if len(conf) else None,
        "accuracy_above": _clean(float(correct[~low].mean())) if (~low).any() else None,
        "accuracy_below": _clean(float(correct[low].mean())) if low.any() else None,
        "mean_conf_correct": _clean(float(conf[correct].mean())) if correct.any() else None,
        "mean_conf_wrong": _clean(float(conf[~correct].mean())) if (~correct).any() else None,
    }


def _figure(width: float, height: float):
    # matplotlib's object API renders with Agg and never touches pyplot's global state or a display
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _confusion_png(truth: np.ndarray, pred: np.ndarray, classes: Sequence[str], title: str) -> str:
    labels = [c for c in classes if c in set(truth) | set(pred)] or list(classes)
    with warnings.catch_warnings():
        # "A single label was found in y_true and y_pred": expected for a small language group
        warnings.simplefilter("ignore", UserWarning)
        cm = confusion_matrix(truth, pred, labels=labels) if len(truth) else np.zeros((len(labels), len(labels)), int)
    return _matrix_png(labels, cm, title)


def _matrix_png(labels: Sequence[str], cm: np.ndarray, title: str) -> str:
    """A confusion matrix (rows: true, columns: predicted) as a base64 PNG."""
    size = 1.2 + 0.55 * len(labels)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    return _png(fig)


def _reliability_png(conf: np.ndarray, correct: np.ndarray, title: str, bins: int = 10) -> str:
    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        k = which == b
        if k.any():
            xs.append(conf[k].mean())
            ys.append(correct[k].mean())
            ns.append(int(k.sum()))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.plot(xs, ys, marker="o")
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _metrics_table(per_lang: Mapping[str, Mapping[str, Any]]) -> str:
    cols = ("n", "accuracy", "macro_f1", "log_loss", "ece", "mean_conf_correct", "mean_conf_wrong")
    rows = "".join(f"<tr><th>{html.escape(lang)}</th>" + "".join(f"<td>{_fmt(m.get(c))}</td>" for c in cols) + "</tr>"
                   for lang, m in per_lang.items())
    return ("<table><tr><th>language</th>" + "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols) + "</tr>"
            + rows + "</table>")


def _per_class_table(per_lang: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for lang, m in per_lang.items():
        rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{_fmt(d['precision'])}</td><td>{_fmt(d['recall'])}</td>"
                       f"<td>{_fmt(d['f1'])}</td><td>{d['support']}</td></tr>"
                       for c, d in m.get("per_class", {}).items())
        out.append(f"<div class='pc'><h4>{html.escape(lang)}</h4><table><tr><th>class</th><th>precision</th>"
                   f"<th>recall</th><th>F1</th><th>support</th></tr>{rows}</table></div>")
    return "<div class='row'>" + "".join(out) + "</div>"


def _img(pictures: Mapping[str, str], key: str) -> str:
    return f"<img alt='{html.escape(key)}' src='data:image/png;base64,{pictures[key]}'>" if key in pictures else ""


def _runtime_note(rt: Mapping[str, Any] | None) -> str:
    if not rt:
        return ""
    if "error" in rt:
        return f"<p class='note'>No figures with the detected language: {html.escape(rt['error'])}</p>"
    per = ", ".join(f"{html.escape(k)} {_fmt(v['macro_f1'])}" for k, v in rt["labels"].items())
    return (f"<p>With the language triagebot.langid detects instead of the labelled one (agreement "
            f"{_fmt(rt['language_agreement'])}): macro-F1 {per}; mean {_fmt(rt['heldout_macro_f1'])}.</p>")


def _html(report: Mapping[str, Any], pictures: Mapping[str, str], loaded: LoadedModel) -> str:
    e = html.escape
    m, d = report["model"], report["data"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>triagebot model report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}"
        "td:first-child,th:first-child{text-align:left}.row{display:flex;flex-wrap:wrap;gap:1em}"
        "img{border:1px solid #eee}.note{color:#555}</style></head><body>",
        f"<h1>Model {e(m['version'])}</h1>",
        f"<p>Trained {e(str(m['created']))}; heads: "
        + ", ".join(f"{e(k)} = {e(str(v))}" for k, v in m["heads"].items())
        + f". Report generated {e(report['generated'])}.</p>",
        f"<p>Data {e(d['hash'][:12])}… ({'the data it was trained on' if d['same_as_training'] else 'changed since training'}); "
        f"held-out split: {d['n_test']} messages from scenarios the model never saw "
        f"(split by scenario, {int(d['split']['test_fraction'] * 100)}%); training split {d['n_train']}.</p>",
        f"<p><b>Held-out macro-F1, mean over labels: {_fmt(report['heldout_macro_f1'])}</b></p>",
        _runtime_note(report.get("heldout_detected_language")),
        (f"<p><b>Independent evaluation set ({report['eval_set']['n']} messages, whole pipeline), accuracy: "
         + ", ".join(f"{e(k)} {_fmt(v)}" for k, v in report["eval_set"]["accuracy"].items())
         + "</b> (<a href='#eval-set'>details</a>)</p>") if report.get("eval_set") else
        "<p class='note'>No independent evaluation set in this report.</p>",
        "<p class='note'>Libraries: " + e(", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items())) + "</p>",
    ]
    for lab in LABELS:
        if lab not in report["heldout"]:
            continue
        per_lang = report["heldout"][lab]
        rv = report["review"].get(lab, {})
        parts += [
            f"<h2>{e(lab)}</h2><h3>Held-out</h3>", _metrics_table(per_lang), _per_class_table(per_lang),
            "<div class='row'>" + _img(pictures, f"cm-{lab}-all")
            + "".join(_img(pictures, f"cm-{lab}-{lang}") for lang in per_lang if lang != "all") + "</div>",
            "<h3>Confidence</h3><div class='row'>" + _img(pictures, f"rel-{lab}") +
            f"<div><p>Below the review threshold {rv.get('threshold')}: {rv.get('to_review')} messages "
            f"({_fmt(rv.get('share_to_review'))}). Accuracy above it {_fmt(rv.get('accuracy_above'))}, below it "
            f"{_fmt(rv.get('accuracy_below'))}. Mean confidence when right {_fmt(rv.get('mean_conf_correct'))}, "
            f"when wrong {_fmt(rv.get('mean_conf_wrong'))}.</p></div></div>",
        ]
        if report["cv"]:
            parts += [f"<h3>Grouped {report['cv']['folds']}-fold cross-validation on the training split</h3>",
                      _metrics_table(report["cv"]["labels"][lab])]
        wrong = report["mistakes"].get(lab, [])
        if wrong:
            rows = "".join(f"<tr><td>{e(w['id'])}</td><td>{e(w['language'])}</td><td>{e(str(w['subject'] or ''))}</td>"
                           f"<td>{e(w['truth'])}</td><td>{e(w['predicted'])}</td><td>{_fmt(w['confidence'])}</td></tr>"
                           for w in wrong)
            parts.append("<details><summary>Most confident held-out mistakes</summary><table><tr><th>id</th>"
                         "<th>lang</th><th>subject</th><th>true</th><th>predicted</th><th>confidence</th></tr>"
                         f"{rows}</table></details>")
    if report.get("eval_set"):
        parts += _eval_set_html(report["eval_set"], pictures)
    parts.append("</body></html>")
    return "\n".join(parts)


def _eval_set_html(ev: Mapping[str, Any], pictures: Mapping[str, str]) -> list[str]:
    e = html.escape
    labels = ev["labels"]
    groups = list(labels["category"])
    head = "<tr><th>label</th>" + "".join(f"<th>{e(g)} (n={labels['category'][g]['n']})</th>" for g in groups) + "</tr>"
    rows = "".join(
        f"<tr><th>{e(lab)}</th>" + "".join(
            f"<td>{_fmt(labels[lab][g]['accuracy'])}"
            + (f" <span class='note'>F1 {_fmt(labels[lab][g]['macro_f1'])}</span>"
               if "macro_f1" in labels[lab][g] else "")
            + "</td>" for g in groups) + "</tr>"
        for lab in es.HEADLINE + ("severity_model",))
    parts = [
        "<h2 id='eval-set'>Independent evaluation set, whole pipeline</h2>",
        f"<p>{e(ev['path'])} ({ev['n']} messages, sha256 {e(ev['sha256'][:12])}…; "
        + ", ".join(f"{e(k)} {v}" for k, v in ev["languages"].items()) + f"). {e(ev['how'])}. "
        f"Language model {e(str(ev['langid_version']))}; rules {e(ev['rules_dir'])}. Dispositions: "
        + ", ".join(f"{e(k)} {v}" for k, v in ev["dispositions"].items())
        + (f" (disposition accuracy {_fmt(labels['disposition']['all']['accuracy'])} over all messages; the labels "
           "below count only the messages labelled case)" if "disposition" in labels else "") + ".</p>",
        "<p><b>Accuracy</b> (macro-F1 over the true classes beside it), by labelled language:</p>",
        f"<table>{head}{rows}</table>",
    ]
    for lab in es.CLASS_LABELS:
        parts += [f"<h3>Eval set: {e(lab)}</h3>", _per_class_table(labels[lab]),
                  "<div class='row'>" + "".join(_img(pictures, f"ev-cm-{lab}-{g}") for g in labels[lab]) + "</div>"]
    est_keys = ("n", "accuracy", "both_null", "expected_null_got_number", "expected_number_got_null",
                "both_number_exact", "both_number_different", "median_relative_error_when_different")
    parts.append("<h3>Eval set: blast-radius estimate</h3><table><tr><th>language</th>"
                 + "".join(f"<th>{e(k.replace('_', ' '))}</th>" for k in est_keys) + "</tr>"
                 + "".join(f"<tr><th>{e(g)}</th>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in est_keys) + "</tr>"
                           for g, m in labels["estimate"].items()) + "</table>")
    ids = ev["identifiers"]
    parts.append("<h3>Eval set: identifiers</h3><table><tr><th>kind</th><th>expected</th><th>found</th>"
                 "<th>precision</th><th>recall</th><th>F1</th></tr>"
                 + "".join(f"<tr><th>{e(k)}</th>" + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in
                                                          ("expected", "found", "precision", "recall", "f1")) + "</tr>"
                           for k, v in ids.items() if isinstance(v, Mapping))
                 + "</table><p>Messages with every identifier right: "
                 f"{_fmt(ids.get('messages_all_identifiers_right'))}</p>")
    for lab, wrong in ev["mistakes"].items():
        if wrong:
            rows = "".join(f"<tr><td>{e(w['id'])}</td><td>{e(w['language'])}</td><td>{e(w['channel'])}</td>"
                           f"<td>{e(str(w['subject'] or ''))}</td><td>{e(str(w['expected']))}</td>"
                           f"<td>{e(str(w['predicted']))}</td></tr>" for w in wrong)
            parts.append(f"<details><summary>Eval set mistakes: {e(lab)} ({len(wrong)} shown)</summary><table><tr>"
                         "<th>id</th><th>lang</th><th>channel</th><th>subject</th><th>expected</th><th>decided</th>"
                         f"</tr>{rows}</table></details>")
    return parts
