"""Training, the held-out split, the model registry (skops, versions, promotion, rollback, hot reload), evaluation."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio

from triagebot.train import EXIT_OK, cli_models
from triagebot.train import dataset as ds
from triagebot.train.features import analyse, full_lemma_table, make_inputs, prepass
from triagebot.train.models import TriageClassifier, expected_calibration_error
from triagebot.train.registry import (CARD_FILE, MODEL_FILE, ModelError, ModelHandle, ModelVersionError, Registry,
                                      sha256_file)
from triagebot.train.train import train

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "training" / "data"
SLICE_EVERY = 3          # about a third of the data: enough to learn, quick to train


def _slice_data(dest: Path, every: int = SLICE_EVERY, shuffle_train_labels: bool = False) -> Path:
    """A copy of a deterministic slice of training/data (by id hash), optionally with wrong training labels."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    files = sorted(DATA_DIR.glob("*.jsonl"))
    if not files:
        pytest.skip(f"no training data in {DATA_DIR}")
    for path in files:
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if int(hashlib.sha256(rec["id"].encode()).hexdigest(), 16) % every:
                continue
            if shuffle_train_labels and not ds.is_heldout(rec["scenario"]):
                for name, values in ds.LABEL_VALUES.items():
                    rec["labels"][name] = rng.choice([v for v in values if v != rec["labels"][name]])
            lines.append(json.dumps(rec, ensure_ascii=False))
        (dest / path.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One quick training run (default heads, no model selection) into a fresh models/ folder."""
    base = tmp_path_factory.mktemp("train")
    data = _slice_data(base / "data")
    models = base / "models"
    result = train(data, models_dir=models, select=False, progress=False)
    return data, models, result


def _copy_models(models: Path, dest: Path) -> Path:
    shutil.copytree(models, dest)
    return dest


# -- data ---------------------------------------------------------------------------------------------------

def test_dataset_errors_name_file_and_line(tmp_path):
    good = {"id": "x-1", "scenario": "s", "writer": "w", "channel": "email", "language": "en", "subject": "s",
            "body": "b", "html": False, "labels": {"category": "incident", "service": "data", "severity": "low",
                                                    "tier": "none", "estimate": None}}
    bad_value = dict(good, id="x-3", labels=dict(good["labels"], category="complaint"))
    bad_lang = dict(good, id="x-4", language="de")
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps(good), "{not json", json.dumps(bad_value),
                                                 json.dumps(bad_lang), json.dumps(good)]) + "\n")
    with pytest.raises(ds.DatasetError) as err:
        ds.load_dataset(tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'a.jsonl'}:2: not valid JSON" in msg
    assert f"{tmp_path / 'a.jsonl'}:3: labels: category 'complaint'" in msg
    assert f"{tmp_path / 'a.jsonl'}:4: language 'de'" in msg
    assert f"{tmp_path / 'a.jsonl'}:5: id 'x-1' already used at {tmp_path / 'a.jsonl'}:1" in msg


def test_dataset_hash_follows_content(tmp_path):
    data = _slice_data(tmp_path / "d", every=10)
    h1 = ds.load_dataset(data).data_hash
    assert ds.load_dataset(data).data_hash == h1
    f = sorted(data.glob("*.jsonl"))[0]
    f.write_text(f.read_text(encoding="utf-8").replace('"low"', '"medium"', 1), encoding="utf-8")
    assert ds.load_dataset(data).data_hash != h1


def test_heldout_split_is_by_scenario_and_stable():
    full = ds.load_dataset(DATA_DIR)
    train_ex, test_ex = full.split()
    assert train_ex and test_ex
    assert not {e.group for e in train_ex} & {e.group for e in test_ex}
    share = len(test_ex) / len(full.examples)
    assert 0.08 < share < 0.35, share
    # adding data never moves a scenario to the other side: the side is a function of the slug alone
    sub = ds.Dataset(full.examples[::2], "x")
    sub_train, sub_test = sub.split()
    assert {e.id for e in sub_test} <= {e.id for e in test_ex}
    assert {e.id for e in sub_train} <= {e.id for e in train_ex}


def test_examples_from_feedback_latest_correction_wins():
    rows = [
        {"id": 1, "message_id": 10, "case_id": 5, "field": "category", "new_value": "incident", "channel": "email",
         "language": "sv", "subject": "Faktura", "text": "Vad betyder avgiften?", "created_at": "2026-01-01"},
        {"id": 2, "message_id": 10, "case_id": 5, "field": "category", "new_value": "information_request",
         "channel": "email", "language": "sv", "subject": "Faktura", "text": "Vad betyder avgiften?",
         "created_at": "2026-01-02", "labels": {"service": "billing"}},
        {"id": 3, "message_id": 11, "case_id": None, "field": "severity", "new_value": "urgent", "channel": "slack",
         "language": "en", "subject": None, "text": "x"},
    ]
    exs = ds.examples_from_feedback(rows)
    assert len(exs) == 1
    ex = exs[0]
    assert ex.labels == {"category": "information_request", "service": "billing"}
    assert ex.normalized and ex.group == "feedback:case:5" and ex.language == "sv"
    # feedback text is already the message's new text: used as it is
    X = ds.model_inputs(exs)
    assert X[0, 1] == "Faktura\nVad betyder avgiften?"


def test_model_input_uses_normalized_new_text():
    ex = ds.LabelledExample(id="t", group="g", channel="email", language="en", subject="No data",
                            body="Our tracker is offline.\n\nOn Mon, 1 Jan 2026 Bob wrote:\n> how to set the APN?\n",
                            labels={})
    text = ds.model_inputs([ex])[0, 1]
    assert text.startswith("No data\nOur tracker is offline.")
    assert "how to set the APN" not in text


# -- features -----------------------------------------------------------------------------------------------

def test_prepass_folds_identifiers_and_counts():
    s = prepass("SIMs 8949 0220 1100 4512 332 and 8946070120004815525F; call +46 8 555 012 34; "
                "3,200 meters, 1 400 mätare, 1,5 GB, at 22:00, IP 10.1.2.0/24, fw 4.2.1")
    assert s.count("zziccid") == 2 and "zzphone" in s and "3200" in s and "1400" in s
    assert "zzdecimal" in s and "zztime" in s and "zzip" in s and "zzver" in s
    toks = analyse("en", "3,200 meters and 40 units and 6 gateways and 1 tracker")
    assert toks[0] == "zzlangen"
    assert [t for t in toks if t.startswith("zznum")] == ["zznummass", "zznummany", "zznumfew", "zznum1"]


def test_lemmas_and_accents():
    assert "conectar" in analyse("es", "los módems no conectaban", full_lemma_table("es"))
    assert "modem" in analyse("es", "los módems no conectaban", full_lemma_table("es"))
    assert "meter" in analyse("en", "meters", full_lemma_table("en"))
    # å/ä/ö are letters of their own in Swedish, not accents to drop
    assert "mätare" in analyse("sv", "Mätare", full_lemma_table("sv"))


def test_pruned_lemma_table_analyses_training_texts_like_the_full_one(trained):
    _data, models, _result = trained
    model = Registry(models).load().model
    analyser = model.features_.named_steps["analyse"]
    dataset = ds.load_dataset(_data)
    train_ex, _ = dataset.split()
    X = ds.model_inputs(train_ex[:150])
    pruned = analyser.transform(X)
    full = [" ".join(analyse(lang, text, full_lemma_table(lang))) for lang, text in X]
    assert list(pruned) == full
    assert sum(len(v) for v in analyser.lemmas_.values()) < 0.2 * sum(len(full_lemma_table(x)) for x in ("en", "sv", "es"))


# -- training, saving, loading ------------------------------------------------------------------------------

def test_train_saves_promotes_and_writes_a_card(trained):
    _data, models, result = trained
    assert result.promoted and "no model was promoted before" in result.reason
    reg = Registry(models)
    assert reg.promoted() == result.version
    card = json.loads((models / result.version / CARD_FILE).read_text())
    for key in ("scikit-learn", "skops", "numpy", "spacy", "python"):
        assert card["libraries"][key]
    assert card["training_data"]["hash"] == ds.load_dataset(_data).data_hash
    assert card["training_data"]["n_train"] > 0 and card["training_data"]["n_test"] > 0
    assert set(card["labels"]["category"]["classes"]) <= set(ds.LABEL_VALUES["category"])
    assert card["metrics"]["heldout"]["category"]["all"]["n"] == card["training_data"]["n_test"]
    assert card["file_sha256"] == sha256_file(models / result.version / MODEL_FILE)
    assert card["created"] and card["format"] == "skops"


def test_save_load_round_trip_predicts_the_same(trained):
    data, models, _ = trained
    _, test_ex = ds.load_dataset(data).split()
    X = ds.model_inputs(test_ex[:40])
    a = Registry(models).load().model
    b = sio.loads(sio.dumps(a), trusted=sorted(sio.get_untrusted_types(data=sio.dumps(a))))
    pa, pb = a.predict_proba(X), b.predict_proba(X)
    for label in pa:
        np.testing.assert_allclose(pa[label], pb[label], rtol=0, atol=1e-12)


def test_fast_path_matches_scikit_learn(trained):
    data, models, _ = trained
    model = Registry(models).load().model
    _, test_ex = ds.load_dataset(data).split()
    X = ds.model_inputs(test_ex)
    ref = model.predict_proba(X)
    assert model.fast_scorer() is not None, model.fast_path_error
    for i, (lang, text) in enumerate(X):
        got = model.predict_one(lang, text)
        for label in ref:
            np.testing.assert_allclose([got[label][c] for c in model.classes_[label]], ref[label][i], atol=1e-6)


def test_load_refuses_other_library_versions(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    version = Registry(models).promoted()
    card_path = models / version / CARD_FILE
    card = json.loads(card_path.read_text())
    card["libraries"]["scikit-learn"] = "0.24.2"
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelVersionError) as err:
        Registry(models).load()
    assert "scikit-learn 0.24.2" in str(err.value) and "retrain" in str(err.value)


def test_load_refuses_a_changed_file(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    version = Registry(models).promoted()
    with open(models / version / MODEL_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="does not match its model card"):
        Registry(models).load()


class Untrusted:
    """A type no model file may contain."""


def test_load_refuses_untrusted_types(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    reg = Registry(models)
    version = reg.promoted()
    model = reg.load().model
    model.extra_ = Untrusted()
    path = models / version / MODEL_FILE
    sio.dump(model, path)
    card = json.loads((models / version / CARD_FILE).read_text())
    card["file_sha256"] = sha256_file(path)
    (models / version / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not trusted.*Untrusted"):
        reg.load()
    with pytest.raises(ModelError, match="outside TRUSTED_TYPES"):
        reg.save(model, {"training_data": {"hash": "x"}})


def test_refuses_to_promote_a_worse_model_unless_forced(trained, tmp_path):
    data, models, first = trained
    models = _copy_models(models, tmp_path / "m")
    bad_data = _slice_data(tmp_path / "bad", shuffle_train_labels=True)
    worse = train(bad_data, models_dir=models, select=False, progress=False)
    assert not worse.promoted
    assert worse.heldout_macro_f1 < worse.current_macro_f1
    assert "worse" in worse.reason and "--force" in worse.reason
    reg = Registry(models)
    assert reg.promoted() == first.version
    assert worse.version in {v.version for v in reg.versions()}
    forced = train(bad_data, models_dir=models, select=False, progress=False, force=True)
    assert forced.promoted and reg.promoted() == forced.version
    assert reg.read()["history"][-1]["forced"] is True


def test_promote_and_rollback(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    reg = Registry(models)
    a = reg.promoted()
    model = reg.load().model
    b = reg.save(model, {"training_data": {"hash": "b" * 64}, "metrics": {"heldout_macro_f1": 0.5}})
    assert reg.promoted() == a                       # saving does not promote
    reg.promote(b)
    assert reg.promoted() == b
    assert reg.rollback() == a and reg.promoted() == a
    with pytest.raises(ModelError, match="no version"):
        reg.promote("nope")
    lines: list[str] = []
    assert cli_models("list", models_dir=models, out=lines.append) == EXIT_OK
    assert any(line.startswith(f"* {a}") for line in lines) and any(b in line for line in lines)


def test_rollback_without_history_is_refused(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    with pytest.raises(ModelError, match="nothing to roll back"):
        Registry(models).rollback()


def test_running_process_picks_up_a_promotion(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    reg = Registry(models)
    a = reg.promoted()
    b = reg.save(reg.load().model, {"training_data": {"hash": "c" * 64}})
    handle = ModelHandle(models, check_seconds=3600)
    assert handle.get().version == a
    reg.promote(b)
    assert handle.get().version == a               # not looked at again before check_seconds
    handle.check_seconds = 0
    assert handle.get().version == b               # no restart needed
    # a promotion this process cannot load keeps the model in use and says why
    card = models / a / CARD_FILE
    bad = json.loads(card.read_text())
    bad["libraries"]["skops"] = "0.1"
    card.write_text(json.dumps(bad))
    reg.promote(a)
    assert handle.get().version == b
    assert "skops 0.1" in (handle.error or "")


def test_calibration_is_informative(trained):
    """Held-out: confidence is higher when the prediction is right, and roughly matches accuracy."""
    data, models, _ = trained
    model = Registry(models).load().model
    _, test_ex = ds.load_dataset(data).split()
    X = ds.model_inputs(test_ex)
    probs = model.predict_proba(X)
    for label, p in probs.items():
        truth = ds.label_array(test_ex, label).astype(str)
        pred = np.asarray(model.classes_[label])[p.argmax(axis=1)]
        conf = p.max(axis=1)
        right = pred == truth
        assert right.any() and (~right).any()
        assert conf[right].mean() > conf[~right].mean() + 0.05, label
        assert expected_calibration_error(conf, right) < 0.2, label
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)


def test_feedback_goes_into_training(trained, tmp_path):
    data, models, _ = trained
    rows = [{"id": i, "message_id": 100 + i, "case_id": 200 + i, "field": "category", "new_value": "order",
             "channel": "email", "language": "en", "subject": "Quote", "text": f"Please send a quote for {n} SIMs"}
            for i, n in enumerate((500, 1000, 2000, 300, 50, 70))]
    fb = ds.examples_from_feedback(rows)
    result = train(data, feedback=fb, models_dir=tmp_path / "m", select=False, progress=False)
    card = Registry(tmp_path / "m").card(result.version)
    assert card["training_data"]["n_feedback"] == 6
    assert card["training_data"]["hash"] != ds.load_dataset(data).data_hash
    assert card["training_data"]["n_examples"] == len(ds.load_dataset(data).examples) + 6


def test_evaluate_writes_html_with_pictures_and_json(trained, tmp_path):
    from triagebot.train.evaluate import evaluate

    data, models, _ = trained
    path = evaluate(tmp_path / "report", models_dir=models, data_dir=data, cv=True, cv_folds=2, progress=False)
    page = path.read_text(encoding="utf-8")
    assert page.count("src='data:image/png;base64,") >= 3 * 2   # a confusion matrix and a reliability plot per label
    report = json.loads((path.parent / "report.json").read_text())
    for label in ("category", "service", "severity"):
        assert set(report["heldout"][label]) >= {"all", "en", "sv", "es"}
        per_class = report["heldout"][label]["all"]["per_class"]
        assert all({"precision", "recall", "f1"} <= set(v) for v in per_class.values())
        assert report["cv"]["labels"][label]["all"]["n"] > 0
    assert report["data"]["same_as_training"] is True


def test_model_rejects_wrong_input_shape(trained):
    model = Registry(trained[1]).load().model
    assert isinstance(model, TriageClassifier)
    with pytest.raises(ValueError, match="language, text"):
        model.predict_proba(np.array(["just text"], dtype=object))
    assert set(model.predict(make_inputs(["en"], ["no data on 40 meters"]))) == {"category", "service", "severity"}


def test_tokenizer_vocab_is_bounded_in_a_long_running_process(monkeypatch):
    from triagebot.train import features

    nlp = features.get_nlp("sv")
    before = features.analyse("sv", "Hej! Våra 40 mätare har slutat skicka data.", full_lemma_table("sv"))
    monkeypatch.setattr(features, "MAX_VOCAB", len(nlp.vocab) + 100)
    features.analyse("sv", " ".join(f"ord{i}abc" for i in range(300)))
    fresh = features.get_nlp("sv")
    assert fresh is not nlp and len(fresh.vocab) < len(nlp.vocab)
    assert features.analyse("sv", "Hej! Våra 40 mätare har slutat skicka data.", full_lemma_table("sv")) == before


# -- reproducibility and the shipped model ------------------------------------------------------------------

SHIPPED = ROOT / "models"
EVAL_SET = ROOT / "training" / "eval" / "independent.jsonl"


def _shipped() -> tuple[Registry, dict]:
    reg = Registry(SHIPPED)
    version = reg.promoted()
    assert version, f"no promoted model in {SHIPPED}"
    return reg, reg.card(version)


def test_shipped_model_was_trained_on_the_current_training_data():
    """CI fails when training/data changes without `triagebot train` and a new model in models/."""
    _reg, card = _shipped()
    data = ds.load_dataset(DATA_DIR)
    td = card["training_data"]
    assert td["hash"] == data.data_hash, (
        "training/data changed since the shipped model was trained: run `triagebot train` and ship the result")
    assert td["file_sha256"] == dict(data.file_sha256)
    assert td["n_feedback"] == 0 and td["n_examples"] == len(data.examples)
    # what anyone needs to check a retrain against the card
    rep = card["reproducibility"]
    assert rep["seeds"]["svm_random_state"] is not None and rep["seeds"]["split_salt"] == ds.SPLIT_SALT
    assert len(rep["heldout_predictions_sha256"]) == 64
    for lib in ("python", "scikit-learn", "skops", "numpy", "scipy", "spacy", "spacy-lookups-data"):
        assert card["libraries"][lib] not in (None, "", "absent"), lib


def test_shipped_model_saw_the_inputs_normalization_makes_today():
    """The model's input is the normalized text: a change to normalization that changes it needs a retrain."""
    _reg, card = _shipped()
    train_ex, test_ex = ds.load_dataset(DATA_DIR).split()
    now = ds.inputs_sha256(ds.model_inputs(train_ex), ds.model_inputs(test_ex))
    assert card["training_data"]["inputs_sha256"] == now, (
        "normalization now gives the classifiers other text than the shipped model was trained on: "
        "run `triagebot train` and ship the result")


def test_shipped_registry_is_consistent():
    reg, card = _shipped()
    data = reg.read()
    for version, entry in data["versions"].items():
        folder = SHIPPED / version
        assert (folder / MODEL_FILE).is_file() and (folder / CARD_FILE).is_file(), version
        c = reg.card(version)
        assert c["file_sha256"] == sha256_file(folder / MODEL_FILE), version
        assert entry["data_hash"] == c["training_data"]["hash"] and entry["n_train"] == c["training_data"]["n_train"]
    stray = {p.name for p in SHIPPED.iterdir() if p.is_dir() and not p.name.startswith(".")} - set(data["versions"])
    assert stray <= {"langid"}, stray
    # held-out predictions of the shipped model are the ones its card records
    loaded = reg.load()
    _train, test_ex = ds.load_dataset(DATA_DIR).split()
    predicted = loaded.model.predict(ds.model_inputs(test_ex))
    digest = ds.predictions_sha256([e.id for e in test_ex], predicted)
    assert digest == card["reproducibility"]["heldout_predictions_sha256"]


def test_training_twice_gives_the_same_model(tmp_path):
    """Same data, code and libraries: same probabilities to the bit, whatever NumPy's global generator holds."""
    data = _slice_data(tmp_path / "d", every=6)
    runs = []
    for n, global_seed in enumerate((1, 2)):
        np.random.seed(global_seed)     # LinearSVC with random_state=None drew its seed from here
        r = train(data, models_dir=tmp_path / f"m{n}", select=True, cv_folds=2, candidates=("svm", "logreg"),
                  progress=False)
        runs.append((r, Registry(tmp_path / f"m{n}").load()))
    (a, la), (b, lb) = runs
    assert a.heads == b.heads
    assert a.card["metrics"] == b.card["metrics"]
    for key in ("hash", "inputs_sha256"):
        assert a.card["training_data"][key] == b.card["training_data"][key]
    assert (a.card["reproducibility"]["heldout_predictions_sha256"]
            == b.card["reproducibility"]["heldout_predictions_sha256"])
    X = ds.model_inputs(ds.load_dataset(data).examples)
    pa, pb = la.model.predict_proba(X), lb.model.predict_proba(X)
    for label in pa:
        np.testing.assert_array_equal(pa[label], pb[label])


def _eval_subset(dest: Path, every: int = 4) -> Path:
    lines = [x for x in EVAL_SET.read_text(encoding="utf-8").splitlines() if x.strip()]
    # every 4th message, plus every message in another language (there are few of them)
    keep = [x for i, x in enumerate(lines) if i % every == 0 or json.loads(x)["language"] == "other"]
    dest.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return dest


def test_evaluate_shipped_model_reports_the_eval_set_through_the_pipeline(tmp_path):
    from triagebot.train import cli_evaluate

    if not EVAL_SET.exists():
        pytest.skip(f"no {EVAL_SET}")
    subset = _eval_subset(tmp_path / "ev.jsonl")
    n = len(subset.read_text().splitlines())
    lines: list[str] = []
    status = cli_evaluate(tmp_path / "report", models_dir=SHIPPED, data_dir=_slice_data(tmp_path / "d", every=10),
                          cv=False, progress=False, eval_set=subset, out=lines.append)
    assert status == EXIT_OK, lines
    assert any(line.strip().startswith("all ") and "category" in line and "estimate" in line for line in lines)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    ev = report["eval_set"]
    assert ev["n"] == n and ev["dispositions"] == {"case": n}
    for lab in ("language", "category", "service", "severity", "severity_model", "tier", "estimate"):
        assert set(ev["labels"][lab]) == {"all", "en", "sv", "es", "other"}, lab
        assert ev["labels"][lab]["all"]["n"] == n
        wrong = ev["mistakes"].get(lab, [])
        if lab in ev["mistakes"] and len(wrong) < 40:
            # the figure is what the listed mistakes say it is
            assert ev["labels"][lab]["all"]["accuracy"] == pytest.approx(1 - len(wrong) / n, abs=1e-4), lab
    for lab in ("language", "category", "service", "severity", "tier"):
        all_ = ev["labels"][lab]["all"]
        assert all({"precision", "recall", "f1", "support"} <= set(v) for v in all_["per_class"].values())
        cm = np.array(all_["confusion"]["matrix"])
        assert cm.sum() == n and np.trace(cm) == round(all_["accuracy"] * n)
    # a sanity floor, far below the measured figures (category .957 on the whole set), that a broken
    # pipeline (wrong model, text not normalized, labels shifted) does not reach
    assert ev["accuracy"]["category"] > 0.75 and ev["accuracy"]["language"] > 0.9
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "Independent evaluation set, whole pipeline" in page
    for lab in ("language", "category", "service", "severity", "tier"):
        assert f"alt='ev-cm-{lab}-all'" in page and f"alt='ev-cm-{lab}-other'" in page


def test_evaluate_names_a_missing_eval_set_and_can_leave_it_out(trained, tmp_path):
    from triagebot.train import EXIT_ERROR, cli_evaluate

    data, models, _ = trained
    lines: list[str] = []
    assert cli_evaluate(tmp_path / "r1", models_dir=models, data_dir=data, cv=False, progress=False,
                        eval_set=tmp_path / "nope.jsonl", out=lines.append) == EXIT_ERROR
    assert any("nope.jsonl: no such evaluation set" in line for line in lines)
    assert cli_evaluate(tmp_path / "r2", models_dir=models, data_dir=data, cv=False, progress=False,
                        use_eval_set=False, out=lines.append) == EXIT_OK
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["eval_set"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "e1", "scenario": "s", "channel": "email", "language": "en", "subject": None,
                               "body": "hi", "labels": {"category": "incident", "service": "data",
                                                        "severity": "low"}}) + "\n")
    lines.clear()
    assert cli_evaluate(tmp_path / "r3", models_dir=models, data_dir=data, cv=False, progress=False,
                        eval_set=bad, out=lines.append) == EXIT_ERROR
    assert any(f"{bad}:1: labels: missing 'tier'" in line for line in lines)


def test_remove_an_unpromoted_version(trained, tmp_path):
    models = _copy_models(trained[1], tmp_path / "m")
    reg = Registry(models)
    a = reg.promoted()
    b = reg.save(reg.load().model, {"training_data": {"hash": "d" * 64}})
    with pytest.raises(ModelError, match="promoted version"):
        reg.remove(a)
    assert cli_models("remove", b, models_dir=models, out=lambda s: None) == EXIT_OK
    assert b not in reg.read()["versions"] and not (models / b).exists()
    assert reg.read()["history"][-1]["action"] == "remove" and reg.promoted() == a


def test_eval_set_lines_labelled_auto_reply_or_bounce_count_for_disposition_only(tmp_path):
    from triagebot.train import cli_evaluate

    if not EVAL_SET.exists():
        pytest.skip(f"no {EVAL_SET}")
    case_lines = [x for x in EVAL_SET.read_text(encoding="utf-8").splitlines() if x.strip()][:6]
    null = {"category": None, "service": None, "severity": None, "tier": None, "estimate": None}
    others = [
        {"id": "t-ar", "scenario": "t-ar", "channel": "email", "language": "en", "subject": "Out of office",
         "body": "I am out of the office until Monday with limited access to email.", "html": False,
         "headers": {"Auto-Submitted": "auto-replied"}, "labels": {**null, "disposition": "auto_reply"}},
        {"id": "t-bo", "scenario": "t-bo", "channel": "email", "language": "en",
         "subject": "Undelivered Mail Returned to Sender",
         "body": "This is the mail system at host mx.example.com.\n\nI'm sorry to have to inform you that your "
                 "message could not be delivered to one or more recipients.", "html": False,
         "headers": {"From": "MAILER-DAEMON@mx.example.com"}, "labels": {**null, "disposition": "bounce"}},
    ]
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(case_lines) + "\n", encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(o) for o in others) + "\n", encoding="utf-8")
    lines: list[str] = []
    status = cli_evaluate(tmp_path / "report", models_dir=SHIPPED, data_dir=_slice_data(tmp_path / "d", every=10),
                          cv=False, progress=False, eval_set=folder, out=lines.append)
    assert status == EXIT_OK, lines
    ev = json.loads((tmp_path / "report" / "report.json").read_text())["eval_set"]
    assert ev["labels"]["category"]["all"]["n"] == 6           # the labels count the `case` lines only
    disp = ev["labels"]["disposition"]["all"]
    assert disp["n"] == 8 and disp["per_class"]["auto_reply"]["support"] == 1
    assert disp["per_class"]["bounce"]["support"] == 1
    assert sum(ev["dispositions"].values()) == 8


def test_an_eval_line_with_an_unknown_disposition_is_named_by_file_and_line(tmp_path):
    from triagebot.train.dataset import DatasetError
    from triagebot.train.evalset import load_eval_set

    bad = tmp_path / "e.jsonl"
    bad.write_text(json.dumps({"id": "x", "scenario": "x", "channel": "email", "language": "en", "subject": None,
                               "body": "hi", "labels": {"disposition": "spam"}}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: labels: disposition 'spam'"):
        load_eval_set(bad)
