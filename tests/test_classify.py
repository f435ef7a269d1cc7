"""The classify step: labels, confidences, model versions and trail from the promoted model; hot reload."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from triagebot.model import CATEGORIES, SERVICES, SEVERITIES, Message, Triage
from triagebot.settings import Settings
from triagebot.steps import TRIAGE_STEPS
from triagebot.steps.classify import ClassifyStep
from triagebot.train.registry import ModelHandle, Registry
from triagebot.train.train import train

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "training" / "data"
SHIPPED = ROOT / "models"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A quickly trained model (a third of the data, default heads) in a fresh models/ folder."""
    base = tmp_path_factory.mktemp("classify")
    data = base / "data"
    data.mkdir()
    files = sorted(DATA_DIR.glob("*.jsonl"))
    if not files:
        pytest.skip(f"no training data in {DATA_DIR}")
    for path in files:
        keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
                and int(hashlib.sha256(json.loads(line)["id"].encode()).hexdigest(), 16) % 3 == 0]
        (data / path.name).write_text("\n".join(keep) + "\n", encoding="utf-8")
    train(data, models_dir=base / "models", select=False, progress=False)
    return base / "models"


def _step(models: Path, review: float = 0.5, check_seconds: float = 2.0) -> ClassifyStep:
    settings = replace(Settings(), models_dir=models, review_confidence=review)
    return ClassifyStep(settings=settings, handle=ModelHandle(models, check_seconds=check_seconds))


OUTAGE = Message(source="email", subject="URGENT: all our meters offline",
                 text="Since 06:00 none of our 3,000 electricity meters send data. They attach but no PDP context "
                      "comes up. Please check the network now, billing reads are due today.")
QUESTION = Message(source="email", subject="Fråga om SMS-priser",
                   text="Hej! Vad kostar det att skicka SMS från våra enheter när de är i Danmark? Mvh Kalle")


def test_step_is_registered_under_its_name():
    assert ("classify", "triagebot.steps.classify:ClassifyStep") in TRIAGE_STEPS
    assert ClassifyStep.name == "classify" and ClassifyStep.__doc__


def test_labels_confidences_versions_and_trail(models):
    step = _step(models)
    before = Triage(language="en", confidence={"language": 0.97}, model_versions={"language": "x"})
    t = step(OUTAGE, before)
    assert t.category in CATEGORIES and t.service in SERVICES and t.severity in SEVERITIES
    assert t.category == "incident" and t.service == "data"
    assert set(t.confidence) == {"language", "category", "service", "severity"}
    assert t.confidence["language"] == 0.97                    # merged, not replaced
    assert all(0.0 <= t.confidence[k] <= 1.0 for k in ("category", "service", "severity"))
    assert t.model_versions == {"language": "x", "classify": Registry(models).promoted()}
    first = t.trail[0]
    assert first.step == "classify" and f"category={t.category}" in first.decision
    # the top two of each label, with probabilities
    assert first.detail.count(",") >= 3 and "category: " in first.detail and "severity: " in first.detail
    assert before.confidence == {"language": 0.97}             # the input triage is untouched (frozen)


def test_swedish_question(models):
    t = _step(models)(QUESTION, Triage(language="sv"))
    assert t.category == "information_request"
    assert t.severity == "low"


def test_low_confidence_is_routed_to_review(models):
    t = _step(models, review=1.01)(OUTAGE, Triage(language="en"))
    notes = [e for e in t.trail if e.decision == "low confidence → review"]
    assert len(notes) == 1 and "category" in notes[0].detail and "< 1.01" in notes[0].detail
    t = _step(models, review=0.0)(OUTAGE, Triage(language="en"))
    assert not [e for e in t.trail if "review" in e.decision]


def test_quoted_text_and_signature_do_not_count(models):
    step = _step(models)
    plain = step(OUTAGE, Triage(language="en"))
    noisy = step(replace(OUTAGE, quoted="> How do I order 500 new SIM cards and what is the price?",
                         signature="Kind regards\nAnna\n+46 70 123 45 67"), Triage(language="en"))
    assert noisy.confidence == plain.confidence


def test_not_a_case_is_left_alone(models):
    t = _step(models)(OUTAGE, Triage(disposition="auto_reply", language="en"))
    assert t.category is None and t.severity is None and "classify" not in t.model_versions
    assert t.trail[-1].decision == "skipped"


def test_no_model_is_said_not_guessed(tmp_path):
    t = _step(tmp_path)(OUTAGE, Triage(language="en"))
    assert t.category is None and t.service is None and t.severity is None
    assert t.trail[-1].decision == "no model"


def test_step_picks_up_a_promoted_model_without_restart(models, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(models, m)
    reg = Registry(m)
    first = reg.promoted()
    second = reg.save(reg.load().model, {"training_data": {"hash": "d" * 64}})
    step = _step(m, check_seconds=0)
    assert step(OUTAGE, Triage(language="en")).model_versions["classify"] == first
    reg.promote(second)
    assert step(OUTAGE, Triage(language="en")).model_versions["classify"] == second
    reg.rollback()
    assert step(OUTAGE, Triage(language="en")).model_versions["classify"] == first


def test_step_is_built_the_way_the_pipeline_builds_it(models):
    """Pipeline.default passes `settings` and `models_dir` when the step's signature asks for them."""
    import inspect

    params = inspect.signature(ClassifyStep).parameters
    assert "settings" in params and "models_dir" in params
    settings = replace(Settings(), models_dir=models, review_confidence=0.7)
    step = ClassifyStep(settings=settings, models_dir=settings.models_dir)
    assert step.handle.models_dir == models and step.review_confidence == 0.7
    assert step(OUTAGE, Triage(language="en")).category == "incident"


def test_shipped_model_loads_and_classifies():
    """The model in models/ works from a fresh clone: loads with these library versions, predicts."""
    if not (SHIPPED / "registry.json").exists():
        pytest.skip("no shipped model in models/ yet")
    loaded = Registry(SHIPPED).load()
    assert loaded.model.fast_scorer() is not None, loaded.model.fast_path_error
    t = ClassifyStep(models_dir=SHIPPED)(OUTAGE, Triage(language="en"))
    assert t.category == "incident" and t.model_versions["classify"] == loaded.version
