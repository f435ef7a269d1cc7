"""Runs the triage steps in order over one message and keeps the trail of what each decided."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence

from triagebot.model import Message, Triage
from triagebot.settings import Settings
from triagebot.steps import TRIAGE_STEPS, load_step
from triagebot.steps.base import Step

# Steps that only matter for messages that become cases.
CASE_ONLY = {"customer", "classify", "blast_radius", "severity"}


@dataclass
class Pipeline:
    """The triage pipeline: small named steps, run in order, each leaving a trail entry."""

    steps: Sequence[Step] = field(default_factory=tuple)

    @classmethod
    def default(cls, settings: Settings | None = None) -> "Pipeline":
        """The registered steps, each built with the settings it asks for."""
        settings = settings or Settings.load()
        steps = []
        for _name, path in TRIAGE_STEPS:
            module, clsname = path.split(":")
            from importlib import import_module
            step_cls = getattr(import_module(module), clsname)
            params = inspect.signature(step_cls).parameters
            kwargs = {}
            if "settings" in params:
                kwargs["settings"] = settings
            if "rules_dir" in params:
                kwargs["rules_dir"] = settings.rules_dir
            if "models_dir" in params:
                kwargs["models_dir"] = settings.models_dir
            steps.append(load_step(path, **kwargs))
        return cls(tuple(steps))

    def run(self, message: Message, triage: Triage | None = None) -> Triage:
        """Triage one message."""
        t = triage or Triage()
        for step in self.steps:
            if step.name in CASE_ONLY and t.disposition != "case":
                continue
            t = step(message, t)
        if t.disposition != "case":
            t = t.with_(category=None, service=None, severity=None)
        return t


def triage_record(message: Message, triage: Triage) -> dict:
    """The fields of CONTRACT.md for one triaged message, plus the trail."""
    return {
        "source": message.source,
        "message_id": message.message_id,
        "disposition": triage.disposition,
        "language": triage.language,
        "category": triage.category,
        "service": triage.service,
        "severity": triage.severity,
        "blast_radius": triage.blast_radius.as_dict(),
        "confidence": {k: round(float(v), 4) for k, v in triage.confidence.items()},
        "customer": triage.customer,
        "customer_tier": triage.customer_tier,
        "subject": message.subject,
        "flags": list(message.flags),
        "trail": [str(e) for e in triage.trail],
        "model_versions": dict(triage.model_versions),
    }
