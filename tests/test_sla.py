"""SLA due times on business calendars (rules/sla.yaml, rules/holidays.yaml) and the time left on a case."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from triagebot import sla
from triagebot.model import CATEGORIES, SEVERITIES

STHLM = ZoneInfo("Europe/Stockholm")
MADRID = ZoneInfo("Europe/Madrid")
BASELINE = {"incident": 9.3, "information_request": 7.1, "service_request": 9.3, "order": 12}


@pytest.fixture(scope="module")
def policy() -> sla.SlaPolicy:
    return sla.SlaPolicy.load()


def test_targets_beat_the_2019_baseline_and_scale_with_severity(policy: sla.SlaPolicy) -> None:
    assert policy.baseline_days == BASELINE
    hours_per_day = policy.calendar().hours_per_day
    for cat in CATEGORIES:
        spans = []
        for s in SEVERITIES:
            t = policy.target(cat, s)
            h = t.days * 24 + t.hours if t.round_the_clock else t.business_hours(hours_per_day)
            assert h < BASELINE[cat] * hours_per_day, (cat, s)
            spans.append(h)
        assert spans == sorted(spans), cat            # critical <= high <= medium <= low


def test_business_hours_skip_nights_and_weekends(policy: sla.SlaPolicy) -> None:
    friday_4pm = datetime(2025, 3, 14, 16, 0, tzinfo=STHLM)
    # incident high = 1 business day (9 h): 1 h on Friday, 8 h on Monday
    assert sla.due("incident", "high", friday_4pm) == datetime(2025, 3, 17, 16, 0, tzinfo=STHLM)
    # a message at night starts the clock at the next opening
    saturday_night = datetime(2025, 3, 15, 23, 30, tzinfo=STHLM)
    assert sla.due("incident", "high", saturday_night) == datetime(2025, 3, 17, 17, 0, tzinfo=STHLM)


def test_swedish_holidays_stop_the_clock() -> None:
    # 23 Dec 2025 16:00 + 1 business day: julafton, juldagen, annandag jul and the weekend are closed
    start = datetime(2025, 12, 23, 16, 0, tzinfo=STHLM)
    assert sla.due("incident", "high", start) == datetime(2025, 12, 29, 16, 0, tzinfo=STHLM)
    # 3 business days over nyårsafton and nyårsdagen
    assert sla.due("incident", "medium", start) == datetime(2026, 1, 2, 16, 0, tzinfo=STHLM)
    # midsommarafton 2026 is Friday 19 June
    assert sla.due("incident", "high", datetime(2026, 6, 18, 16, 0, tzinfo=STHLM)) == \
        datetime(2026, 6, 22, 16, 0, tzinfo=STHLM)


def test_spanish_calendar_for_spanish_cases() -> None:
    start = datetime(2025, 4, 17, 12, 0, tzinfo=timezone.utc)   # Jueves Santo; Viernes Santo is national
    es_due = sla.due("incident", "medium", start, language="es")
    sv_due = sla.due("incident", "medium", start, language="sv")
    assert es_due == datetime(2025, 4, 23, 14, 0, tzinfo=MADRID)       # Easter Monday is open in Spain
    assert sv_due == datetime(2025, 4, 24, 14, 0, tzinfo=STHLM)        # annandag påsk is closed in Sweden
    assert sla.due("incident", "medium", start, calendar="es") == es_due


def test_critical_runs_round_the_clock() -> None:
    saturday = datetime(2025, 3, 15, 22, 0, tzinfo=STHLM)
    assert sla.due("incident", "critical", saturday) == saturday + timedelta(hours=4)
    assert sla.due("order", "critical", saturday) == saturday + timedelta(hours=24)


def test_naive_times_are_utc_and_missing_labels_have_defaults(policy: sla.SlaPolicy) -> None:
    naive = datetime(2025, 3, 14, 12, 0)
    assert sla.due("incident", "high", naive) == sla.due("incident", "high", naive.replace(tzinfo=timezone.utc))
    assert policy.target(None, None) == policy.target("incident", "medium")


def test_dst_change_is_wall_clock() -> None:
    # Sweden moves to summer time on Sunday 30 March 2025; business hours stay 08:00-17:00 local
    friday = datetime(2025, 3, 28, 16, 0, tzinfo=STHLM)
    due = sla.due("incident", "high", friday)
    assert due == datetime(2025, 3, 31, 16, 0, tzinfo=STHLM) and due.utcoffset() == timedelta(hours=2)


def test_time_left_and_its_text() -> None:
    due = datetime(2025, 3, 17, 16, 0, tzinfo=STHLM)
    now = datetime(2025, 3, 15, 12, 30, tzinfo=STHLM)
    assert sla.time_left(due, now) == timedelta(days=2, hours=3, minutes=30)
    assert sla.describe_time_left(due, now) == "2d 3h left"
    assert sla.describe_time_left(due, due - timedelta(minutes=45)) == "45m left"
    assert sla.describe_time_left(due, due + timedelta(days=1, hours=2)) == "overdue by 1d 2h"
    # business time left: nothing over the weekend, 8 h on Monday
    assert sla.business_time_left(due, now) == timedelta(hours=8)
    assert sla.business_time_left(due, due + timedelta(hours=1)) < timedelta(0)


def test_holidays_cover_2025_to_2027(policy: sla.SlaPolicy) -> None:
    se, es = policy.calendars["se"], policy.calendars["es"]
    for y in (2025, 2026, 2027):
        assert date(y, 12, 25) in se.holidays and date(y, 6, 6) in se.holidays
        assert date(y, 10, 12) in es.holidays and date(y, 12, 8) in es.holidays
    assert date(2027, 3, 26) in se.holidays                       # långfredagen 2027
    assert not se.is_business_day(date(2026, 1, 6)) and es.is_business_day(date(2026, 3, 19))


def test_a_year_without_holidays_is_logged(policy: sla.SlaPolicy, caplog: pytest.LogCaptureFixture) -> None:
    cal = policy.calendars["se"]
    with caplog.at_level("WARNING"):
        cal.is_business_day(date(2031, 5, 5))
    assert "no holidays for 2031" in caplog.text
