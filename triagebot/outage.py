"""Outage clustering: several customers reporting the same kind of problem become one parent incident.

A new incident case joins an outage when, within the configured time window, it is the same problem as an open
parent incident or as an open incident case of another customer: the same service and a country in common
(named in any language, or through a roaming partner's network: rules/countries.yaml), or, when neither names a
country, similar text. A country the writer names as working ("Sweden is fine") or as one where they have no SIMs
does not count, and a parent keeps to the countries most of its children name, so one stray country does not pull
in an unrelated case. The service is the classifier's, unless the text names only another traffic service.

The parent (kind "incident") has a blast radius that is the sum of what its children know (a child's estimate, or
the least its tier means), the highest severity of its children, `critical` from the configured number of
customers, and lists the affected customers. Every link is in both cases' trails.
"""
from __future__ import annotations

import math
import re
from bisect import bisect_right
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from triagebot.db.tables import Case, CaseEvent, MessageRow, as_utc, utcnow
from triagebot.model import TIERS, case_reference
from triagebot.rules_loader import RuleError, load_yaml_items, require, rules_path
from triagebot.settings import Settings

SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}
TIER_FOR = ((1000, "mass"), (11, "many"), (2, "few"), (1, "single"))
# What a tier says at least, for a child whose estimate is unknown: "some of our units" is 2, "hundreds" 11,
# "thousands" 1000, and "all our devices" of a customer whose fleet size the bot does not know a plural, 2.
TIER_LEAST = {"none": 0, "single": 1, "few": 2, "many": 11, "mass": 1000, "fleet": 2}
TRAFFIC_SERVICES = ("data", "sms", "voice")
MENTION_KINDS = ("absent", "unaffected", "trouble", "working")
COUNTRIES_FILE = "countries.yaml"

WORD = re.compile(r"[^\W\d_]{4,}", re.UNICODE)
MAX_CANDIDATES = 500  # unlinked incident cases compared with a new one (the newest in the window)
SIMILAR = 0.3  # cosine of word counts (stopwords left out) above which two reports without a country are one problem
MIN_SHARED_WORDS = 2  # and at least this many words in common: one shared noun ("router") is not a problem
CENTROID_WORDS = 60
# where a clause ends: a sentence end, a line break, a comma or semicolon, or a "but"
CLAUSE_END = re.compile(r"[.!?]+(?=\s|$)|[\n;,]|\b(?:but|however|although|whereas|while|men|dock|medan|fast|pero|"
                        r"sin embargo|aunque|mientras)\b")


@dataclass(frozen=True)
class Signature:
    """What clustering compares: service, countries where the problem is, and the words of the report."""

    service: str | None
    countries: frozenset[str]
    words: Counter
    set_aside: frozenset[str] = frozenset()     # countries named as working or as having none of the SIMs
    note: str = ""                              # why the service differs from the classifier's, if it does

    def as_json(self) -> dict:
        d = {"service": self.service, "countries": sorted(self.countries),
             "words": dict(self.words.most_common(40))}
        if self.set_aside:
            d["set_aside"] = sorted(self.set_aside)
        if self.note:
            d["note"] = self.note
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> "Signature":
        d = d or {}
        return cls(d.get("service"), frozenset(d.get("countries", ())), Counter(d.get("words", {})),
                   frozenset(d.get("set_aside", ())), d.get("note", ""))


def _fold(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s.lower()) if not unicodedata.combining(c))


def _words(patterns: list[str]) -> re.Pattern:
    return re.compile(r"(?<!\w)(?:" + "|".join(f"(?:{p})" for p in patterns) + r")(?!\w)")


@dataclass(frozen=True)
class CountryRules:
    """rules/countries.yaml: country names and networks, how clauses set a country aside, service words."""

    places: re.Pattern
    codes: dict[str, str]                       # folded name or network -> country code
    mentions: dict[str, re.Pattern] = field(default_factory=dict)
    services: dict[str, re.Pattern] = field(default_factory=dict)
    stopwords: frozenset[str] = frozenset()

    @classmethod
    def load(cls, rules_dir: Path | None = None) -> "CountryRules":
        return _load(rules_path(COUNTRIES_FILE, rules_dir))


@lru_cache(maxsize=4)
def _load(path: Path) -> CountryRules:
    codes: dict[str, str] = {}
    for item in load_yaml_items(path, "countries"):
        entry = require(item, path, {"code": str, "names": list})
        if not re.fullmatch(r"[A-Z]{2}", entry["code"]):
            raise RuleError(path, item.line, f"code {entry['code']!r} is not an ISO 3166 alpha-2 code")
        networks = entry.get("networks", [])
        if not isinstance(networks, list):
            raise RuleError(path, item.line, "networks must be a list")
        for n in [*entry["names"], *networks]:
            name = _fold(str(n)).strip()
            if not name:
                raise RuleError(path, item.line, "an empty name")
            if codes.get(name, entry["code"]) != entry["code"]:
                raise RuleError(path, item.line, f"{n!r} already names {codes[name]}")
            codes[name] = entry["code"]
    alternatives = "|".join(sorted(map(re.escape, codes), key=len, reverse=True))
    places = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
    mentions = _patterns(path, "mentions", "kind", MENTION_KINDS)
    services = _patterns(path, "services", "service", TRAFFIC_SERVICES)
    stopwords: set[str] = set()
    for item in load_yaml_items(path, "stopwords"):
        entry = require(item, path, {"lang": str, "words": list})
        stopwords.update(_fold(str(w)).strip() for w in entry["words"])
    return CountryRules(places, codes, mentions, services, frozenset(stopwords))


def _patterns(path: Path, key: str, field_name: str, allowed: tuple[str, ...]) -> dict[str, re.Pattern]:
    found: dict[str, list[str]] = {a: [] for a in allowed}
    for item in load_yaml_items(path, key):
        entry = require(item, path, {field_name: str, "patterns": list})
        if entry[field_name] not in allowed:
            raise RuleError(path, item.line, f"{field_name}={entry[field_name]!r} is not one of {', '.join(allowed)}")
        for p in entry["patterns"]:
            try:
                re.compile(str(p))
            except re.error as e:
                raise RuleError(path, item.line, f"pattern {p!r} is not a regular expression: {e}") from None
            found[entry[field_name]].append(_fold(str(p)))
    missing = [a for a, ps in found.items() if not ps]
    if missing:
        raise RuleError(path, None, f"{key}: no patterns for {', '.join(missing)}")
    return {a: _words(ps) for a, ps in found.items()}


def _clauses(folded: str) -> list[tuple[int, int]]:
    """The (start, end) of each clause of a folded text."""
    out, start = [], 0
    for m in CLAUSE_END.finditer(folded):
        out.append((start, m.start()))
        start = m.end()
    out.append((start, len(folded)))
    return out


def _mention(rules: CountryRules, clause: str) -> str:
    """How a clause names its countries: absent, unaffected, trouble, working, or plain (counts)."""
    for kind in MENTION_KINDS:
        if rules.mentions[kind].search(clause):
            return kind
    return "plain"


def signature(subject: str | None, body: str, service: str | None, rules_dir: Path | None) -> Signature:
    """The clustering signature of a report."""
    rules = CountryRules.load(rules_dir)
    folded = _fold(f"{subject or ''}\n{body}")
    clauses = _clauses(folded)
    starts = [a for a, _b in clauses]
    kinds: dict[int, str] = {}           # clause index -> how it names its countries
    named: dict[str, bool] = {}          # country -> does it count (named in a clause that is not "it works there")
    for m in rules.places.finditer(folded):
        i = bisect_right(starts, m.start()) - 1
        if i not in kinds:
            kinds[i] = _mention(rules, folded[clauses[i][0]:clauses[i][1]])
        code = rules.codes[m.group(0)]
        named[code] = named.get(code, False) or kinds[i] in ("trouble", "plain")
    countries = frozenset(c for c, counts in named.items() if counts)
    note, cluster_service = "", service
    if service in TRAFFIC_SERVICES:
        in_text = [s for s, p in rules.services.items() if p.search(folded)]
        if service not in in_text and len(in_text) == 1:
            cluster_service = in_text[0]
            note = f"service {service} by the classifier, but the text names only {cluster_service}"
    words = Counter(_stem(w) for w in WORD.findall(folded) if w not in rules.stopwords)
    return Signature(cluster_service, countries, words, frozenset(named) - countries, note)


def _stem(word: str) -> str:
    """A word without a plural -s, so "router" and "routers" are one word."""
    return word[:-1] if len(word) > 4 and word.endswith("s") and not word.endswith("ss") else word


def similarity(a: Counter, b: Counter) -> float:
    """Cosine similarity of two word-count vectors."""
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def same_problem(a: Signature, b: Signature) -> tuple[bool, str]:
    """Whether two reports (or a report and an outage) describe the same problem, and why."""
    if not a.service or a.service != b.service:
        return False, "different service"
    if a.countries or b.countries:
        shared = a.countries & b.countries
        return (bool(shared), f"same service {a.service}, both in {','.join(sorted(shared))}" if shared
                else "no country in common")
    sim, shared = similarity(a.words, b.words), len(a.words.keys() & b.words.keys())
    if shared < MIN_SHARED_WORDS:
        return False, f"text similarity {sim:.2f} from {shared} word in common"
    return sim >= SIMILAR, f"same service {a.service}, text similarity {sim:.2f}"


def known_count(estimate: int | None, tier: str | None) -> int:
    """What a case knows of how many SIMs it concerns: its estimate, else the least its tier means."""
    return estimate if estimate else TIER_LEAST.get(tier or "none", 0)


def _lock(s: Session) -> None:
    if s.get_bind().dialect.name == "postgresql":
        # one clustering decision at a time across workers, so a storm makes one parent, not several
        s.execute(text("SELECT pg_advisory_xact_lock(727274)"))


def link(s: Session, case: Case, sig: Signature, settings: Settings,
         reported_at: datetime | None = None) -> Case | None:
    """Attach a new incident case to an outage when other customers report the same; returns the parent.

    The time window is about when the reports arrived (`reported_at`, the intake time), not when a worker
    got to them: after a backlog, reports hours apart are still hours apart.
    """
    if case.category != "incident" or case.kind != "case" or not sig.service:
        return None
    _lock(s)
    window = timedelta(minutes=settings.outage_window_minutes)
    at = as_utc(reported_at) if reported_at is not None else utcnow()
    since = at - window  # a case processed before this is also reported before it: a safe first filter
    # an outage already open: join it when the report is the problem most of its children describe
    parents = s.execute(select(Case.id, Case.features).where(Case.kind == "incident", Case.status == "open",
                                                             Case.updated_at >= since).order_by(Case.id)).all()
    for parent_id, features in parents:
        ok, why = same_problem(sig, Signature.from_json(features))
        if not ok:
            continue
        first, last = _reports_span(s, parent_id)
        if first is None or (at - window <= last and first <= at + window):
            return _join(s, case, s.get(Case, parent_id), why, settings, like=None)
    # or another customer's open incident not yet in an outage: the two open one
    # (only their ids and signatures are read, the newest MAX_CANDIDATES of them: in a busy hour there are
    # many, and few are the same problem; a storm's later reports pair with its recent ones)
    candidates = s.execute(select(Case.id, Case.features).where(
        Case.kind == "case", Case.category == "incident", Case.status == "open", Case.parent_id.is_(None),
        Case.id != case.id, Case.customer != case.customer, Case.created_at >= since)
        .order_by(Case.id.desc()).limit(MAX_CANDIDATES)).all()
    for other_id, features in reversed(candidates):
        ok, why = same_problem(sig, Signature.from_json(features))
        if not ok:
            continue
        first = _first_report(s, other_id)
        if first is None or abs(first - at) <= window:
            other = s.get(Case, other_id)
            parent = _new_parent(s, other, case, why)
            return _join(s, case, parent, why, settings, like=other)
    return None


def _first_report(s: Session, case_id: int) -> datetime | None:
    """When the first message of a case arrived (its intake time)."""
    t = s.scalar(select(func.min(MessageRow.received_at)).where(MessageRow.case_id == case_id))
    return as_utc(t) if t is not None else None


def _reports_span(s: Session, parent_id: int) -> tuple[datetime | None, datetime | None]:
    """When the first and the last message of an outage's children arrived."""
    first, last = s.execute(select(func.min(MessageRow.received_at), func.max(MessageRow.received_at))
                            .join(Case, Case.id == MessageRow.case_id).where(Case.parent_id == parent_id)).one()
    return (as_utc(first), as_utc(last)) if first is not None else (None, None)


def _join(s: Session, case: Case, parent: Case, why: str, settings: Settings, like: Case | None) -> Case:
    case.parent_id = parent.id
    detail = {"parent": parent.reference, "why": why}
    if like is not None:
        detail["like"] = like.reference
    if case.features.get("note"):
        detail["note"] = case.features["note"]
    s.add(CaseEvent(case_id=case.id, actor="bot", kind="outage_linked", detail=detail))
    refresh_parent(s, parent, settings)
    return parent


def _new_parent(s: Session, first: Case, second: Case, why: str) -> Case:
    now = utcnow()
    parent = Case(kind="incident", status="open", customer=None, subject=f"Outage: {first.subject}",
                  language=first.language, category="incident", service=first.features.get("service"),
                  severity=first.severity, blast_estimate=first.blast_estimate, blast_tier=first.blast_tier,
                  identifiers={}, features=first.features, created_at=now, updated_at=now)
    s.add(parent)
    s.flush()
    parent.reference = case_reference(parent.id)
    first.parent_id = parent.id
    s.add(CaseEvent(case_id=parent.id, actor="bot", kind="outage_opened",
                    detail={"first": first.reference, "second": second.reference, "why": why}))
    detail = {"parent": parent.reference, "why": why, "like": second.reference}
    if first.features.get("note"):
        detail["note"] = first.features["note"]
    s.add(CaseEvent(case_id=first.id, actor="bot", kind="outage_linked", detail=detail))
    return parent


def _cluster_features(children: list[Case], service: str | None) -> dict:
    """The parent's signature: its service, the countries most children name, and their words together."""
    sigs = [Signature.from_json(c.features) for c in children]
    named = Counter(code for sig in sigs for code in sig.countries)
    core = sorted(code for code, n in named.items() if 2 * n > len(sigs))
    if not core and named:
        top = max(named.values())
        core = sorted(code for code, n in named.items() if n == top)
    words: Counter = Counter()
    for sig in sigs:
        words.update(sig.words)
    return {"service": service, "countries": core, "words": dict(words.most_common(CENTROID_WORDS))}


def refresh_parent(s: Session, parent: Case, settings: Settings) -> None:
    """Recompute a parent's blast radius, severity, signature and affected customers from its children."""
    s.flush()
    if s.get_bind().dialect.name == "postgresql":
        # the parent's row lock: two workers refreshing one parent take turns, the second sees the first's children
        s.execute(select(Case.id).where(Case.id == parent.id).with_for_update())
    children = s.scalars(select(Case).where(Case.parent_id == parent.id).order_by(Case.id)
                         .execution_options(populate_existing=True)).all()
    customers = sorted({c.customer for c in children if c.customer})
    estimate = sum(known_count(c.blast_estimate, c.blast_tier) for c in children)
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
    parent.features = _cluster_features(children, (parent.features or {}).get("service") or parent.service)
    parent.updated_at = utcnow()
    s.add(CaseEvent(case_id=parent.id, actor="bot", kind="outage_updated",
                    detail={"children": len(children), "customers": customers, "before": list(before),
                            "blast": [parent.blast_estimate, parent.blast_tier], "severity": severity,
                            "reason": reason, "countries": parent.features["countries"]}))


def child_updated(s: Session, case: Case, settings: Settings) -> Case | None:
    """A child's blast radius or severity changed (a follow-up in its thread): bring its parent up to date."""
    if case.parent_id is None:
        return None
    parent = s.get(Case, case.parent_id)
    if parent is None or parent.kind != "incident":
        return None
    refresh_parent(s, parent, settings)
    return parent


def affected_customers(s: Session, parent: Case) -> list[str]:
    """The customers of a parent incident's children, to keep them all updated."""
    return sorted({c.customer for c in s.scalars(select(Case).where(Case.parent_id == parent.id)) if c.customer})
