"""The interface every pipeline step implements."""
from __future__ import annotations

from typing import Protocol

from triagebot.model import Message, Triage


class Step(Protocol):
    """One small named step: takes the message and the triage so far, returns the new triage.

    A step records its decision with `triage.note(self.name, decision, detail)`.
    """

    name: str

    def __call__(self, message: Message, triage: Triage) -> Triage: ...
