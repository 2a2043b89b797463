"""When a schedule fires: pure functions of "now", right across daylight saving.

Every function here takes the current instant as a parameter and returns
aware UTC datetimes, so the rules are tested with tables of datetimes and no
clock. The rules (also in docs/scheduling.md):

- A cron schedule runs at local wall times of its own IANA zone.
- A fixed-time schedule (its hour field does not cover all 24 hours, e.g. a
  daily 02:30) runs once per local day at its wall time. A wall time that does
  not exist that day (spring forward) runs once at the first valid moment
  after it, the instant the clocks jump. A wall time that happens twice (fall
  back) runs once, at its first occurrence.
- An hourly-or-finer cron schedule (hour field ``*``, e.g. ``*/15 * * * *``)
  follows real elapsed time: it runs at every real instant whose local wall
  clock matches, so in a repeated hour it runs in both occurrences and wall
  times that never happen are not invented.
- An interval schedule (``every`` N seconds) counts real seconds from an
  anchor and ignores wall clocks altogether.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from itertools import pairwise
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from runtime.errors import ValidationError
from runtime.scheduling.cron import CronExpr

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Far enough to find a 29 February that is also, say, a Monday.
_MAX_SEARCH_DAYS = 366 * 29
# The longest interval a schedule may have (ten years): slots stay far from datetime's limits.
MAX_INTERVAL_S = 10 * 366 * 24 * 3600


def require_aware(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is a bug in the caller, not an input to guess at."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {moment!r}")
    return moment.astimezone(UTC)


def zone_named(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or a :class:`ValidationError` naming it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"unknown IANA time zone {name!r}", field="timezone") from None


def _local_wall(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone).replace(tzinfo=None)


def instants_of_wall_time(wall: datetime, zone: ZoneInfo) -> list[datetime]:
    """The UTC instants at which ``zone``'s clocks show the naive ``wall`` time.

    One instant normally, two in a repeated (fall-back) hour, none in a
    skipped (spring-forward) gap.
    """
    found: list[datetime] = []
    for fold in (0, 1):
        instant = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if _local_wall(instant, zone) == wall and instant not in found:
            found.append(instant)
    return sorted(found)


def gap_end(wall: datetime, zone: ZoneInfo) -> datetime:
    """For a ``wall`` time inside a spring-forward gap: the instant the clocks jumped.

    That is the first valid moment after ``wall``. Found by bisecting between
    the two readings zoneinfo gives for a non-existent time (one before the
    jump, one after), to the second.
    """
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    after = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    low, high = min(before, after), max(before, after)
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if _local_wall(middle, zone) > wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


def start_of_local_day(day: date, zone: ZoneInfo) -> datetime:
    """The first instant of the local calendar ``day`` (01:00 where midnight was skipped)."""
    midnight = datetime.combine(day, time(0, 0))
    instants = instants_of_wall_time(midnight, zone)
    return instants[0] if instants else gap_end(midnight, zone)


class Trigger(Protocol):
    """Decides a schedule's slots: the instants at which it is due."""

    def next_after(self, moment: datetime) -> datetime:
        """The first slot strictly after ``moment`` (aware), as an aware UTC datetime."""
        ...

    def describe(self) -> str:
        """A short human description (for ``shopflow schedules``)."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored with a repeatable job."""
        ...


@lru_cache(maxsize=4096)
def _day_instants(expr: CronExpr, zone_name: str, day: date) -> tuple[datetime, ...]:
    """The slots of ``expr`` on the local ``day`` in ``zone_name``, applying the DST rules."""
    if not expr.matches_date(day):
        return ()
    zone = ZoneInfo(zone_name)
    found: set[datetime] = set()
    for hour, minute in expr.times_of_day():
        wall = datetime.combine(day, time(hour, minute))
        instants = instants_of_wall_time(wall, zone)
        if not instants:
            if not expr.every_hour:
                found.add(gap_end(wall, zone))
        elif expr.every_hour:
            found.update(instants)
        else:
            found.add(instants[0])
    return tuple(sorted(found))


@dataclass(frozen=True)
class CronTrigger:
    """A cron expression read in an IANA time zone (see the module docstring for DST)."""

    expr: CronExpr
    zone_name: str
    zone: ZoneInfo = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, zone_name: str) -> CronTrigger:
        """A trigger for ``text`` in ``zone_name``; fails on a bad expression or zone, or
        one that never fires (``0 0 31 2 *``)."""
        trigger = cls(CronExpr.parse(text), zone_name, zone_named(zone_name))
        trigger.next_after(EPOCH + timedelta(days=365 * 56))
        return trigger

    def _instants_on(self, day: date) -> tuple[datetime, ...]:
        """Every slot on the local ``day``, as sorted UTC instants (cached per day)."""
        return _day_instants(self.expr, self.zone_name, day)

    def next_after(self, moment: datetime) -> datetime:
        """The first slot strictly after ``moment``."""
        moment = require_aware(moment)
        # Start a day early: a slot on yesterday's local date can still lie ahead
        # when a gap pushed it past midnight.
        day = _local_wall(moment, self.zone).date() - timedelta(days=1)
        for offset in range(_MAX_SEARCH_DAYS):
            current = day + timedelta(days=offset)
            ahead = [i for i in self._instants_on(current) if i > moment]
            if ahead:
                # A gap at the end of ``current`` can push its slot past the
                # first slot of the next day; take the earlier of the two.
                nxt = [i for i in self._instants_on(current + timedelta(days=1)) if i > moment]
                return min(ahead + nxt)
        raise ValidationError(f"cron expression {self.expr.text!r} never fires", field="cron")

    def describe(self) -> str:
        return f"cron {self.expr.text} ({self.zone_name})"

    def to_json(self) -> dict[str, Any]:
        return {"cron": self.expr.text, "timezone": self.zone_name}


@dataclass(frozen=True)
class IntervalTrigger:
    """Every ``every_s`` real seconds, counted from ``anchor`` (the Unix epoch by default).

    Anchored to the epoch, every 15 minutes means :00, :15, :30, :45 UTC, so
    every process computes the same slots without talking to the others.
    """

    every_s: int
    anchor: datetime = EPOCH

    def __post_init__(self) -> None:
        if not 1 <= self.every_s <= MAX_INTERVAL_S:
            raise ValidationError(f"an interval must be 1 to {MAX_INTERVAL_S} seconds",
                                  field="every_s")
        require_aware(self.anchor)

    def next_after(self, moment: datetime) -> datetime:
        moment = require_aware(moment)
        elapsed_s = (moment - self.anchor).total_seconds()
        periods = int(elapsed_s // self.every_s) + 1
        return self.anchor + timedelta(seconds=periods * self.every_s)

    def describe(self) -> str:
        return f"every {self.every_s}s"

    def to_json(self) -> dict[str, Any]:
        return {"every_s": self.every_s, "anchor": self.anchor.isoformat()}


def trigger_from_json(data: dict[str, Any]) -> CronTrigger | IntervalTrigger:
    """Rebuild a trigger stored with :meth:`Trigger.to_json`."""
    if "cron" in data:
        return CronTrigger.parse(str(data["cron"]), str(data.get("timezone") or "UTC"))
    if "every_s" in data:
        anchor = datetime.fromisoformat(str(data.get("anchor") or EPOCH.isoformat()))
        return IntervalTrigger(int(data["every_s"]), require_aware(anchor))
    raise ValidationError("a trigger needs either 'cron' (with 'timezone') or 'every_s'")


def slots_between(trigger: Trigger, after: datetime, until: datetime) -> Iterator[datetime]:
    """Every slot in the half-open span (``after``, ``until``], in order."""
    current = trigger.next_after(after)
    until = require_aware(until)
    while current <= until:
        yield current
        current = trigger.next_after(current)


def next_slots(trigger: Trigger, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` slots after ``after``."""
    out: list[datetime] = []
    current = require_aware(after)
    for _ in range(count):
        current = trigger.next_after(current)
        out.append(current)
    return out


# How many upcoming slots :func:`longest_gap_s` looks at (a weekday schedule's weekend gap
# shows within a week; a weekly one's within 16 weeks).
GAP_SAMPLE_SLOTS = 16


def longest_gap_s(trigger: Trigger, after: datetime, slots: int = GAP_SAMPLE_SLOTS) -> float:
    """The longest real time between two consecutive slots among the next ``slots`` after
    ``after``: how long a healthy schedule can go without running (a daily schedule's 25-hour
    DST day, a weekday schedule's weekend). Alert rules compare a schedule's last success
    with it."""
    upcoming = next_slots(trigger, after, max(2, slots))
    return max((b - a).total_seconds() for a, b in pairwise(upcoming))


# The first window :func:`newest_slot_between` looks back over; it doubles until a slot shows.
_LOOK_BACK_START = timedelta(minutes=1)


def newest_slot_between(trigger: Trigger, after: datetime, until: datetime) -> datetime | None:
    """The last slot in the half-open span (``after``, ``until``], or ``None``.

    Looks back from ``until`` over windows that double in length, so the
    answer costs about as much as the slots of the last window or two, not
    every slot of a span that may hold millions (an every-minute schedule
    behind a scheduler that was down for weeks).
    """
    after, until = require_aware(after), require_aware(until)
    span = _LOOK_BACK_START
    while True:
        start = max(after, until - span)
        last = deque(slots_between(trigger, start, until), maxlen=1)
        if last or start == after:
            return last[0] if last else None
        span *= 2
