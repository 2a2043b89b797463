"""Cron expressions: parsing and matching, with no notion of time zones.

Five fields, ``minute hour day-of-month month day-of-week``, with ``*``,
ranges ``a-b``, steps ``*/n`` and ``a-b/n``, lists ``a,b``, month and weekday
names (``jan``, ``mon``), ``7`` as Sunday, and the ``@hourly``-style
shorthands. This is the syntax of Vixie cron, Celery's ``crontab`` and
periodiq's ``cron()``, so expressions move over unchanged.

Day-of-month and day-of-week follow Vixie cron: when both are restricted
(neither starts with ``*``) a day matches if either matches; otherwise both
must match. Turning wall times into instants (and daylight saving) is
:mod:`runtime.scheduling.triggers`' job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from runtime.errors import ValidationError

_SHORTHANDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def _number(token: str, field: int) -> int:
    """One value of a field: a number, or a month/weekday name."""
    lowered = token.lower()
    if field == 3 and lowered in _MONTHS:
        return _MONTHS.index(lowered) + 1
    if field == 4 and lowered in _WEEKDAYS:
        return _WEEKDAYS.index(lowered)
    if not token.isdigit():
        raise ValidationError(f"cron {_FIELD_NAMES[field]} field: {token!r} is not a number")
    return int(token)


def _expand(text: str, field: int) -> frozenset[int]:
    """All values a field allows, checked against the field's bounds."""
    low, high = _BOUNDS[field]
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = _number(step_text, field) if step_text else 1
        if step < 1:
            raise ValidationError(f"cron {_FIELD_NAMES[field]} field: step must be at least 1")
        if span == "*":
            start, end = low, high
        elif "-" in span:
            first, _, last = span.partition("-")
            start, end = _number(first, field), _number(last, field)
        else:
            start = _number(span, field)
            end = high if step_text else start
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise ValidationError(
                f"cron {_FIELD_NAMES[field]} field: {part!r} is outside {low}-{high}"
            )
        values.update(range(start, end + 1, step))
    if field == 4 and 7 in values:  # 7 is another name for Sunday
        values = (values - {7}) | {0}
    return frozenset(values)


@dataclass(frozen=True)
class CronExpr:
    """A parsed cron expression: the allowed values of each field."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    day_restricted: bool
    weekday_restricted: bool

    @classmethod
    def parse(cls, text: str) -> CronExpr:
        """Parse ``text``; raises :class:`ValidationError` saying which field is wrong."""
        stripped = " ".join(text.split())
        fields = _SHORTHANDS.get(stripped.lower(), stripped).split(" ")
        if len(fields) != 5:
            raise ValidationError(
                f"cron expression {text!r} must have 5 fields (minute hour day month weekday)"
            )
        minutes, hours, days, months, weekdays = (_expand(f, i) for i, f in enumerate(fields))
        return cls(
            text=stripped, minutes=minutes, hours=hours, days=days, months=months,
            weekdays=weekdays, day_restricted=not fields[2].startswith("*"),
            weekday_restricted=not fields[4].startswith("*"),
        )

    @property
    def every_hour(self) -> bool:
        """True when the expression fires in every hour of the day (``* * ...``, ``*/15 * ...``).

        Such schedules follow real elapsed time across daylight saving changes
        (see :class:`~runtime.scheduling.triggers.CronTrigger`).
        """
        return len(self.hours) == 24

    def matches_date(self, day: date) -> bool:
        """Whether the expression fires at all on the calendar ``day``."""
        if day.month not in self.months:
            return False
        day_ok = day.day in self.days
        weekday_ok = (day.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def times_of_day(self) -> list[tuple[int, int]]:
        """Every (hour, minute) the expression fires at on a matching day, in order."""
        return [(h, m) for h in sorted(self.hours) for m in sorted(self.minutes)]

    def __str__(self) -> str:
        return self.text
