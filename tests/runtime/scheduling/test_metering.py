"""The shopflow_cron_* metrics: values after known scheduler decisions and worker runs."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import pytest
import redis.asyncio as aioredis
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from runtime.broker import QUEUE_EMAILS, QUEUE_MAINTENANCE, JobSpec, declare_actor, setup_broker
from runtime.metrics import get_metrics
from runtime.scheduling import (
    CronTrigger,
    IntervalTrigger,
    MisfirePolicy,
    Schedule,
    Scheduler,
    SchedulerStore,
    broker_sender,
)
from runtime.scheduling.metering import ScheduleMetrics
from runtime.scheduling.triggers import longest_gap_s
from runtime.settings import Settings
from runtime.worker import install_scheduled_runs
from tests.runtime.metrics_helpers import scrape, value

JOB = JobSpec(QUEUE_MAINTENANCE, "tick_job")
START = datetime(2024, 11, 3, 5, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(("trigger", "gap_s"), [
    (IntervalTrigger(900), 900),
    (CronTrigger.parse("0 8 * * *", "America/Sao_Paulo"), 24 * 3600),
    # New York's fall-back day (2024-11-03) is 25 hours long.
    (CronTrigger.parse("0 8 * * *", "America/New_York"), 25 * 3600),
    (CronTrigger.parse("0 9 * * 1-5", "Europe/London"), 3 * 24 * 3600),
])
def test_the_expected_interval_is_the_longest_gap_between_slots(
    trigger: IntervalTrigger | CronTrigger, gap_s: float
) -> None:
    assert longest_gap_s(trigger, datetime(2024, 10, 30, tzinfo=UTC)) == gap_s


async def test_missed_and_late_slots_and_expected_intervals_are_counted(
    redis_client: aioredis.Redis, settings: Settings
) -> None:
    """A three-hour outage behind a 15-minute schedule: 11 missed, 1 late catch-up run."""
    broker = setup_broker(settings)
    schedules = [Schedule("quarterly", IntervalTrigger(900), JOB),
                 Schedule("promo-for-bob", IntervalTrigger(900), JOB, source="repeatable"),
                 Schedule("skipper", IntervalTrigger(900), JOB, misfire=MisfirePolicy.SKIP)]
    scheduler = Scheduler(SchedulerStore(redis_client, settings.namespace),
                          broker_sender(broker), schedules, instance_id="solo",
                          observer=ScheduleMetrics(get_metrics(settings)))
    try:
        await scheduler.tick(START)
        await scheduler.tick(START + timedelta(hours=3, minutes=1))
    finally:
        broker.close()
    s = scrape(settings)
    assert value(s, "shopflow_cron_missed_total", schedule="quarterly") == 11
    assert value(s, "shopflow_cron_late_total", schedule="quarterly") == 1
    assert value(s, "shopflow_cron_missed_total", schedule="skipper") == 12
    assert value(s, "shopflow_cron_late_total", schedule="skipper") is None
    assert value(s, "shopflow_cron_missed_total", schedule="repeatable") == 11
    assert value(s, "shopflow_cron_missed_total", schedule="promo-for-bob") is None
    assert value(s, "shopflow_cron_expected_interval_seconds", schedule="quarterly") == 900
    assert value(s, "shopflow_cron_expected_interval_seconds", schedule="repeatable") is None


class Ran(Middleware):
    def __init__(self) -> None:
        self.done = threading.Event()

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy,
                              *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        self.done.set()


def test_every_worker_meters_scheduled_runs_on_any_queue(settings: Settings) -> None:
    """A scheduled job on the e-mail queue (not the flow worker's) run by a worker wired as
    ``runtime.worker`` wires every kind: its run reaches shopflow_cron_runs_total."""
    ran = Ran()
    broker = setup_broker(settings)
    install_scheduled_runs(broker, settings)
    broker.add_middleware(ran)  # after the run is recorded
    spec = JobSpec(QUEUE_EMAILS, "scheduled_mail")
    declare_actor(broker, spec, lambda: None)
    broker.enqueue(Scheduler._message(Schedule("weekly-mail", IntervalTrigger(60), spec), START))
    worker = dramatiq.Worker(broker, queues={QUEUE_EMAILS}, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        assert ran.done.wait(30)
    finally:
        worker.stop()
        broker.close()
    s = scrape(settings)
    assert value(s, "shopflow_cron_runs_total", schedule="weekly-mail", outcome="succeeded") == 1
    assert value(s, "shopflow_cron_started_late_total", schedule="weekly-mail") == 1
    last = value(s, "shopflow_cron_last_success_timestamp_seconds", schedule="weekly-mail")
    assert last is not None and last > START.timestamp()
