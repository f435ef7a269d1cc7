"""The classify step: category, service and severity from the promoted text classifiers, with confidences."""
from __future__ import annotations

from pathlib import Path

from triagebot.model import Message, Triage
from triagebot.settings import Settings
from triagebot.train.features import model_text
from triagebot.train.registry import ModelHandle

LABELS = ("category", "service", "severity")
MODEL_KEY = "classify"           # the key of this step's model in Triage.model_versions
DEFAULT_REVIEW_CONFIDENCE = 0.5


class ClassifyStep:
    """Predicts category, service and severity of a case message with calibrated confidences."""

    name = "classify"

    def __init__(self, settings: Settings | None = None, models_dir: Path | str | None = None,
                 handle: ModelHandle | None = None) -> None:
        self.review_confidence = settings.review_confidence if settings else DEFAULT_REVIEW_CONFIDENCE
        directory = Path(models_dir) if models_dir else (settings.models_dir if settings else Settings().models_dir)
        # the handle re-reads models/registry.json every few seconds, so a promotion needs no restart
        self.handle = handle or ModelHandle(directory)

    def warm_up(self) -> str | None:
        """Load the promoted model now (at worker start) rather than on the first message; its version."""
        loaded = self.handle.get()
        return loaded.version if loaded else None

    def __call__(self, message: Message, triage: Triage) -> Triage:
        if triage.disposition != "case":
            return triage.note(self.name, "skipped", f"disposition {triage.disposition}")
        loaded = self.handle.get()
        if loaded is None:
            return triage.note(self.name, "no model", self.handle.error or "no promoted model in models/")
        probs = loaded.model.predict_one(triage.language, model_text(message.subject, message.text))
        best = {lab: max(probs[lab].items(), key=lambda kv: kv[1]) for lab in LABELS}
        confidence = {**dict(triage.confidence), **{lab: round(p, 4) for lab, (_, p) in best.items()}}
        versions = {**dict(triage.model_versions), MODEL_KEY: loaded.version}
        t = triage.with_(category=best["category"][0], service=best["service"][0], severity=best["severity"][0],
                         confidence=confidence, model_versions=versions)
        top2 = "; ".join(f"{lab}: " + ", ".join(f"{c} {p:.2f}" for c, p in
                                                 sorted(probs[lab].items(), key=lambda kv: -kv[1])[:2])
                         for lab in LABELS)
        t = t.note(self.name, " ".join(f"{lab}={best[lab][0]}" for lab in LABELS), f"{top2}; model {loaded.version}")
        low = [f"{lab} {p:.2f}" for lab, (_, p) in best.items() if p < self.review_confidence]
        if low:
            t = t.note(self.name, "low confidence → review", f"{', '.join(low)} < {self.review_confidence:.2f}")
        return t
