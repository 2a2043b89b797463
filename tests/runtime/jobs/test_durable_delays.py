"""A delayed job survives a restart of Redis (append-only file on) and of every worker."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from runtime import embedded
from runtime.broker import ALL_QUEUES, QUEUE_ANALYTICS, JobSpec, declare_actor, setup_broker
from runtime.jobs.script import JobKeys, JobScript, events_stream
from runtime.jobs.store import JobStore, QueueCounts
from runtime.jobs.worker import make_worker
from runtime.settings import Settings
from tests.support import free_port

from .conftest import Seen
from .test_dedup import Clock

LATER = JobSpec(QUEUE_ANALYTICS, "jt_later")
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def own_redis(settings: Settings) -> Iterator[tuple[Settings, embedded.EmbeddedPaths, int]]:
    """A Redis of this test's own (so it may restart it), persistence as the README says."""
    paths = embedded.EmbeddedPaths(Path(tempfile.mkdtemp(prefix="shopflow-aof-")))
    port = free_port()
    url = embedded.ensure_redis(paths, port)
    yield replace(settings, redis_url=url), paths, port
    embedded.stop_redis(paths, port)
    embedded.remove_data(paths)


async def _job(settings: Settings, job_id: str) -> dict[str, object] | None:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        keys = setup_broker(settings).keys
        return await JobStore(client, keys, ALL_QUEUES).get(job_id)
    finally:
        await client.aclose()


def test_delayed_jobs_survive_redis_and_worker_restarts_and_run_when_due(
        own_redis: tuple[Settings, embedded.EmbeddedPaths, int]) -> None:
    settings, paths, port = own_redis
    ran: list[str] = []
    broker = setup_broker(settings)
    declare_actor(broker, LATER, ran.append)
    worker = make_worker(broker, {QUEUE_ANALYTICS}, 1)
    worker.start()
    tomorrow = LATER.send(broker, "tomorrow", delay_ms=DAY_MS, job_id="report-tomorrow")
    soon = LATER.send(broker, "soon", delay_ms=1_500, job_id="reminder-soon")
    worker.stop()  # every worker gone ...
    broker.close()
    embedded.stop_redis(paths, port)  # ... and Redis restarted
    embedded.ensure_redis(paths, port)

    broker = setup_broker(settings)
    seen = Seen()
    broker.hooks.subscribe("completed", seen)
    declare_actor(broker, LATER, ran.append)
    worker = make_worker(broker, {QUEUE_ANALYTICS}, 1)
    worker.start()
    try:
        seen.wait("completed", soon.job_id)
    finally:
        worker.stop()
        broker.close()
    assert ran == ["soon"]
    kept = asyncio.run(_job(settings, tomorrow.job_id))
    assert kept is not None and kept["state"] == "delayed" and kept["args"] == ["tomorrow"]
    due = datetime.fromisoformat(str(kept["run_at"]))
    assert due > datetime.now(UTC) + timedelta(hours=23)

    # ... and runs when its time comes: the job script's clock is a day ahead now. (The
    # heartbeat timeout outlasts the test, so no sweep judges the worker dead on it.)
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=3_600_000))
    clock = Clock()
    clock.offset_s = DAY_MS / 1000 + 60
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    seen = Seen()
    broker.hooks.subscribe("completed", seen)
    declare_actor(broker, LATER, ran.append)
    worker = make_worker(broker, {QUEUE_ANALYTICS}, 1)
    worker.start()
    try:
        seen.wait("completed", tomorrow.job_id)
    finally:
        worker.stop()
        broker.close()
    assert ran == ["soon", "tomorrow"]


def test_a_redis_restart_mid_stream_loses_no_job_and_runs_none_twice(
        own_redis: tuple[Settings, embedded.EmbeddedPaths, int]) -> None:
    """Jobs in flight while Redis restarts: each ends exactly once, and the totals balance."""
    import collections
    import threading
    import time

    import redis as redis_sync

    settings, paths, port = own_redis
    settings = replace(settings, broker_heartbeat_timeout_ms=1_500, job_sweep_interval_s=0.25)
    ran: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def work(tag: str) -> None:
        time.sleep(0.02)
        with lock:
            ran[tag] += 1

    broker = setup_broker(settings)
    declare_actor(broker, LATER, work)
    worker = make_worker(broker, {QUEUE_ANALYTICS}, 4)
    worker.start()
    producer = setup_broker(settings)
    tags = [f"job-{n}" for n in range(150)]
    try:
        for n, tag in enumerate(tags):
            if n == 60:
                embedded.stop_redis(paths, port)  # mid-stream, jobs in flight
                embedded.ensure_redis(paths, port)
            while True:  # a producer that retries under the same job id, as the outbox does
                try:
                    LATER.send(producer, tag, job_id=tag)
                    break
                except redis_sync.exceptions.ConnectionError:
                    time.sleep(0.05)
        # Wait for the jobs' ends as recorded, not for their bodies: a body returns a moment
        # before its worker records the job completed (the totals read then were 148 of 150).
        counts = asyncio.run(_counts_once_completed(settings, len(tags), timeout_s=60))
    finally:
        worker.stop()
        broker.close()
        producer.close()
    assert sorted(ran) == sorted(tags), "a job was lost"
    assert max(ran.values()) == 1, [t for t, n in ran.items() if n > 1]
    assert counts.totals.get("enqueued") == len(tags)
    assert counts.totals.get("completed") == len(tags)
    assert (counts.waiting, counts.active, counts.delayed) == (0, 0, 0)
    assert counts.totals.get("stalled", 0) == 0, "a live worker was judged dead"


async def _counts_once_completed(settings: Settings, jobs: int, timeout_s: float) -> QueueCounts:
    """The analytics queue's counts once ``jobs`` completed (or at the timeout: then the
    caller's assertions say what is missing)."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    keys = JobKeys(f"{settings.namespace}-jobs", events_stream(settings.namespace))
    store = JobStore(client, keys, ALL_QUEUES)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                [counts] = await store.counts([QUEUE_ANALYTICS])
                if counts.totals.get("completed", 0) >= jobs:
                    return counts
                await asyncio.sleep(0.05)
    except TimeoutError:
        return counts
    finally:
        await client.aclose()
