"""The registry of pipeline steps, in the order they run. Names are unique; each is tested."""
from __future__ import annotations

from importlib import import_module

# (name, "module:Class"): the triage steps every message goes through, in order.
TRIAGE_STEPS: tuple[tuple[str, str], ...] = (
    ("disposition", "triagebot.steps.disposition:DispositionStep"),
    ("language", "triagebot.steps.language:LanguageStep"),
    ("customer", "triagebot.steps.customer:CustomerStep"),
    ("classify", "triagebot.steps.classify:ClassifyStep"),
    ("blast_radius", "triagebot.steps.blast_radius:BlastRadiusStep"),
    ("severity", "triagebot.steps.severity:SeverityStep"),
)


def load_step(path: str, **kwargs):
    """Import and construct one step from its "module:Class" path."""
    module, cls = path.split(":")
    return getattr(import_module(module), cls)(**kwargs)
