"""Outage clustering: several customers reporting the same kind of problem become one parent incident.

A new incident case joins a cluster when, within the configured time window, an open incident case
of the same service exists at another customer, and the two share a country (or, when neither names
one, their texts are similar). The cluster gets a parent case (kind "incident") whose blast radius is
the sum of what its children know, whose severity is the highest of theirs, and which turns critical
past a configured number of customers. Every link is in both cases' trails.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from triagebot.db.tables import Case, CaseEvent, utcnow
from triagebot.model import TIERS, case_reference
from triagebot.rules_loader import RuleError, load_yaml_items, require, rules_path
from triagebot.settings import Settings

SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}
TIER_FOR = ((1000, "mass"), (11, "many"), (2, "few"), (1, "single"))

WORD = re.compile(r"[^\W\d_]{4,}", re.UNICODE)
SIMILAR = 0.3  # cosine of word counts above which two reports without a country are the same problem


@dataclass(frozen=True)
class Signature:
    """What clustering compares: service, countries named, and the words of the report."""

    service: str | None
    countries: frozenset[str]
    words: Counter

    def as_json(self) -> dict:
        return {"service": self.service, "countries": sorted(self.countries), "words": dict(self.words.most_common(40))}

    @classmethod
    def from_json(cls, d: dict | None) -> "Signature":
        d = d or {}
        return cls(d.get("service"), frozenset(d.get("countries", ())), Counter(d.get("words", {})))


def _fold(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s.lower()) if not unicodedata.combining(c))


@lru_cache(maxsize=4)
def _countries(rules_dir: Path) -> tuple[re.Pattern, dict[str, str]]:
    path = rules_path("countries.yaml", rules_dir)
    names: dict[str, str] = {}
    for item in load_yaml_items(path, "countries"):
        entry = require(item, path, {"code": str, "names": list})
        if not re.fullmatch(r"[A-Z]{2}", entry["code"]):
            raise RuleError(path, item.line, f"code {entry['code']!r} is not an ISO 3166 alpha-2 code")
        for n in entry["names"]:
            names[_fold(str(n))] = entry["code"]
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b"), names


def signature(subject: str | None, body: str, service: str | None, rules_dir: Path) -> Signature:
    """The clustering signature of a report."""
    pattern, names = _countries(rules_dir)
    folded = _fold(f"{subject or ''}\n{body}")
    countries = frozenset(names[m.group(0)] for m in pattern.finditer(folded))
    return Signature(service, countries, Counter(WORD.findall(folded)))


def similarity(a: Counter, b: Counter) -> float:
    """Cosine similarity of two word-count vectors."""
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def same_problem(a: Signature, b: Signature) -> tuple[bool, str]:
    """Whether two reports describe the same outage, and why."""
    if not a.service or a.service != b.service:
        return False, "different service"
    if a.countries or b.countries:
        shared = a.countries & b.countries
        return (bool(shared), f"same service {a.service}, both in {','.join(sorted(shared))}" if shared
                else "no country in common")
    sim = similarity(a.words, b.words)
    return sim >= SIMILAR, f"same service {a.service}, text similarity {sim:.2f}"


def link(s: Session, case: Case, sig: Signature, settings: Settings) -> Case | None:
    """Attach a new incident case to an outage cluster when other customers report the same; returns the parent."""
    if case.category != "incident" or case.kind != "case":
        return None
    if s.get_bind().dialect.name == "postgresql":
        # one clustering decision at a time across workers, so a storm makes one parent, not several
        s.execute(text("SELECT pg_advisory_xact_lock(727274)"))
    since = utcnow() - timedelta(minutes=settings.outage_window_minutes)
    candidates = s.scalars(select(Case).where(Case.kind == "case", Case.category == "incident",
                                              Case.service == case.service, Case.status == "open",
                                              Case.id != case.id, Case.created_at >= since)
                           .order_by(Case.id)).all()
    for other in candidates:
        if other.customer == case.customer and other.parent_id is None:
            continue  # one customer's reports are not an outage of many customers on their own
        ok, why = same_problem(sig, Signature.from_json(other.features))
        if not ok:
            continue
        parent = s.get(Case, other.parent_id) if other.parent_id else None
        if parent is None:
            parent = _new_parent(s, other, why)
        case.parent_id = parent.id
        s.add(CaseEvent(case_id=case.id, actor="bot", kind="outage_linked",
                        detail={"parent": parent.reference, "like": other.reference, "why": why}))
        refresh_parent(s, parent, settings)
        return parent
    return None


def _new_parent(s: Session, first: Case, why: str) -> Case:
    now = utcnow()
    parent = Case(kind="incident", status="open", customer=None, subject=f"Outage: {first.subject}",
                  language=first.language, category="incident", service=first.service, severity=first.severity,
                  blast_estimate=first.blast_estimate, blast_tier=first.blast_tier, identifiers={},
                  features=first.features, created_at=now, updated_at=now)
    s.add(parent)
    s.flush()
    parent.reference = case_reference(parent.id)
    first.parent_id = parent.id
    s.add(CaseEvent(case_id=parent.id, actor="bot", kind="outage_opened",
                    detail={"first": first.reference, "why": why}))
    s.add(CaseEvent(case_id=first.id, actor="bot", kind="outage_linked", detail={"parent": parent.reference}))
    return parent


def refresh_parent(s: Session, parent: Case, settings: Settings) -> None:
    """Recompute a parent's blast radius, severity and affected customers from its children."""
    s.flush()
    children = s.scalars(select(Case).where(Case.parent_id == parent.id)).all()
    customers = sorted({c.customer for c in children if c.customer})
    estimate = sum(c.blast_estimate or (1 if c.blast_tier != "none" else 0) for c in children)
    severity = max((c.severity for c in children if c.severity), key=lambda v: SEVERITY_RANK[v], default="high")
    reason = None
    if len(customers) >= settings.outage_critical_customers and severity != "critical":
        severity, reason = "critical", f"{len(customers)} customers affected (critical from {settings.outage_critical_customers})"
    tier = next((t for n, t in TIER_FOR if estimate >= n), "none")
    widest = max((c.blast_tier for c in children), key=TIERS.index, default="none")
    tier = max(tier, widest, key=TIERS.index)  # a child's "all our devices" is at least as wide as a count
    before = (parent.blast_estimate, parent.blast_tier, parent.severity)
    parent.blast_estimate, parent.blast_tier, parent.severity = estimate or None, tier, severity
    parent.customer = f"{len(customers)} customers"
    parent.updated_at = utcnow()
    s.add(CaseEvent(case_id=parent.id, actor="bot", kind="outage_updated",
                    detail={"children": len(children), "customers": customers, "before": list(before),
                            "blast": [parent.blast_estimate, parent.blast_tier], "severity": severity,
                            "reason": reason}))


def affected_customers(s: Session, parent: Case) -> list[str]:
    """The customers of a parent incident's children, to keep them all updated."""
    return sorted({c.customer for c in s.scalars(select(Case).where(Case.parent_id == parent.id)) if c.customer})
