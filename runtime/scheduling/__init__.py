"""Scheduling: cron in any IANA zone, right across DST, exactly once per slot.

- :mod:`.cron` parses cron expressions; :mod:`.triggers` turns them (or
  fixed intervals) into UTC instants, as pure functions of "now".
- :mod:`.schedule` defines a schedule and its misfire and overlap policies.
- :mod:`.store` is the Redis side: leader lease, slot claims, run state and
  the repeatable jobs API (add / list / remove).
- :mod:`.scheduler` is the process loop; :mod:`.middleware` the worker side;
  :mod:`.health` the cron heartbeat and the /health view.

Why not periodiq: see docs/scheduling.md.
"""

from runtime.scheduling.cron import CronExpr
from runtime.scheduling.health import scheduler_health, write_heartbeat
from runtime.scheduling.middleware import ScheduledRunMiddleware
from runtime.scheduling.overview import schedule_view, schedules_overview
from runtime.scheduling.schedule import MisfirePolicy, OverlapPolicy, Schedule, plan_due_slots
from runtime.scheduling.scheduler import Scheduler, TickReport, broker_sender
from runtime.scheduling.store import (
    SchedulerStore,
    add_repeatable,
    connect_redis,
    get_repeatable,
    list_repeatables,
    remove_repeatable,
    repeatable_from_request,
)
from runtime.scheduling.triggers import (
    CronTrigger,
    IntervalTrigger,
    next_slots,
    slots_between,
    start_of_local_day,
)

__all__ = [
    "CronExpr", "CronTrigger", "IntervalTrigger", "MisfirePolicy", "OverlapPolicy",
    "Schedule", "ScheduledRunMiddleware", "Scheduler", "SchedulerStore", "TickReport",
    "add_repeatable", "broker_sender", "connect_redis", "get_repeatable", "list_repeatables",
    "next_slots", "plan_due_slots", "remove_repeatable", "repeatable_from_request",
    "schedule_view", "scheduler_health", "schedules_overview", "slots_between",
    "start_of_local_day", "write_heartbeat",
]
