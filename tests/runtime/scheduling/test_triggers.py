"""DST tables: the slots of cron and interval triggers across real transitions.

Each row: expression, zone, "after" instant, and the expected next slots as
local wall times with their UTC offset, so a reader checks them against the
zone's transition without arithmetic.
"""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta

import pytest

from runtime.errors import ValidationError
from runtime.scheduling.cron import CronExpr
from runtime.scheduling.triggers import (
    CronTrigger,
    IntervalTrigger,
    next_slots,
    slots_between,
    start_of_local_day,
    trigger_from_json,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def local(expr: str, zone: str, after: str, count: int) -> list[str]:
    trigger = CronTrigger.parse(expr, zone)
    return [s.astimezone(trigger.zone).isoformat() for s in next_slots(trigger, utc(after), count)]


DST_TABLE = [
    # America/Sao_Paulo, 2018: spring forward at midnight 2018-11-04 (00:00 -> 01:00).
    ("0 0 * * *", "America/Sao_Paulo", "2018-11-02T12:00:00-03:00", [
        "2018-11-03T00:00:00-03:00",
        "2018-11-04T01:00:00-02:00",  # midnight never happened: first valid moment after it
        "2018-11-05T00:00:00-02:00",
    ]),
    ("30 0 * * *", "America/Sao_Paulo", "2018-11-03T12:00:00-03:00", [
        "2018-11-04T01:00:00-02:00",
        "2018-11-05T00:30:00-02:00",
    ]),
    ("0 8 * * *", "America/Sao_Paulo", "2018-11-03T12:00:00-03:00", [
        "2018-11-04T08:00:00-02:00",  # unaffected wall time keeps its local hour
        "2018-11-05T08:00:00-02:00",
    ]),
    # America/Sao_Paulo, 2019-02-17: fall back at midnight (00:00 -> 23:00 on the 16th).
    ("30 23 * * *", "America/Sao_Paulo", "2019-02-16T12:00:00-02:00", [
        "2019-02-16T23:30:00-02:00",  # first occurrence only
        "2019-02-17T23:30:00-03:00",
    ]),
    ("*/30 * * * *", "America/Sao_Paulo", "2019-02-16T23:10:00-02:00", [
        "2019-02-16T23:30:00-02:00",
        "2019-02-16T23:00:00-03:00",  # hourly-or-finer: the repeated hour runs again
        "2019-02-16T23:30:00-03:00",
        "2019-02-17T00:00:00-03:00",
    ]),
    # America/New_York 2024: 02:00 -> 03:00 on 03-10; 02:00 -> 01:00 on 11-03.
    ("30 2 * * *", "America/New_York", "2024-03-09T12:00:00-05:00", [
        "2024-03-10T03:00:00-04:00",
        "2024-03-11T02:30:00-04:00",
    ]),
    ("*/15 * * * *", "America/New_York", "2024-03-10T01:30:00-05:00", [
        "2024-03-10T01:45:00-05:00",
        "2024-03-10T03:00:00-04:00",  # 15 real minutes later; 02:xx never happened
        "2024-03-10T03:15:00-04:00",
    ]),
    ("30 1 * * *", "America/New_York", "2024-11-02T12:00:00-04:00", [
        "2024-11-03T01:30:00-04:00",  # once, at the first 01:30
        "2024-11-04T01:30:00-05:00",
    ]),
    ("0 * * * *", "America/New_York", "2024-11-03T00:30:00-04:00", [
        "2024-11-03T01:00:00-04:00",
        "2024-11-03T01:00:00-05:00",
        "2024-11-03T02:00:00-05:00",
    ]),
    ("0 9 * * 1-5", "America/New_York", "2024-03-08T10:00:00-05:00", [
        "2024-03-11T09:00:00-04:00",  # Friday's done; Monday after the change
        "2024-03-12T09:00:00-04:00",
    ]),
    # Europe/London 2024: 01:00 -> 02:00 on 03-31; 02:00 -> 01:00 on 10-27.
    ("15 1 * * *", "Europe/London", "2024-03-30T12:00:00+00:00", [
        "2024-03-31T02:00:00+01:00",
        "2024-04-01T01:15:00+01:00",
    ]),
    ("15 1 * * *", "Europe/London", "2024-10-26T12:00:00+01:00", [
        "2024-10-27T01:15:00+01:00",
        "2024-10-28T01:15:00+00:00",
    ]),
    ("45 * * * *", "Europe/London", "2024-10-27T00:50:00+01:00", [
        "2024-10-27T01:45:00+01:00",
        "2024-10-27T01:45:00+00:00",
        "2024-10-27T02:45:00+00:00",
    ]),
    # Australia/Lord_Howe: a 30-minute shift. 02:00 -> 02:30 on 2024-10-06; 02:00 -> 01:30
    # on 2024-04-07.
    ("0 2 * * *", "Australia/Lord_Howe", "2024-10-05T12:00:00+10:30", [
        "2024-10-06T02:30:00+11:00",
        "2024-10-07T02:00:00+11:00",
    ]),
    ("15 2 * * *", "Australia/Lord_Howe", "2024-10-05T12:00:00+10:30", [
        "2024-10-06T02:30:00+11:00",
        "2024-10-07T02:15:00+11:00",
    ]),
    ("45 1 * * *", "Australia/Lord_Howe", "2024-04-06T12:00:00+11:00", [
        "2024-04-07T01:45:00+11:00",  # 01:30-02:00 happens twice; runs once
        "2024-04-08T01:45:00+10:30",
    ]),
    ("*/30 * * * *", "Australia/Lord_Howe", "2024-04-07T01:10:00+11:00", [
        "2024-04-07T01:30:00+11:00",
        "2024-04-07T01:30:00+10:30",
        "2024-04-07T02:00:00+10:30",
    ]),
    # No DST at all (Sao Paulo since 2019): plain days.
    ("0 9 * * *", "America/Sao_Paulo", "2026-11-03T10:00:00-03:00", [
        "2026-11-04T09:00:00-03:00",
        "2026-11-05T09:00:00-03:00",
    ]),
]


@pytest.mark.parametrize(("expr", "zone", "after", "expected"), DST_TABLE)
def test_cron_slots_across_dst(expr: str, zone: str, after: str, expected: list[str]) -> None:
    assert local(expr, zone, after, len(expected)) == expected


@pytest.mark.parametrize("zone", ["America/Sao_Paulo", "America/New_York", "Europe/London",
                                  "Australia/Lord_Howe"])
@pytest.mark.parametrize("year", [2018, 2024])
def test_a_daily_schedule_runs_once_per_local_day_all_year(zone: str, year: int) -> None:
    """Every local date of the year gets exactly one run of a daily 00:30, 01:30 and 02:30."""
    for wall in ("30 0 * * *", "30 1 * * *", "30 2 * * *"):
        trigger = CronTrigger.parse(wall, zone)
        start = datetime(year, 1, 1, tzinfo=trigger.zone)
        end = datetime(year + 1, 1, 1, tzinfo=trigger.zone)
        slots = list(slots_between(trigger, start, end))
        days = [s.astimezone(trigger.zone).date() for s in slots]
        assert len(days) == len(set(days)) == (date(year + 1, 1, 1) - date(year, 1, 1)).days


def test_slots_are_strictly_after_and_increasing() -> None:
    trigger = CronTrigger.parse("*/5 * * * *", "America/New_York")
    start = utc("2024-11-03T04:00:00+00:00")
    slots = list(slots_between(trigger, start, start + timedelta(hours=5)))
    assert all(b > a for a, b in itertools.pairwise(slots))
    assert all((b - a) == timedelta(minutes=5) for a, b in itertools.pairwise(slots))
    assert len(slots) == 60


def test_interval_follows_real_elapsed_time_across_dst() -> None:
    trigger = IntervalTrigger(15 * 60)
    slots = next_slots(trigger, utc("2024-03-10T01:40:00-05:00"), 3)
    assert [s - slots[0] for s in slots] == [timedelta(0), timedelta(minutes=15),
                                              timedelta(minutes=30)]
    assert slots[0] == utc("2024-03-10T01:45:00-05:00")
    assert slots[1] == utc("2024-03-10T03:00:00-04:00")


def test_interval_slot_on_boundary_is_not_repeated() -> None:
    trigger = IntervalTrigger(300)
    boundary = utc("2026-01-01T00:05:00+00:00")
    assert trigger.next_after(boundary) == boundary + timedelta(minutes=5)
    assert trigger.next_after(boundary - timedelta(microseconds=1)) == boundary


@pytest.mark.parametrize(("day", "zone", "expected"), [
    (date(2018, 11, 4), "America/Sao_Paulo", "2018-11-04T01:00:00-02:00"),
    (date(2018, 11, 5), "America/Sao_Paulo", "2018-11-05T00:00:00-02:00"),
    (date(2019, 2, 16), "America/Sao_Paulo", "2019-02-16T00:00:00-02:00"),
    (date(2024, 3, 10), "America/New_York", "2024-03-10T00:00:00-05:00"),
])
def test_start_of_local_day(day: date, zone: str, expected: str) -> None:
    trigger = CronTrigger.parse("0 0 * * *", zone)
    assert start_of_local_day(day, trigger.zone).astimezone(trigger.zone).isoformat() == expected


@pytest.mark.parametrize(("text", "message"), [
    ("* * * *", "5 fields"),
    ("60 * * * *", "minute"),
    ("* 24 * * *", "hour"),
    ("* * 0 * *", "day-of-month"),
    ("* * * 13 *", "month"),
    ("* * * * 8", "day-of-week"),
    ("*/0 * * * *", "step"),
    ("a * * * *", "not a number"),
    ("5-1 * * * *", "outside"),
])
def test_bad_expressions_say_which_field(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CronExpr.parse(text)


def test_never_firing_expression_and_unknown_zone_are_refused() -> None:
    with pytest.raises(ValidationError, match="never fires"):
        CronTrigger.parse("0 0 31 2 *", "UTC")
    with pytest.raises(ValidationError, match="time zone"):
        CronTrigger.parse("0 0 * * *", "Mars/Olympus_Mons")


def test_names_shorthands_and_vixie_day_rules() -> None:
    assert CronExpr.parse("@hourly").times_of_day()[:2] == [(0, 0), (1, 0)]
    expr = CronExpr.parse("0 0 * jan-mar mon,FRI")
    assert expr.months == frozenset({1, 2, 3}) and expr.weekdays == frozenset({1, 5})
    assert CronExpr.parse("0 0 * * 7").weekdays == frozenset({0})
    either = CronExpr.parse("0 0 13 * 5")  # the 13th OR any Friday
    assert either.matches_date(date(2026, 1, 13)) and either.matches_date(date(2026, 1, 16))
    both = CronExpr.parse("0 0 */2 * 5")  # '*' step: odd days AND Fridays
    assert both.matches_date(date(2026, 1, 9)) and not both.matches_date(date(2026, 1, 16))


def test_triggers_round_trip_through_json() -> None:
    cron = CronTrigger.parse("0 8 * * *", "America/Sao_Paulo")
    assert trigger_from_json(cron.to_json()) == cron
    every = IntervalTrigger(900)
    assert trigger_from_json(every.to_json()) == every
    with pytest.raises(ValueError):
        cron.next_after(datetime(2026, 1, 1))  # naive: a caller bug
