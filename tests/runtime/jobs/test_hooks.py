"""Every lifecycle event reaches the in-process hooks and the log, not only the Redis stream.

Progress reported by a running job, and the cancellations and removals made
through a JobStore, were written to the stream only; stalls were always hooked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from runtime.broker import ALL_QUEUES, QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker
from runtime.jobs.context import current_job
from runtime.jobs.store import JobStore
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

from .conftest import Seen
from .test_stalls import HEARTBEAT_TIMEOUT_MS, STALLS, SWEEP_INTERVAL_S, hold, last_beat

REPORTS = JobSpec(QUEUE_EMAILS, "jobs_test_reports")
EVENTS_LOG = "runtime.jobs.events"


def logged(caplog: pytest.LogCaptureFixture, job_id: str) -> list[tuple[str, int]]:
    """(event, level) of the job event log lines of ``job_id``."""
    return [(str(getattr(r, "event", "")), r.levelno) for r in caplog.records
            if r.name == EVENTS_LOG and getattr(r, "job_id", None) == job_id]


async def test_a_running_jobs_progress_is_hooked_and_logged(
        broker: JobBroker, seen: Seen, running: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=EVENTS_LOG)

    def reports() -> None:
        job = current_job()
        assert job is not None
        job.progress({"done": 3, "of": 4})

    declare_actor(broker, REPORTS, reports)
    sent = REPORTS.send(broker)
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", sent.job_id)
    [progress] = seen.wait("progress", sent.job_id)
    assert (progress.queue, progress.actor, progress.attempt) == (QUEUE_EMAILS, REPORTS.actor, 1)
    assert progress.detail == {"progress": {"done": 3, "of": 4}}
    assert ("progress", logging.DEBUG) in logged(caplog, sent.job_id)


async def test_cancels_and_removals_through_the_store_are_hooked_and_logged(
        broker: JobBroker, store: JobStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=EVENTS_LOG)
    store_seen = Seen()
    store.hooks.subscribe(None, store_seen)
    declare_actor(broker, REPORTS, lambda: None)
    waiting = REPORTS.send(broker)
    delayed = REPORTS.send(broker, delay_ms=60_000)
    assert await store.cancel(waiting.job_id) == "cancelled"
    assert await store.cancel(delayed.job_id) == "cancelled"
    await store.progress(delayed.job_id, "7")
    assert await store.remove(waiting.job_id) == "removed"
    assert [(e.kind, e.job_id, e.queue, e.actor, e.detail) for e in store_seen.events] == [
        ("cancelled", waiting.job_id, QUEUE_EMAILS, REPORTS.actor, {"while_state": "waiting"}),
        ("cancelled", delayed.job_id, QUEUE_EMAILS, REPORTS.actor, {"while_state": "delayed"}),
        ("progress", delayed.job_id, QUEUE_EMAILS, REPORTS.actor, {"progress": 7}),
        ("removed", waiting.job_id, QUEUE_EMAILS, REPORTS.actor, {"while_state": "cancelled"}),
    ]
    assert logged(caplog, waiting.job_id) == [
        ("waiting", logging.DEBUG), ("cancelled", logging.INFO), ("removed", logging.INFO)]


async def test_a_cancel_request_for_a_running_job_is_hooked_in_the_process_that_made_it(
        broker: JobBroker, store: JobStore, running: Callable[..., Any]) -> None:
    store_seen = Seen()
    store.hooks.subscribe("cancel_requested", store_seen)
    started = threading.Event()

    def stops() -> None:
        job = current_job()
        assert job is not None
        started.set()
        while True:
            job.check_cancelled()
            threading.Event().wait(0.01)

    declare_actor(broker, REPORTS, stops)
    sent = REPORTS.send(broker)
    with running({QUEUE_EMAILS}):
        assert await asyncio.to_thread(started.wait, 20)
        assert await store.cancel(sent.job_id) == "requested"
    [event] = store_seen.events
    assert (event.kind, event.job_id, event.detail) == (
        "cancel_requested", sent.job_id, {"while_state": "active"})


def test_a_stall_is_hooked_and_logged(settings: Settings,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=EVENTS_LOG)
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
                                  job_sweep_interval_s=SWEEP_INTERVAL_S))
    seen = Seen()
    broker.hooks.subscribe(None, seen)
    declare_actor(broker, STALLS, lambda: None)
    sent = STALLS.send(broker, attempts=2, backoff="fixed", backoff_ms=10)
    hold(broker, sent)
    worker = make_worker(broker, {QUEUE_EMAILS}, 1)
    worker.start()
    try:
        last_beat(broker)
        seen.wait("completed", sent.job_id)
    finally:
        worker.stop()
        broker.close()
    [stalled] = [e for e in seen.events if e.kind == "stalled"]
    assert (stalled.job_id, stalled.attempt, stalled.detail["deaths"]) == (sent.job_id, 1, 1)
    assert ("stalled", logging.INFO) in logged(caplog, sent.job_id)


async def test_a_store_given_the_brokers_hooks_tells_the_brokers_listeners(
        settings: Settings, broker: JobBroker, seen: Seen) -> None:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        store = JobStore(client, broker.keys, ALL_QUEUES, hooks=broker.hooks)
        declare_actor(broker, REPORTS, lambda: None)
        sent = REPORTS.send(broker)
        await store.cancel(sent.job_id)
    finally:
        await client.aclose()
    assert seen.kinds(sent.job_id) == ["waiting", "cancelled"]
