"""The outbox relay and a full bounded queue: it never blocks, publishes every other row,
and delivers the refused job once the queue has room; nothing is dropped."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import asyncpg
import pytest
import redis.asyncio as aioredis

from runtime.broker import QUEUE_ANALYTICS, QUEUE_MAINTENANCE, JobSpec, setup_broker
from runtime.jobs.store import JobStore
from runtime.outbox import OutboxRelay, emit, stream_key
from runtime.settings import Settings

pytestmark = pytest.mark.slow

FULL = JobSpec(QUEUE_MAINTENANCE, "jtm_outbox_full")
ROOMY = JobSpec(QUEUE_ANALYTICS, "jtm_outbox_roomy")
CHANNEL = "test"
# The relay's safety-net poll, short: after room frees no NOTIFY wakes it.
POLL_S = 0.1


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Await ``check`` until true; fail with ``what`` after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


async def _published(pool: asyncpg.Pool, row_id: int) -> bool:
    return bool(await pool.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1",
                                    row_id))


async def test_a_full_queue_holds_back_only_its_rows_job_until_there_is_room(
        settings: Settings, pool: asyncpg.Pool) -> None:
    # A producer that blocked would wait a minute: the relay must not.
    bounded = replace(settings, queue_max_lengths=((QUEUE_MAINTENANCE, 1.0),),
                      queue_full_policy="block", queue_full_timeout_s=60.0)
    broker = setup_broker(bounded)
    client = aioredis.Redis.from_url(bounded.redis_url or "")
    store = JobStore(client, broker.keys, [QUEUE_MAINTENANCE, QUEUE_ANALYTICS])
    filler = FULL.send(broker, "filler")  # the maintenance queue is now at its bound
    async with pool.acquire() as conn:
        async with conn.transaction():
            held = await emit(conn, CHANNEL, "thing.happened", {"n": 1}, job=FULL.as_job(1))
        async with conn.transaction():
            other = await emit(conn, CHANNEL, "thing.happened", {"n": 2}, job=ROOMY.as_job(2))
        async with conn.transaction():
            plain = await emit(conn, CHANNEL, "thing.happened", {"n": 3})
    relay = OutboxRelay(pool, bounded.database_url or "", client, broker, bounded.namespace,
                        poll_s=POLL_S)
    task = asyncio.create_task(relay.run())
    try:
        async def others_out() -> bool:
            return await _published(pool, other) and await _published(pool, plain)

        await _eventually(others_out, 15, "the rows behind the full queue's row to be published")
        assert not await _published(pool, held)
        assert await store.get(f"outbox-{other}-0") is not None, "the other queue's job"
        assert await store.get(f"outbox-{held}-0") is None, "no job past the bound"
        assert await client.xlen(stream_key(bounded.namespace, CHANNEL)) >= 3
        assert await store.remove(filler.job_id) == "removed"  # room at last

        async def held_out() -> bool:
            return await _published(pool, held)

        await _eventually(held_out, 15, "the held row to be published once there is room")
        delivered = await store.get(f"outbox-{held}-0")
        assert delivered is not None and delivered["args"] == [1]
        assert (await store.counts([QUEUE_MAINTENANCE]))[0].waiting == 1
        errors = await pool.fetchval("SELECT count(*) FROM outbox WHERE publish_error IS NOT NULL")
        assert errors == 0
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
        broker.close()
        await client.aclose()
