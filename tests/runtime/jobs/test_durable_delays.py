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
from runtime.jobs.store import JobStore
from runtime.jobs.worker import make_worker
from runtime.settings import Settings
from tests.support import free_port

from .conftest import Seen

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


def test_delayed_jobs_survive_redis_and_worker_restarts(
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
