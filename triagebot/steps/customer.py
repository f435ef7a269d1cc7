"""The customer step: who the message is from and which tier they have."""
from __future__ import annotations

from pathlib import Path

from triagebot.customers import CustomerRegistry
from triagebot.model import Message, Triage


class CustomerStep:
    """Sets triage.customer and triage.customer_tier from the customer registry."""

    name = "customer"

    def __init__(self, rules_dir: Path | None = None, registry: CustomerRegistry | None = None) -> None:
        self.registry = registry or CustomerRegistry.load(rules_dir)

    def __call__(self, message: Message, triage: Triage) -> Triage:
        c = self.registry.lookup(message)
        detail = f"{c.match}, {c.matched_by}"
        if c.fleet_size:
            detail += f", fleet {c.fleet_size}"
        return triage.with_(customer=c.name, customer_tier=c.tier).note(self.name, f"{c.name} ({c.tier})", detail)
