"""The data that flows through triagebot: Message, Attachment, Identifiers, BlastRadius, Triage, Case.

Defined once, frozen, passed between steps. No free-form dicts between modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, Mapping

Source = Literal["email", "slack"]
Disposition = Literal["case", "auto_reply", "bounce"]

DISPOSITIONS = ("case", "auto_reply", "bounce")
LANGUAGES = ("en", "sv", "es", "other")
CATEGORIES = ("incident", "information_request", "service_request", "order")
SERVICES = ("data", "sms", "voice", "csd", "billing", "sim", "platform", "network_access", "other")
SEVERITIES = ("critical", "high", "medium", "low")
TIERS = ("none", "single", "few", "many", "mass", "fleet")
ID_KINDS = ("iccid", "imsi", "msisdn", "imei")


@dataclass(frozen=True)
class Attachment:
    """One attachment: its name, type, size and, for CSV/TXT/XLSX, its text."""

    filename: str | None
    content_type: str
    size: int
    text: str | None = None


@dataclass(frozen=True)
class Message:
    """A normalized message from any channel.

    `text` is the new text the writer wrote (no quoted earlier mail, no signature);
    `quoted` and `signature` keep what was separated out, so later steps can ignore it
    but an agent can still see it.
    """

    source: Source
    text: str
    subject: str | None = None
    message_id: str | None = None
    sender: str | None = None            # e-mail address (lower-case) or Slack user id
    sender_name: str | None = None
    recipients: tuple[str, ...] = ()
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    date: datetime | None = None
    headers: tuple[tuple[str, str], ...] = ()   # decoded header (name, value) pairs, in order
    quoted: str = ""
    signature: str = ""
    attachments: tuple[Attachment, ...] = ()
    # Slack
    channel: str | None = None
    team_id: str | None = None
    ts: str | None = None
    thread_ts: str | None = None
    user_locale: str | None = None
    # the language this sender or thread used before, filled in by ingest from the database
    language_hint: str | None = None
    # what normalization noticed: "malformed_mime", "charset_guessed", "html_only", "forwarded", ...
    flags: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitive, or None."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None

    @property
    def sender_domain(self) -> str | None:
        if self.sender and "@" in self.sender:
            return self.sender.rsplit("@", 1)[1].lower()
        return None

    @property
    def attachment_text(self) -> str:
        return "\n".join(a.text for a in self.attachments if a.text)


@dataclass(frozen=True)
class Identifiers:
    """SIM identifiers in normal form, de-duplicated, in order of first appearance."""

    iccid: tuple[str, ...] = ()
    imsi: tuple[str, ...] = ()
    msisdn: tuple[str, ...] = ()
    imei: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in ID_KINDS}

    def distinct_sims(self) -> int:
        """How many distinct SIMs/devices the identifiers name (the largest kind's count)."""
        return max(len(self.iccid), len(self.imsi), len(self.msisdn), len(self.imei))


@dataclass(frozen=True)
class BlastRadius:
    """How many of the customer's existing SIMs the message concerns."""

    estimate: int | None
    tier: str
    identifiers: Identifiers = field(default_factory=Identifiers)
    evidence: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "tier": self.tier, "identifiers": self.identifiers.as_dict()}


@dataclass(frozen=True)
class TrailEntry:
    """One decision of one step: which rule or model said what, and why."""

    step: str
    decision: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.step}: {self.decision}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Triage:
    """What the pipeline decided about one message."""

    disposition: str = "case"
    language: str = "other"
    category: str | None = None
    service: str | None = None
    severity: str | None = None
    blast_radius: BlastRadius = field(default_factory=lambda: BlastRadius(None, "none"))
    confidence: Mapping[str, float] = field(default_factory=dict)
    trail: tuple[TrailEntry, ...] = ()
    model_versions: Mapping[str, str] = field(default_factory=dict)
    customer: str | None = None
    customer_tier: str | None = None

    def note(self, step: str, decision: str, detail: str = "") -> "Triage":
        """A copy with one more trail entry."""
        return replace(self, trail=self.trail + (TrailEntry(step, decision, detail),))

    def with_(self, **changes) -> "Triage":
        return replace(self, **changes)


@dataclass(frozen=True)
class Case:
    """A support case as the threading step and agents see it."""

    id: int
    reference: str
    customer: str | None
    status: str
    category: str | None
    service: str | None
    severity: str | None
    blast_estimate: int | None
    blast_tier: str
    subject: str | None
    sla_due: datetime | None = None
    parent_id: int | None = None


def case_reference(case_id: int) -> str:
    """The human reference of a case: CASE-000123."""
    return f"CASE-{case_id:06d}"
