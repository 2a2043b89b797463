"""The queue monitor as a supervised actor in a worker process, with job metrics installed."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import dramatiq

from actors.monitor.actor import QueueMonitorActor, concern
from actors.monitor.messages import CHECK_QUEUES
from actors.monitor.service import CheckReport, QueueMonitor
from runtime.alerts import Alerter
from runtime.broker import ALL_QUEUES, QUEUE_MAINTENANCE, JobSpec, declare_actor
from runtime.metrics import get_metrics, prepare_metrics_dir
from runtime.observability import install_job_metrics
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import build_root
from tests.runtime.metrics_helpers import scrape, value, wait_until


def test_monitor_concern_checks_on_start_and_on_request(settings: Settings) -> None:
    settings = replace(settings, monitor_interval_s=3600.0)  # only the first check and ours
    prepare_metrics_dir(settings)
    ctx = ProcessContext.start(settings)
    install_job_metrics(ctx)
    monitor = concern(ctx)
    root = build_root("flow", [monitor]).start()
    monitor.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 10))
    declare_actor(ctx.broker, JobSpec(QUEUE_MAINTENANCE, "obs_noop"), lambda: None, critical=True)
    worker = dramatiq.Worker(ctx.broker, queues=set(monitor.queues), worker_threads=1,
                             worker_timeout=50)
    worker.start()
    try:
        wait_until(lambda: (value(scrape(settings),
                                  "shopflow_queue_monitor_last_check_timestamp_seconds") or 0) > 0,
                   what="the check the actor runs when it starts")
        CHECK_QUEUES.send(ctx.broker)
        wait_until(lambda: value(scrape(settings), "shopflow_jobs_total", queue="maintenance",
                                 actor="monitor_check_queues", outcome="completed") == 1,
                   what="the requested check to complete")
        snap = scrape(settings)
        assert value(snap, "shopflow_queue_consumers", queue="maintenance") == 1
        assert value(snap, "shopflow_queue_jobs", queue="emails", state="waiting") == 0
    finally:
        worker.stop()
        root.stop()
        ctx.stop()


class CountingMonitor(QueueMonitor):
    """The real monitor, plus a count of finished checks that a test thread can wait on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks = 0
        self._changed = threading.Condition()

    async def check(self) -> CheckReport:
        report = await super().check()
        with self._changed:
            self.checks += 1
            self._changed.notify_all()
        return report

    def wait_for(self, checks: int, timeout_s: float) -> bool:
        """Block until ``checks`` checks finished; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.checks >= checks, timeout_s)


def test_the_ticker_makes_the_actor_check_again_and_again_until_it_stops(
        settings: Settings) -> None:
    """Nobody asks for a check: with a 50 ms interval the actor's own ticker keeps checking."""
    prepare_metrics_dir(settings)
    ctx = ProcessContext.start(settings)
    metrics = get_metrics(settings)
    monitor = CountingMonitor(settings, ctx.redis, Alerter(settings, ctx.redis, metrics),
                              metrics, ALL_QUEUES)
    actor = QueueMonitorActor.start(monitor, ctx.bridge, 0.05, 10.0)
    try:
        assert monitor.wait_for(5, timeout_s=30), f"only {monitor.checks} checks"
    finally:
        actor.stop()
        ctx.stop()
    tickers = [t for t in threading.enumerate() if t.name == "queue-monitor-ticker"]
    assert tickers == [], "stopping the actor joined its ticker"


def test_the_concern_checks_every_monitor_interval_on_its_own(settings: Settings) -> None:
    """The flow worker's concern, with SHOPFLOW_MONITOR_INTERVAL_S short: the last-check
    timestamp keeps moving without any CHECK_QUEUES message."""
    settings = replace(settings, monitor_interval_s=0.1)
    prepare_metrics_dir(settings)
    ctx = ProcessContext.start(settings)
    root = build_root("flow", [concern(ctx)]).start()
    seen: set[float] = set()

    def another_check() -> bool:
        stamp = value(scrape(settings), "shopflow_queue_monitor_last_check_timestamp_seconds")
        if stamp:
            seen.add(stamp)
        return len(seen) >= 4

    try:
        wait_until(another_check, what="four checks from the ticker")
    finally:
        root.stop()
        ctx.stop()
