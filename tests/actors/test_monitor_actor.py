"""The queue monitor as a supervised actor in a worker process, with job metrics installed."""

from __future__ import annotations

from dataclasses import replace

import dramatiq

from actors.monitor.actor import concern
from actors.monitor.messages import CHECK_QUEUES
from runtime.broker import QUEUE_MAINTENANCE, JobSpec, declare_actor
from runtime.metrics import prepare_metrics_dir
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
