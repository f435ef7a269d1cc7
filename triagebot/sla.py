"""SLA clocks: when a case is due by category and severity, on a business calendar, and how much time is left.

Targets and calendars are data (rules/sla.yaml, rules/holidays.yaml). The seeds' 2019 handling times are the
baseline every target must beat; business time counts only open hours on working days, except for the
severities the table runs round the clock.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from triagebot.model import CATEGORIES, LANGUAGES, SEVERITIES
from triagebot.rules_loader import compose, RuleError, load_yaml, load_yaml_items, rules_path

SLA_FILE = "sla.yaml"
HOLIDAYS_FILE = "holidays.yaml"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*$")
_COUNTRY = re.compile(r"^[A-Z]{2}(?:-[A-Z0-9]{1,3})?$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_MAX_DAYS = 3700      # a clock never walks further than ten years
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A target duration: business days and hours, or wall-clock hours when round the clock."""

    days: float
    hours: float
    round_the_clock: bool = False

    def business_hours(self, hours_per_day: float) -> float:
        return self.days * hours_per_day + self.hours

    def __str__(self) -> str:
        parts = [f"{self.days:g}d"] if self.days else []
        parts += [f"{self.hours:g}h"] if self.hours or not parts else []
        return " ".join(parts) + (" round the clock" if self.round_the_clock else "")


class BusinessCalendar:
    """Open hours, weekend days and public holidays in one time zone."""

    def __init__(self, name: str, tz: str, open_at: time, close_at: time, weekend: tuple[int, ...],
                 holidays: dict[date, str], countries: tuple[str, ...] = (), years: frozenset[int] = frozenset()):
        self.name, self.tz = name, ZoneInfo(tz)
        self.open_at, self.close_at, self.weekend = open_at, close_at, weekend
        self.holidays, self.countries, self.years = holidays, countries, years
        self._warned: set[int] = set()

    @property
    def hours_per_day(self) -> float:
        """The length of one business day in hours."""
        o, c = self.open_at, self.close_at
        return (c.hour * 60 + c.minute - o.hour * 60 - o.minute) / 60

    def is_business_day(self, d: date) -> bool:
        """A working day: not a weekend day and not a public holiday of the calendar's countries."""
        if self.years and d.year not in self.years and d.year not in self._warned:
            self._warned.add(d.year)
            log.warning("calendar %s has no holidays for %s: add them to rules/%s", self.name, d.year, HOLIDAYS_FILE)
        return d.weekday() not in self.weekend and d not in self.holidays

    def _at(self, d: date, t: time) -> datetime:
        return datetime.combine(d, t, tzinfo=self.tz)

    def add_business_hours(self, start: datetime, hours: float) -> datetime:
        """The moment `hours` of open time after `start` (the clock waits for the next opening)."""
        t = _aware(start).astimezone(self.tz)
        remaining = timedelta(hours=hours)
        for _ in range(_MAX_DAYS):
            d = t.date()
            opening, closing = self._at(d, self.open_at), self._at(d, self.close_at)
            if not self.is_business_day(d) or t >= closing:
                t = self._at(d + timedelta(days=1), self.open_at)
                continue
            if t < opening:
                t = opening
            available = closing - t
            if remaining <= available:
                return t + remaining
            remaining -= available
            t = self._at(d + timedelta(days=1), self.open_at)
        raise ValueError(f"no business time within {_MAX_DAYS} days on calendar {self.name}")

    def business_time_between(self, a: datetime, b: datetime) -> timedelta:
        """Open time from a to b (negative when b is before a)."""
        if b < a:
            return -self.business_time_between(b, a)
        a, b = _aware(a).astimezone(self.tz), _aware(b).astimezone(self.tz)
        total = timedelta()
        d = a.date()
        for _ in range(_MAX_DAYS):
            if d > b.date():
                break
            if self.is_business_day(d):
                lo = max(a, self._at(d, self.open_at))
                hi = min(b, self._at(d, self.close_at))
                if hi > lo:
                    total += hi - lo
            d += timedelta(days=1)
        return total


@dataclass(frozen=True)
class SlaPolicy:
    """Targets per category and severity, the 2019 baseline, and the business calendars."""

    targets: dict[tuple[str, str], Target]
    baseline_days: dict[str, float]
    calendars: dict[str, BusinessCalendar]
    default_calendar: str
    language_calendars: dict[str, str]

    @classmethod
    def load(cls, rules_dir: Path | None = None) -> "SlaPolicy":
        """Read and validate rules/sla.yaml and rules/holidays.yaml; mistakes name file and line."""
        return _load(rules_path(SLA_FILE, rules_dir), rules_path(HOLIDAYS_FILE, rules_dir))

    def calendar(self, name: str | None = None, language: str | None = None) -> BusinessCalendar:
        """A calendar by name, else the one for the language, else the default."""
        if name:
            return self.calendars[name]
        return self.calendars[self.language_calendars.get(language or "", self.default_calendar)]

    def target(self, category: str | None, severity: str | None) -> Target:
        """The target for a category and severity; no category counts as an incident, no severity as medium."""
        return self.targets[(category or "incident", severity or "medium")]

    def due(self, category: str | None, severity: str | None, start: datetime, calendar: str | None = None,
            language: str | None = None) -> datetime:
        """When a case opened at `start` is due."""
        tgt = self.target(category, severity)
        cal = self.calendar(calendar, language)
        if tgt.round_the_clock:
            hours = tgt.days * 24 + tgt.hours
            return (_aware(start) + timedelta(hours=hours)).astimezone(cal.tz)
        return cal.add_business_hours(start, tgt.business_hours(cal.hours_per_day))


def _aware(dt: datetime) -> datetime:
    # a naive time is taken as UTC: message dates are stored in UTC
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _duration(path: Path, line: int, raw: object, what: str) -> tuple[float, float]:
    m = _DURATION.match(str(raw)) if raw is not None else None
    if m is None or not (m.group(1) or m.group(2)):
        raise RuleError(path, line, f"{what}: {raw!r} is not a duration like '4h', '2d' or '1d 4h'")
    return float(m.group(1) or 0), float(m.group(2) or 0)


def load_holidays(path: Path) -> dict[str, dict[date, str]]:
    """The public holidays by country or region, validated.

    Read from the YAML nodes as plain text, so an impossible date ("2026-06-31") is reported with its line
    instead of failing inside the YAML date constructor.
    """
    root = compose(path)
    seq = [v for k, v in root.value if k.value == "holidays"] if isinstance(root, yaml.MappingNode) else []
    if not seq or not isinstance(seq[0], yaml.SequenceNode):
        raise RuleError(path, 1, "expected a list under 'holidays'")
    out: dict[str, dict[date, str]] = {}
    for node in seq[0].value:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            raise RuleError(path, line, "a holiday is a mapping with country, date and name")
        v = {k.value: (x.value if isinstance(x, yaml.ScalarNode) else None) for k, x in node.value}
        country, raw_date, name = v.get("country"), v.get("date"), v.get("name")
        if not isinstance(country, str) or not _COUNTRY.match(country):
            raise RuleError(path, line, f"country {country!r} is not a code like SE, ES or ES-MD")
        try:
            d = date.fromisoformat(str(raw_date))
        except ValueError:
            raise RuleError(path, line, f"date {raw_date!r} is not a real date written YYYY-MM-DD") from None
        if not isinstance(name, str) or not name.strip():
            raise RuleError(path, line, "a holiday needs a name")
        if d in out.setdefault(country, {}):
            raise RuleError(path, line, f"{country} {d} is listed twice")
        out[country][d] = name
    return out


@lru_cache(maxsize=8)
def _load(sla_path: Path, holidays_path: Path) -> SlaPolicy:
    if not sla_path.exists():
        raise RuleError(sla_path, None, "rule file is missing")
    holidays = load_holidays(holidays_path)
    root = load_yaml(sla_path)
    if not isinstance(root, dict):
        raise RuleError(sla_path, 1, "expected a mapping with baseline_business_days, targets and calendars")
    p = sla_path
    baseline: dict[str, float] = {}
    for it in load_yaml_items(p, "baseline_business_days"):
        v = it.value
        cat = v.get("category") if isinstance(v, dict) else None
        if cat not in CATEGORIES:
            raise RuleError(p, it.line, f"category {cat!r} is not one of {', '.join(CATEGORIES)}")
        if not isinstance(v.get("days"), (int, float)) or isinstance(v.get("days"), bool) or v["days"] <= 0:
            raise RuleError(p, it.line, "days must be a positive number")
        baseline[v["category"]] = float(v["days"])
    rtc = root.get("round_the_clock") or []
    if not isinstance(rtc, list) or any(s not in SEVERITIES for s in rtc):
        raise RuleError(p, None, f"round_the_clock must list severities from {', '.join(SEVERITIES)}")
    # calendars first: targets are checked against the default calendar's business day
    calendars: dict[str, BusinessCalendar] = {}
    for it in load_yaml_items(p, "calendars"):
        v = it.value
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise RuleError(p, it.line, "a calendar needs a name")
        try:
            ZoneInfo(str(v.get("timezone")))
        except (ZoneInfoNotFoundError, ValueError):
            raise RuleError(p, it.line, f"timezone {v.get('timezone')!r} is not a known time zone") from None
        hhmm = []
        for key in ("open", "close"):
            m = _HHMM.match(str(v.get(key, "")))
            if not m:
                raise RuleError(p, it.line, f"{key} {v.get(key)!r} is not a time like \"08:00\"")
            hhmm.append(time(int(m.group(1)), int(m.group(2))))
        if hhmm[0] >= hhmm[1]:
            raise RuleError(p, it.line, "open must be before close")
        weekend = v.get("weekend", [])
        if not isinstance(weekend, list) or any(w not in WEEKDAYS for w in weekend):
            raise RuleError(p, it.line, f"weekend must list days from {', '.join(WEEKDAYS)}")
        countries = v.get("holidays", [])
        if not isinstance(countries, list):
            raise RuleError(p, it.line, "holidays must be a list of countries")
        merged: dict[date, str] = {}
        years: set[int] = set()
        for c in countries:
            if c not in holidays:
                raise RuleError(p, it.line, f"no holidays for {c!r} in rules/{HOLIDAYS_FILE}")
            merged.update(holidays[c])
            years |= {d.year for d in holidays[c]}
        calendars[v["name"]] = BusinessCalendar(v["name"], v["timezone"], hhmm[0], hhmm[1],
                                                tuple(WEEKDAYS.index(w) for w in weekend), merged,
                                                tuple(countries), frozenset(years))
    default = root.get("default_calendar")
    if default not in calendars:
        raise RuleError(p, None, f"default_calendar {default!r} is not one of the calendars")
    lang_map = root.get("language_calendars") or {}
    if not isinstance(lang_map, dict) or any(k not in LANGUAGES or v not in calendars for k, v in lang_map.items()):
        raise RuleError(p, None, "language_calendars maps en/sv/es/other to calendar names")
    hours_per_day = calendars[default].hours_per_day
    targets: dict[tuple[str, str], Target] = {}
    seen_categories = set()
    for it in load_yaml_items(p, "targets"):
        v = it.value
        cat = v.get("category") if isinstance(v, dict) else None
        if cat not in CATEGORIES:
            raise RuleError(p, it.line, f"category {cat!r} is not one of {', '.join(CATEGORIES)}")
        if cat in seen_categories:
            raise RuleError(p, it.line, f"targets for {cat} are given twice")
        seen_categories.add(cat)
        if cat not in baseline:
            raise RuleError(p, it.line, f"no baseline_business_days for {cat}")
        previous = None
        for sev in SEVERITIES:  # critical first: each next severity may take longer, never less
            if sev not in v:
                raise RuleError(p, it.line, f"{cat}: missing a target for {sev}")
            d, h = _duration(p, it.line, v[sev], f"{cat} {sev}")
            tgt = Target(d, h, sev in rtc)
            as_business = (d * 24 + h) if tgt.round_the_clock else tgt.business_hours(hours_per_day)
            if as_business >= baseline[cat] * hours_per_day:
                raise RuleError(p, it.line, f"{cat} {sev}: {v[sev]} does not beat the 2019 baseline of "
                                            f"{baseline[cat]:g} business days")
            if previous is not None and as_business < previous[1]:
                raise RuleError(p, it.line, f"{cat}: {sev} ({v[sev]}) is shorter than {previous[0]}")
            previous = (sev, as_business)
            targets[(cat, sev)] = tgt
        extra = set(v) - set(SEVERITIES) - {"category"}
        if extra:
            raise RuleError(p, it.line, f"unknown key {sorted(extra)[0]!r}")
    missing = set(CATEGORIES) - seen_categories
    if missing:
        raise RuleError(p, None, f"no targets for {', '.join(sorted(missing))}")
    return SlaPolicy(targets, baseline, calendars, default, {k: v for k, v in lang_map.items()})


def due(category: str | None, severity: str | None, start: datetime, calendar: str | None = None,
        language: str | None = None, rules_dir: Path | None = None) -> datetime:
    """When a case of this category and severity, opened at `start`, is due (shipped rules unless rules_dir)."""
    return SlaPolicy.load(rules_dir).due(category, severity, start, calendar, language)


def time_left(due_at: datetime, now: datetime) -> timedelta:
    """Wall-clock time until the due time; negative once overdue."""
    return _aware(due_at) - _aware(now)


def business_time_left(due_at: datetime, now: datetime, calendar: str | None = None,
                       language: str | None = None, rules_dir: Path | None = None) -> timedelta:
    """Open business time until the due time on the case's calendar; negative once overdue."""
    return SlaPolicy.load(rules_dir).calendar(calendar, language).business_time_between(now, due_at)


def describe_time_left(due_at: datetime, now: datetime) -> str:
    """A short text for agents: "2d 3h left", "45m left", "overdue by 1d 2h"."""
    left = time_left(due_at, now)
    secs = abs(int(left.total_seconds()))
    d, rest = divmod(secs, 86400)
    h, rest = divmod(rest, 3600)
    m = rest // 60
    parts = [f"{d}d"] if d else []
    if h:
        parts.append(f"{h}h")
    if not d and (m or not parts):
        parts.append(f"{m}m")
    text = " ".join(parts)
    return f"overdue by {text}" if left.total_seconds() < 0 else f"{text} left"
