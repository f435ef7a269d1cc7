"""The severity step: the classifier's severity raised by the policy table in rules/severity_policy.yaml.

The table makes TAXONOMY.md's severity "for a customer with no special tier" (floors for outages, safety,
fraud, many SIMs, business impact, incidents, deadlines; ceilings for consumer entertainment and for
non-incidents), then raises it for the customer's tier as a separate, visible trail entry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from triagebot.model import CATEGORIES, SERVICES, SEVERITIES, TIERS, Message, TrailEntry, Triage
from triagebot.rules_loader import Item, RuleError, load_yaml, load_yaml_items, rules_path

POLICY_FILE = "severity_policy.yaml"
CUSTOMER_TIERS = ("standard", "enterprise", "vip")
_CONDITIONS = {"category", "service", "tier", "incident", "phrases", "not_phrases"}
_RULE_FIELDS = {"name", "when", "min", "max", "unless", "reason"}
_ESCAPE = re.compile(r"\\.")
_UPPER = re.compile(r"[^\W\d_a-zà-öø-ÿ]")


@dataclass(frozen=True)
class Condition:
    """What must hold for a rule: all given parts."""

    categories: tuple[str, ...] | None = None
    services: tuple[str, ...] | None = None
    tiers: tuple[str, ...] | None = None
    incident: bool | None = None
    phrases: tuple[str, ...] = ()          # every one of these phrase lists must match
    not_phrases: tuple[str, ...] = ()      # none of these may match


@dataclass(frozen=True)
class Rule:
    """One row of the policy table: a floor (min) or a ceiling (max) with its reason."""

    name: str
    line: int
    when: Condition
    min: str | None = None
    max: str | None = None
    unless: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class TierRaise:
    """How many levels a customer tier raises, up to which level, and when."""

    tier: str
    raise_by: int
    up_to: str
    when: Condition = field(default_factory=Condition)
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    """The outcome of the policy for one message, with every step that changed it."""

    start: str                               # the classifier's value, or "low" without one
    from_classifier: bool
    taxonomy: str                            # after floors and ceilings: severity for a standard customer
    final: str                               # after the customer-tier raise
    fired: tuple[tuple[str, str, str], ...]  # (rule name, "min"/"max", reason) of rules that changed the value
    held: tuple[str, ...]                    # names of every rule whose conditions held
    tier_reason: str = ""


def _level(levels: tuple[str, ...], s: str) -> int:
    return levels.index(s)


class SeverityPolicy:
    """The severity table: levels, rules, customer tiers, repeated contacts and phrase lists."""

    def __init__(self, levels: tuple[str, ...], rules: tuple[Rule, ...], tiers: dict[str, TierRaise],
                 repeats: dict[str, Any], phrases: dict[str, re.Pattern[str]]) -> None:
        self.levels, self.rules, self.tiers, self.repeats, self.phrases = levels, rules, tiers, repeats, phrases

    @classmethod
    def load(cls, rules_dir: Path | None = None) -> "SeverityPolicy":
        """Read and validate rules/severity_policy.yaml; a mistake raises RuleError naming file and line."""
        return _load(rules_path(POLICY_FILE, rules_dir))

    def holds(self, c: Condition, triage: Triage, text: str, cache: dict[str, bool]) -> bool:
        """True when every part of the condition holds for this triage and text."""
        if c.categories is not None and triage.category not in c.categories:
            return False
        if c.services is not None and triage.service not in c.services:
            return False
        if c.tiers is not None and triage.blast_radius.tier not in c.tiers:
            return False
        if c.incident is not None:
            is_incident = triage.category == "incident" or (
                triage.category is None and self.says(text, "failure", cache))
            if is_incident != c.incident:
                return False
        if any(not self.says(text, p, cache) for p in c.phrases):
            return False
        if any(self.says(text, p, cache) for p in c.not_phrases):
            return False
        return True

    def says(self, text: str, phrase_list: str, cache: dict[str, bool]) -> bool:
        if phrase_list not in cache:
            cache[phrase_list] = bool(self.phrases[phrase_list].search(text))
        return cache[phrase_list]

    def decide(self, triage: Triage, text: str, customer_tier: str | None = None) -> Decision:
        """Apply floors, ceilings and the customer-tier raise to the triage's severity."""
        lv = self.levels
        text = text.lower()
        from_classifier = triage.severity in lv
        start = triage.severity if from_classifier else lv[0]
        cache: dict[str, bool] = {}
        held = [r for r in self.rules if self.holds(r.when, triage, text, cache)]
        held_names = {r.name for r in held}
        value = _level(lv, start)  # type: ignore[arg-type]
        fired: list[tuple[str, str, str]] = []
        for r in held:
            if r.min is not None and _level(lv, r.min) > value:
                value = _level(lv, r.min)
                fired.append((r.name, "min", r.reason))
        for r in held:
            if r.max is not None and not (held_names & set(r.unless)) and _level(lv, r.max) < value:
                value = _level(lv, r.max)
                fired.append((r.name, "max", r.reason))
        taxonomy = lv[value]
        tier_reason = ""
        t = self.tiers.get(customer_tier or "standard")
        if t and t.raise_by and self.holds(t.when, triage, text, cache):
            raised = min(value + t.raise_by, _level(lv, t.up_to))
            if raised > value:
                value = raised
                tier_reason = t.reason
        return Decision(start, from_classifier, taxonomy, lv[value], tuple(fired), tuple(r.name for r in held),
                        tier_reason)

    def raise_for_repeats(self, severity: str, contacts: int) -> tuple[str, str]:
        """The severity after `contacts` messages about the same open case, and the reason ('' when unchanged)."""
        rc = self.repeats
        if not rc or severity not in self.levels or contacts < rc["min_contacts"]:
            return severity, ""
        value = _level(self.levels, severity)
        raised = min(value + rc["raise"], _level(self.levels, rc["up_to"]))
        if raised <= value:
            return severity, ""
        return self.levels[raised], f"{rc['reason']} ({contacts} contacts)"


def _choice(path: Path, line: int, what: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise RuleError(path, line, f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _condition(path: Path, line: int, raw: Any, phrase_lists: set[str]) -> Condition:
    if raw is None:
        return Condition()
    if not isinstance(raw, dict):
        raise RuleError(path, line, "'when' must be a mapping of conditions")
    unknown = set(raw) - _CONDITIONS
    if unknown:
        raise RuleError(path, line,
                        f"unknown condition {sorted(unknown)[0]!r} (known: {', '.join(sorted(_CONDITIONS))})")

    def names(key: str, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
        if key not in raw:
            return None
        v = raw[key]
        if not isinstance(v, list) or not v:
            raise RuleError(path, line, f"condition {key!r} must be a non-empty list")
        return tuple(_choice(path, line, key, x, allowed) for x in v)

    incident = raw.get("incident")
    if incident is not None and not isinstance(incident, bool):
        raise RuleError(path, line, "condition 'incident' must be true or false")
    def lists(key: str) -> tuple[str, ...]:
        v = raw.get(key)
        if v is None:
            return ()
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v:
            raise RuleError(path, line, f"condition {key!r} must name a phrase list or a list of them")
        for name in v:
            if name not in phrase_lists:
                raise RuleError(path, line, f"phrase list {name!r} is not defined under 'phrases'")
        return tuple(v)

    return Condition(names("category", CATEGORIES), names("service", SERVICES), names("tier", TIERS),
                     incident, lists("phrases"), lists("not_phrases"))


def _phrases(path: Path) -> dict[str, re.Pattern[str]]:
    parts: dict[str, list[str]] = {}
    for it in load_yaml_items(path, "phrases"):
        v = it.value
        if not isinstance(v, dict) or not isinstance(v.get("list"), str) or not isinstance(v.get("pattern"), str):
            raise RuleError(path, it.line, "a phrase needs 'list', 'lang' and 'pattern'")
        if v.get("lang") not in ("en", "sv", "es"):
            raise RuleError(path, it.line, f"lang {v.get('lang')!r} is not one of en, sv, es")
        try:
            re.compile(v["pattern"])
        except re.error as e:
            raise RuleError(path, it.line, f"bad regex: {e}") from None
        if _UPPER.search(_ESCAPE.sub("", v["pattern"])):
            # patterns run on the lower-cased text (four times faster than IGNORECASE); "Netflix" would never match
            raise RuleError(path, it.line, "write patterns in lower case: they are matched against lower-cased text")
        parts.setdefault(v["list"], []).append(f"(?:{v['pattern']})")
    # every language's phrases apply to every message: a Swedish writer may write "Netflix" or "fraud"
    return {name: re.compile("|".join(p)) for name, p in parts.items()}


@lru_cache(maxsize=8)
def _load(path: Path) -> SeverityPolicy:
    if not path.exists():
        raise RuleError(path, None, "rule file is missing")
    root = load_yaml(path)
    if not isinstance(root, dict):
        raise RuleError(path, 1, "expected a mapping with levels, rules, customer_tiers, phrases")
    levels = root.get("levels")
    if not isinstance(levels, list) or sorted(levels) != sorted(SEVERITIES):
        raise RuleError(path, 1, f"'levels' must list {', '.join(SEVERITIES)} from lowest to highest")
    levels_t = tuple(levels)
    phrases = _phrases(path)
    rules: list[Rule] = []
    seen: set[str] = set()
    items: list[Item] = load_yaml_items(path, "rules")
    for it in items:
        v = it.value
        if not isinstance(v, dict):
            raise RuleError(path, it.line, "a rule must be a mapping")
        unknown = set(v) - _RULE_FIELDS
        if unknown:
            raise RuleError(path, it.line,
                            f"unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(_RULE_FIELDS))})")
        name = v.get("name")
        if not isinstance(name, str) or not name:
            raise RuleError(path, it.line, "a rule needs a 'name'")
        if name in seen:
            raise RuleError(path, it.line, f"rule name {name!r} is used twice")
        seen.add(name)
        if ("min" in v) == ("max" in v):
            raise RuleError(path, it.line, f"rule {name!r} needs exactly one of 'min' or 'max'")
        lo = _choice(path, it.line, "min", v["min"], levels_t) if "min" in v else None
        hi = _choice(path, it.line, "max", v["max"], levels_t) if "max" in v else None
        unless = v.get("unless", [])
        if not isinstance(unless, list):
            raise RuleError(path, it.line, "'unless' must be a list of rule names")
        if not isinstance(v.get("reason"), str) or not v["reason"].strip():
            raise RuleError(path, it.line, f"rule {name!r} needs a 'reason' (it goes into the trail)")
        rules.append(Rule(name, it.line, _condition(path, it.line, v.get("when"), set(phrases)), lo, hi,
                          tuple(unless), v["reason"]))
    for r in rules:
        for u in r.unless:
            if u not in seen:
                raise RuleError(path, r.line, f"rule {r.name!r}: 'unless' names unknown rule {u!r}")
    tiers: dict[str, TierRaise] = {}
    for it in load_yaml_items(path, "customer_tiers"):
        v = it.value
        if not isinstance(v, dict):
            raise RuleError(path, it.line, "a customer tier must be a mapping")
        tier = _choice(path, it.line, "tier", v.get("tier"), CUSTOMER_TIERS)
        raise_by = v.get("raise")
        if not isinstance(raise_by, int) or isinstance(raise_by, bool) or not 0 <= raise_by <= 3:
            raise RuleError(path, it.line, f"'raise' must be 0 to 3 levels, got {raise_by!r}")
        up_to = _choice(path, it.line, "up_to", v.get("up_to", levels_t[-1]), levels_t)
        tiers[tier] = TierRaise(tier, raise_by, up_to, _condition(path, it.line, v.get("when"), set(phrases)),
                                str(v.get("reason", "")))
    rc = root.get("repeated_contacts") or {}
    if rc:
        if not isinstance(rc, dict) or not isinstance(rc.get("min_contacts"), int) or rc["min_contacts"] < 2:
            raise RuleError(path, None, "repeated_contacts needs min_contacts (2 or more), raise, up_to, reason")
        if not isinstance(rc.get("raise"), int) or rc.get("up_to") not in levels_t:
            raise RuleError(path, None, "repeated_contacts needs a whole 'raise' and an 'up_to' level")
    return SeverityPolicy(levels_t, tuple(rules), tiers, rc, phrases)


class SeverityStep:
    """Sets triage.severity: the classifier's value raised (never lowered, except the table's two ceilings)."""

    name = "severity"

    def __init__(self, rules_dir: Path | None = None, policy: SeverityPolicy | None = None) -> None:
        self.policy = policy or SeverityPolicy.load(rules_dir)

    def __call__(self, message: Message, triage: Triage) -> Triage:
        if triage.disposition != "case":
            return triage
        text = f"{message.subject or ''}\n{message.text}"
        d = self.policy.decide(triage, text, triage.customer_tier)
        notes = [TrailEntry(self.name, f"start {d.start}", "from the classifier" if d.from_classifier
                            else "no classifier value: derived from the rules")]
        notes += [TrailEntry(self.name, f"{'raised by' if kind == 'min' else 'capped by'} {name}", reason)
                  for name, kind, reason in d.fired]
        notes.append(TrailEntry(self.name, f"taxonomy severity {d.taxonomy}",
                                "rules that held: " + (", ".join(d.held) or "none")))
        if d.tier_reason:
            # kept apart so an agent sees what the customer's tier added to the taxonomy severity
            notes.append(TrailEntry(self.name, f"tier raise {d.taxonomy} -> {d.final}", d.tier_reason))
        # one copy of the triage instead of one per note: this step runs for every case message
        return triage.with_(severity=d.final, trail=triage.trail + tuple(notes))
