"""A JSON view of every schedule: for ``shopflow schedules --json`` and the HTTP API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis

from runtime.scheduling.schedule import Schedule
from runtime.scheduling.store import SchedulerStore, ScheduleState, list_repeatables
from runtime.scheduling.triggers import CronTrigger, next_slots, require_aware


def display_zone(schedule: Schedule, default_zone: str) -> ZoneInfo:
    """A cron schedule's own zone; interval schedules are shown in ``default_zone``."""
    if isinstance(schedule.trigger, CronTrigger):
        return schedule.trigger.zone
    return ZoneInfo(default_zone)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def schedule_view(schedule: Schedule, state: ScheduleState, now: datetime, default_zone: str,
                  next_count: int = 3) -> dict[str, Any]:
    """One schedule with its next runs (own zone and UTC), last run and counters (pure)."""
    zone = display_zone(schedule, default_zone)
    start = max(require_aware(now), state.cursor or now)
    runs = next_slots(schedule.trigger, start, next_count)
    return {
        **schedule.to_json(),
        "source": schedule.source,
        "describe": schedule.trigger.describe(),
        "zone": str(zone),
        "next_runs": [{"local": r.astimezone(zone).isoformat(), "utc": r.isoformat()}
                      for r in runs],
        "last_run": {
            "status": state.last_status, "slot": _iso(state.last_slot),
            "started_at": _iso(state.last_started_at),
            "finished_at": _iso(state.last_finished_at),
            "error": state.last_error, "result": state.last_result,
        },
        "last_sent_slot": _iso(state.sent_slot),
        "running": state.running,
        "queued": state.queued,
        "counters": state.stats,
    }


async def schedules_overview(
    redis: aioredis.Redis, namespace: str, builtin: Sequence[Schedule], now: datetime,
    default_zone: str, next_count: int = 3,
) -> list[dict[str, Any]]:
    """Every built-in and repeatable schedule as :func:`schedule_view` dicts, by name order
    of definition (built-ins first)."""
    names = {s.name for s in builtin}
    extra = [s for s in await list_repeatables(redis, namespace) if s.name not in names]
    store = SchedulerStore(redis, namespace)
    return [schedule_view(s, await store.state(s.name), now, default_zone, next_count)
            for s in [*builtin, *extra]]
