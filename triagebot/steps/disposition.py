"""The disposition step: is this a case, an automatic reply or a bounce? Rules are data in rules/."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from triagebot.model import Message, Triage
from triagebot.rules_loader import Item, RuleError, load_yaml_items, rules_path

DEFAULT_BODY_WINDOW = 600
DEFAULT_MAX_BODY_CHARS = 2000
_CONDITIONS = ("report_type", "part_type", "header", "sender", "subject", "body", "not_subject", "unless_body",
               "unless_headers")
_REPORT_TYPE = re.compile(r"""report-type\s*=\s*"?([\w.-]+)""", re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    """One disposition rule: all its conditions must hold for it to hit."""

    name: str
    disposition: str
    line: int
    report_type: tuple[str, ...] = ()
    part_type: tuple[str, ...] = ()
    header: str | None = None
    header_matches: re.Pattern | None = None
    header_not_matches: re.Pattern | None = None
    sender: re.Pattern | None = None
    subject: re.Pattern | None = None
    not_subject: re.Pattern | None = None
    body: re.Pattern | None = None
    unless_body: re.Pattern | None = None
    unless_headers: tuple[tuple[str, re.Pattern], ...] = ()
    body_window: int = DEFAULT_BODY_WINDOW
    max_body_chars: int = DEFAULT_MAX_BODY_CHARS
    note: str = ""

    @property
    def stage(self) -> int:
        """Evaluation order: report parts, then other bounce rules, then auto-reply rules, then body rules."""
        if self.report_type or self.part_type:
            return 0
        if self.body is not None:
            return 3
        return 1 if self.disposition == "bounce" else 2

    def check(self, message: Message, report_type: str | None, part_types: frozenset[str]) -> str | None:
        """The evidence when every condition holds, else None."""
        evidence: list[str] = []
        for name, rx in self.unless_headers:
            value = message.header(name)
            if value is not None and rx.search(value):
                return None
        if self.report_type:
            if report_type not in self.report_type:
                return None
            evidence.append(f"report-type={report_type}")
        if self.part_type:
            hit = next((t for t in self.part_type if t in part_types), None)
            if hit is None:
                return None
            evidence.append(f"part {hit}")
        if self.header is not None:
            value = message.header(self.header)
            if value is None:
                return None
            if self.header_matches is not None and not self.header_matches.search(value):
                return None
            if self.header_not_matches is not None and self.header_not_matches.search(value):
                return None
            evidence.append(f"header {self.header}={_short(value)}")
        if self.sender is not None:
            if not message.sender or not self.sender.search(message.sender):
                return None
            evidence.append(f"sender {message.sender.split('@', 1)[0]}@...")
        subject = message.subject or ""
        if self.not_subject is not None and self.not_subject.search(subject):
            return None
        if self.subject is not None:
            m = self.subject.search(subject)
            if not m:
                return None
            evidence.append(f"subject {_short(m.group(0).strip())!r}")
        if self.body is not None:
            text = message.text
            if len(text) > self.max_body_chars:
                return None
            m = self.body.search(text[:self.body_window])
            if not m:
                return None
            if self.unless_body is not None and self.unless_body.search(text):
                return None
            evidence.append(f"body {_short(m.group(0).strip())!r}")
        elif self.unless_body is not None and self.unless_body.search(message.text):
            return None
        return ", ".join(evidence)


@dataclass(frozen=True)
class NotAlone:
    """A header that is noted in the trail but decides nothing on its own."""

    header: str
    why: str
    matches: re.Pattern | None = None


def _short(value: str, n: int = 60) -> str:
    value = " ".join(value.split())
    return value if len(value) <= n else value[:n - 3] + "..."


def _regex(path: Path, item: Item, key: str, pattern: object) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise RuleError(path, item.line, f"{key} must be a non-empty regular expression")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise RuleError(path, item.line, f"{key}: bad regular expression: {e}") from None


def _types(path: Path, item: Item, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RuleError(path, item.line, f"{key} must be a non-empty list of strings")
    return tuple(v.lower() for v in value)


def load_rules(path: Path, disposition: str) -> list[Rule]:
    """The rules of one file, validated; RuleError names the file and line of a mistake."""
    rules = []
    names: set[str] = set()
    for item in load_yaml_items(path, "rules"):
        v = item.value
        if not isinstance(v, dict):
            raise RuleError(path, item.line, "a rule must be a mapping")
        name = v.get("name")
        if not isinstance(name, str) or not name:
            raise RuleError(path, item.line, "a rule needs a name")
        if name in names:
            raise RuleError(path, item.line, f"duplicate rule name {name!r}")
        names.add(name)
        unknown = set(v) - set(_CONDITIONS) - {"name", "body_window", "max_body_chars", "note"}
        if unknown:
            raise RuleError(path, item.line, f"unknown key(s) {', '.join(sorted(unknown))}")
        if not any(k in v for k in ("report_type", "part_type", "header", "sender", "subject", "body")):
            raise RuleError(path, item.line, f"rule {name!r} has no condition")
        kw: dict = {"name": name, "disposition": disposition, "line": item.line, "note": str(v.get("note", ""))}
        if "report_type" in v:
            kw["report_type"] = _types(path, item, "report_type", v["report_type"])
        if "part_type" in v:
            kw["part_type"] = _types(path, item, "part_type", v["part_type"])
        if "header" in v:
            h = v["header"]
            if not isinstance(h, dict) or not isinstance(h.get("name"), str):
                raise RuleError(path, item.line, "header must be a mapping with a name")
            kw["header"] = h["name"]
            if "matches" in h:
                kw["header_matches"] = _regex(path, item, "header.matches", h["matches"])
            if "not_matches" in h:
                kw["header_not_matches"] = _regex(path, item, "header.not_matches", h["not_matches"])
        for key in ("sender", "subject", "not_subject", "body", "unless_body"):
            if key in v:
                kw[key] = _regex(path, item, key, v[key])
        if "unless_headers" in v:
            uh = v["unless_headers"]
            if not isinstance(uh, dict) or not uh:
                raise RuleError(path, item.line, "unless_headers must be a mapping of header name to regex")
            kw["unless_headers"] = tuple((str(k), _regex(path, item, f"unless_headers.{k}", r)) for k, r in uh.items())
        for key in ("body_window", "max_body_chars"):
            if key in v:
                if not isinstance(v[key], int) or v[key] <= 0:
                    raise RuleError(path, item.line, f"{key} must be a positive integer")
                kw[key] = v[key]
        rules.append(Rule(**kw))
    return rules


def load_not_alone(path: Path) -> list[NotAlone]:
    """The headers noted but never decisive on their own (autoreply.yaml `not_alone`)."""
    out = []
    for item in load_yaml_items(path, "not_alone"):
        v = item.value
        if not isinstance(v, dict) or not isinstance(v.get("header"), str) or not isinstance(v.get("why"), str):
            raise RuleError(path, item.line, "not_alone entries need 'header' and 'why'")
        matches = _regex(path, item, "matches", v["matches"]) if "matches" in v else None
        out.append(NotAlone(v["header"], v["why"], matches))
    return out


def _report_type(message: Message) -> str | None:
    ctype = message.header("Content-Type") or ""
    if not ctype.lower().lstrip().startswith("multipart/report"):
        return None
    m = _REPORT_TYPE.search(ctype)
    return m.group(1).lower() if m else None


class DispositionStep:
    """Decide case / auto_reply / bounce from headers, report parts, sender, subject and short bodies."""

    name = "disposition"

    def __init__(self, rules_dir: Path | None = None) -> None:
        bounce = rules_path("bounce.yaml", rules_dir)
        auto = rules_path("autoreply.yaml", rules_dir)
        rules = load_rules(bounce, "bounce") + load_rules(auto, "auto_reply")
        # stable sort: within a stage, the files' own order
        self.rules: tuple[Rule, ...] = tuple(sorted(rules, key=lambda r: r.stage))
        self.not_alone: tuple[NotAlone, ...] = tuple(load_not_alone(auto))

    def __call__(self, message: Message, triage: Triage) -> Triage:
        if message.source == "slack":
            detail = "slack message"
            if "bot_message" in message.flags:
                # bot posts should be dropped by intake before the pipeline; if one gets here it stays a case
                detail += "; posted by a bot (should be ignored upstream)"
            return triage.with_(disposition="case").note(self.name, "case", detail)
        report_type = _report_type(message)
        part_types = frozenset(a.content_type.lower() for a in message.attachments)
        for rule in self.rules:
            evidence = rule.check(message, report_type, part_types)
            if evidence is not None:
                detail = f"rule {rule.name}: {evidence}" + (f" ({rule.note})" if rule.note else "")
                return triage.with_(disposition=rule.disposition).note(self.name, rule.disposition, detail)
        seen = []
        for na in self.not_alone:
            value = message.header(na.header)
            if value is not None and (na.matches is None or na.matches.search(value)):
                seen.append(f"{na.header} present but not decisive: {na.why}")
        detail = "no auto-reply or bounce rule hit" + ("; " + "; ".join(seen) if seen else "")
        return triage.with_(disposition="case").note(self.name, "case", detail)
