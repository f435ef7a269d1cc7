"""A mistake in a rule file is reported with the file's name and the line of the mistake."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from triagebot.customers import CustomerRegistry
from triagebot.extract.counts import CountRules
from triagebot.extract.identifiers import IdentifierRules
from triagebot.rules_loader import RULES_DIR, RuleError
from triagebot.sla import SlaPolicy
from triagebot.steps.severity import SeverityPolicy

MY_FILES = ("identifiers.jsonl", "counts.yaml", "customers.yaml", "freemail.txt", "severity_policy.yaml",
            "sla.yaml", "holidays.yaml")
LOADERS: dict[str, Callable[[Path], object]] = {
    "identifiers.jsonl": IdentifierRules.load,
    "counts.yaml": CountRules.load,
    "customers.yaml": CustomerRegistry.load,
    "freemail.txt": CustomerRegistry.load,
    "severity_policy.yaml": SeverityPolicy.load,
    "sla.yaml": SlaPolicy.load,
    "holidays.yaml": SlaPolicy.load,
}


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    for name in MY_FILES:
        shutil.copy(RULES_DIR / name, tmp_path / name)
    return tmp_path


def break_line(rules: Path, name: str, old: str, new: str) -> int:
    """Replace the first line containing `old` (the substring) and return that line's number."""
    path = rules / name
    lines = path.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if old in line:
            lines[n - 1] = line.replace(old, new, 1)
            path.write_text("\n".join(lines), encoding="utf-8")
            return n
    raise AssertionError(f"{old!r} not in {name}")


def expect_error(rules: Path, name: str, line: int | None, words: str) -> None:
    with pytest.raises(RuleError) as err:
        LOADERS[name](rules)
    e = err.value
    assert Path(e.path).name == name, str(e)
    if line is not None:
        assert e.line == line, str(e)
        assert f"{name}:{line}:" in str(e)
    assert words in str(e), str(e)


@pytest.mark.parametrize("name", MY_FILES)
def test_shipped_files_load(name: str) -> None:
    LOADERS[name](RULES_DIR)


# (file, old, new, words in the message)
BROKEN = [
    ("identifiers.jsonl", '{"label": "MCC", "pattern": "240"', '{"label": "MCC", "pattern": "24O"', "digits"),
    ("identifiers.jsonl", '{"label": "MCC", "pattern": "214"', '{"label": "MCX", "pattern": "214"', "label"),
    ("identifiers.jsonl", '{"label": "KIND_CUE", "kind": "imsi"', '{"label": "KIND_CUE", "kind": "imsy"', "kind"),
    ("identifiers.jsonl", '"pattern": "\\\\bimsis?\\\\b"', '"pattern": "\\\\bimsi(s?\\\\b"', "bad regex"),
    ("identifiers.jsonl", '{"label": "NATIONAL", "language": "sv"', '{"label": "NATIONAL", "language": "sv",,', "JSON"),
    ("counts.yaml", "- {lang: sv, kind: few_word,", "- {lang: sw, kind: few_word,", "lang"),
    ("counts.yaml", "- {lang: en, kind: many_word,", "- {lang: en, kind: lots_word,", "kind"),
    ("counts.yaml", "words: {one: 1, two: 2,", "words: {one: 1, two: zwei,", "whole number"),
    ("counts.yaml", "words: [of, the, a, an, in, \"on\",", "words: [of, the, a, an, in, on,", "list of words"),
    ("counts.yaml", 'forms: "cow, giraffe, animal, horse | cows', 'forms: "cow, giraffe, animal, horse, cows', "forms"),
    ("customers.yaml", "tier: vip", "tier: vipp", "tier 'vipp'"),
    ("customers.yaml", "fleet_size: 40000", "fleet_size: lots", "fleet_size"),
    ("customers.yaml", "domains: [aparcalevante.example]", "domains: [aparca levante]", "domain"),
    ("customers.yaml", "language: es", "language: pt", "language"),
    ("customers.yaml", "countries: [SE, NO]", "countries: [SE, Norway]", "ISO 3166"),
    ("customers.yaml", "    fleet_size: 14", "    fleet_sise: 14", "unknown field"),
    ("customers.yaml", "domains: [savannapark.example]", "domains: [nordtrans.example]", "already belongs"),
    ("freemail.txt", "hotmail.se", "hotmail se", "not a domain"),
    ("severity_policy.yaml", "min: critical, reason: \"service lost", "min: urgent, reason: \"service lost", "min 'urgent'"),
    ("severity_policy.yaml", "phrases: business_impact}", "phrases: impact}", "phrase list 'impact'"),
    ("severity_policy.yaml", "unless: [safety, fraud, fraud_change_not_made]", "unless: [safety, frod]", "unknown rule 'frod'"),
    ("severity_policy.yaml", "{tier: vip, raise: 1,", "{tier: gold, raise: 1,", "tier 'gold'"),
    ("severity_policy.yaml", "{list: degraded, lang: en, pattern: '\\b(?:slow", "{list: degraded, lang: en, pattern: '\\b((?:slow", "bad regex"),
    ("severity_policy.yaml", "when: {incident: true, tier: [many]}", "when: {incident: yes please, tier: [many]}", "incident"),
    ("severity_policy.yaml", "pattern: '\\bnetflix\\b|\\byoutube", "pattern: '\\bNetflix\\b|\\byoutube", "lower case"),
    ("severity_policy.yaml", "when: {incident: true, tier: [many]}", "when: {incident: true, tier: [lots]}", "tier 'lots'"),
    ("sla.yaml", "{category: incident, critical: 4h, high: 1d, medium: 3d, low: 5d}",
     "{category: incident, critical: 4h, high: 1d, medium: 3d, low: 10d}", "baseline"),
    ("sla.yaml", "{category: order, critical: 1d, high: 3d, medium: 6d, low: 9d}",
     "{category: order, critical: 1d, high: 7d, medium: 6d, low: 9d}", "shorter than high"),
    ("sla.yaml", "high: 2d, medium: 4d", "high: two days, medium: 4d", "duration"),
    ("sla.yaml", "timezone: Europe/Madrid", "timezone: Europe/Atlantis", "time zone"),
    ("sla.yaml", 'open: "08:00", close: "17:00"', 'open: "18:00", close: "17:00"', "open must be before close"),
    ("sla.yaml", "holidays: [ES]}", "holidays: [PT]}", "no holidays for 'PT'"),
    ("sla.yaml", "{category: order, days: 12}", "{category: orders, days: 12}", "category 'orders'"),
    ("holidays.yaml", "date: 2026-06-06, name: Sveriges nationaldag", "date: 2026-06-31, name: Sveriges nationaldag", "YYYY-MM-DD"),
    ("holidays.yaml", "{country: ES, date: 2025-08-15", "{country: Spain, date: 2025-08-15", "country 'Spain'"),
    ("holidays.yaml", "{country: SE, date: 2027-12-26, name: Annandag jul}", "{country: SE, date: 2027-12-25, name: Annandag jul}", "listed twice"),
]


@pytest.mark.parametrize("name,old,new,words", BROKEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)])
def test_a_broken_rule_names_file_and_line(rules: Path, name: str, old: str, new: str, words: str) -> None:
    line = break_line(rules, name, old, new)
    expect_error(rules, name, line, words)


def test_yaml_syntax_error_names_the_line(rules: Path) -> None:
    line = break_line(rules, "severity_policy.yaml", "  - {name: incident,", "  - {name: incident,,, [")
    with pytest.raises(RuleError) as err:
        SeverityPolicy.load(rules)
    assert Path(err.value.path).name == "severity_policy.yaml" and err.value.line in (line, line + 1)
    line = break_line(rules, "customers.yaml", "  - name: NordTrans A/S", "  - name: NordTrans A/S: [")
    with pytest.raises(RuleError) as err:
        CustomerRegistry.load(rules)
    assert Path(err.value.path).name == "customers.yaml" and err.value.line == line


def test_a_missing_file_is_named(rules: Path) -> None:
    for name in MY_FILES:
        (rules / name).rename(rules / f"{name}.off")
        with pytest.raises(RuleError) as err:
            LOADERS[name](rules)
        assert name in str(err.value) and "missing" in str(err.value)
        (rules / f"{name}.off").rename(rules / name)


def test_a_rule_without_a_reason_is_refused(rules: Path) -> None:
    line = break_line(rules, "severity_policy.yaml", ', reason: "a billing dispute"}', "}")
    expect_error(rules, "severity_policy.yaml", line, "reason")
