"""Scheduled runs and slot decisions into the runtime's Prometheus metrics.

:class:`ScheduleMetrics` is both the worker middleware's
:class:`~runtime.scheduling.middleware.RunObserver` (every run's outcome,
duration, last success) and the scheduler's
:class:`~runtime.scheduling.scheduler.SchedulerObserver` (missed and late
slots, each built-in schedule's expected interval). Every worker process and
the scheduler process build one, so the figures exist whichever worker runs a
schedule's job.

**Bounded labels.** The ``schedule`` label is the schedule's name for the
shop's built-in schedules (a fixed set, from the code) and the single value
``repeatable`` for every repeatable job added at run time (their names are
chosen by operators and unbounded). A repeatable job's own figures stay in
Redis (``shopflow schedules``).
"""

from __future__ import annotations

import time
from datetime import datetime

from runtime.metrics import Metrics
from runtime.scheduling.schedule import Schedule
from runtime.scheduling.triggers import longest_gap_s

# The one ``schedule`` label value shared by every repeatable job.
REPEATABLE_LABEL = "repeatable"
# Schedule sources (Schedule.source; the ``sched_source`` message option).
SOURCE_BUILTIN = "builtin"
SOURCE_REPEATABLE = "repeatable"
# The expected interval is recomputed this often per schedule (it rarely changes).
INTERVAL_REFRESH_S = 3600.0


def schedule_label(name: str, source: str | None) -> str:
    """The ``schedule`` label of a schedule: its name if built in, else ``repeatable``."""
    return REPEATABLE_LABEL if source == SOURCE_REPEATABLE else name


class ScheduleMetrics:
    """Feeds the ``shopflow_cron_*`` metrics. Called from worker threads and from the
    scheduler's loop; the prometheus-client objects are thread-safe."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # name -> (trigger, monotonic time it was published), to refresh the gauge hourly.
        self._published: dict[str, tuple[object, float]] = {}

    # --- RunObserver (worker threads) ------------------------------------------------

    def run_finished(self, schedule: str, outcome: str, duration_s: float | None) -> None:
        """Count a scheduled run by outcome; time it; remember its last success."""
        self._metrics.cron_runs.labels(schedule, outcome).inc()
        if duration_s is not None:
            self._metrics.cron_duration.labels(schedule).observe(duration_s)
        if outcome == "succeeded":
            self._metrics.cron_last_success.labels(schedule).set(time.time())

    def run_started_late(self, schedule: str) -> None:
        """Count a run that started more than the middleware's lateness bound after its slot."""
        self._metrics.cron_started_late.labels(schedule).inc()

    # --- SchedulerObserver (the scheduler's loop) -------------------------------------

    def slots_missed(self, schedule: Schedule, count: int) -> None:
        """Count slots that were due while no scheduler ran and did not run."""
        self._metrics.cron_missed.labels(schedule_label(schedule.name, schedule.source)).inc(count)

    def slot_late(self, schedule: Schedule) -> None:
        """Count a slot sent after its misfire grace (a catch-up run)."""
        self._metrics.cron_late.labels(schedule_label(schedule.name, schedule.source)).inc()

    def schedule_seen(self, schedule: Schedule, now: datetime) -> None:
        """Publish a built-in schedule's expected interval (hourly, or when its trigger changes).

        Repeatable jobs share one label and come and go, so they get none.
        """
        if schedule.source == SOURCE_REPEATABLE:
            return
        published = self._published.get(schedule.name)
        mono = time.monotonic()
        if published is not None and published[0] == schedule.trigger \
                and mono - published[1] < INTERVAL_REFRESH_S:
            return
        self._metrics.cron_expected_interval.labels(schedule.name).set(
            longest_gap_s(schedule.trigger, now))
        self._published[schedule.name] = (schedule.trigger, mono)
