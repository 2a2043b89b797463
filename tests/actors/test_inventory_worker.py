"""The stock reserver as a worker runs it: the thin ``reserve_stock`` actor, the asker
run_worker hands it, the reserver pool under a root supervisor, a real Dramatiq worker on
real Redis and PostgreSQL (all in this test process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.inventory import actor as inventory
from actors.inventory.messages import RESERVE_STOCK
from runtime.broker import QUEUE_INVENTORY
from runtime.jobs.store import JobStore
from runtime.jobs.worker import make_worker
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import build_root, concern_asker

WAIT_S = 30.0
TERMINAL = ("completed", "failed", "dead", "cancelled")


@pytest.fixture
def worker_ctx(settings: Settings) -> Iterator[ProcessContext]:
    """An inventory worker's insides: context, reserver pool, asker, Dramatiq worker."""
    settings = replace(settings, inventory_concurrency=1, job_attempts=3)
    ctx = ProcessContext.start(settings, pool_size=2)
    concern = inventory.concern(ctx)
    root = build_root("inventory-worker", [concern], settings).start()
    concern.declare(ctx.broker, concern_asker(root, settings))
    worker = make_worker(ctx.broker, {QUEUE_INVENTORY}, 1)
    worker.start()
    yield ctx
    worker.stop(timeout=10_000)
    root.stop()
    ctx.stop()


def _finished_job(ctx: ProcessContext, job_id: str) -> dict[str, Any]:
    """The job's record once it reached a final state (read as operators read it)."""

    async def read() -> dict[str, Any] | None:
        client = aioredis.Redis.from_url(ctx.settings.redis_url or "")
        try:
            return await JobStore(client, ctx.broker.keys, [QUEUE_INVENTORY]).get(job_id)
        finally:
            await client.aclose()

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = ctx.run(read())
        if job is not None and job["state"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish within {WAIT_S}s")


def test_a_reservation_for_a_missing_order_fails_once_without_retries(
        worker_ctx: ProcessContext) -> None:
    """NotFound is hopeless: the job fails on its first attempt with the reason."""
    submitted = RESERVE_STOCK.send(worker_ctx.broker, 424242)
    job = _finished_job(worker_ctx, submitted.job_id)
    assert job["state"] == "failed", job
    assert job["attempt"] == 1, job
    assert "order 424242 does not exist" in job.get("error", ""), job
