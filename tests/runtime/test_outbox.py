"""The transactional outbox: a rollback sends nothing, a crash before relaying loses nothing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from runtime.broker import QUEUE_MAINTENANCE, JobSpec, setup_broker
from runtime.jobs.store import JobStore
from runtime.outbox import OutboxRelay, emit, stream_key
from runtime.settings import Settings

JOB = JobSpec("maintenance", "noop")


async def _relay(settings: Settings, pool: asyncpg.Pool) -> tuple[OutboxRelay, aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    broker = setup_broker(settings)
    return OutboxRelay(pool, settings.database_url or "", client, broker, settings.namespace), client


async def test_rolled_back_change_publishes_nothing(settings: Settings, pool: asyncpg.Pool) -> None:
    relay, client = await _relay(settings, pool)
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await emit(conn, "test", "thing.happened", {"n": 1}, job=JOB.as_job(1))
            raise RuntimeError("the change failed after writing its event")
    assert await relay.publish_batch() == 0
    assert await client.xlen(stream_key(settings.namespace, "test")) == 0
    await client.aclose()


async def test_committed_events_survive_until_a_relay_publishes_them_in_order(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        for n in range(3):
            async with conn.transaction():
                await emit(conn, "test", "thing.happened", {"n": n}, job=JOB.as_job(n))
    # No relay ran (as if the process died right after commit): the rows wait.
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 3
    relay, client = await _relay(settings, pool)
    assert await relay.publish_batch() == 3
    assert await relay.publish_batch() == 0
    entries: Any = await client.xrange(stream_key(settings.namespace, "test"))
    assert [json.loads(f[b"payload"])["n"] for _, f in entries] == [0, 1, 2]
    jobs = await client.llen(f"{settings.namespace}-jobs:maintenance")
    assert jobs == 3
    await client.aclose()


async def test_emit_outside_a_transaction_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="inside the transaction"):
            await emit(conn, "test", "x", {})


class IdleSignallingRelay(OutboxRelay):
    """Sets ``idle`` when a round found nothing to publish: the relay is about to wait."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.idle = asyncio.Event()

    async def publish_batch(self) -> int:
        published = await super().publish_batch()
        if published == 0:
            self.idle.set()
        return published


async def test_stopping_the_relay_as_a_notify_wakes_it_still_stops_it(
        settings: Settings, pool: asyncpg.Pool) -> None:
    """A wake-up (NOTIFY) and the cancel of shutdown in the same loop turn: the relay must
    stop, not swallow the cancel and poll forever (asyncio.wait_for's 3.11 race)."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    relay = IdleSignallingRelay(pool, settings.database_url or "", client,
                                setup_broker(settings), settings.namespace, poll_s=60.0)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(relay.idle.wait(), 10)  # it is now waiting for a wake-up
        relay._wake.set()  # what the NOTIFY listener does
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
    finally:
        task.cancel()
        await client.aclose()


async def test_a_stopped_relay_returns_after_its_round(settings: Settings,
                                                      pool: asyncpg.Pool) -> None:
    """stop() ends run() without a cancel, so a cancel swallowed anywhere cannot keep it alive."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    relay = IdleSignallingRelay(pool, settings.database_url or "", client,
                                setup_broker(settings), settings.namespace, poll_s=60.0)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(relay.idle.wait(), 10)
        relay.stop()
        async with asyncio.timeout(10):
            await task  # returns normally, long before the 60 s poll
    finally:
        task.cancel()
        await client.aclose()


async def test_a_row_published_twice_enqueues_its_job_once(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await emit(conn, "test", "thing.happened", {"n": 1}, job=JOB.as_job(1))
    relay, client = await _relay(settings, pool)
    assert await relay.publish_batch() == 1
    # As if the relay crashed after publishing, before marking the row (its commit is lost).
    await pool.execute("UPDATE outbox SET published_at = NULL, event_published_at = NULL")
    assert await relay.publish_batch() == 1
    assert await client.llen(f"{settings.namespace}-jobs:maintenance") == 1
    await client.aclose()


async def test_a_row_whose_job_can_never_be_enqueued_is_set_aside_not_blocking(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            bad = await emit(conn, "test", "thing.happened", {"n": 0},
                             job={"actor": "nowhere", "args": []})
        async with conn.transaction():
            await emit(conn, "test", "thing.happened", {"n": 1}, job=JOB.as_job(1))
    relay, client = await _relay(settings, pool)
    assert await relay.publish_batch() == 2
    row = await pool.fetchrow("SELECT published_at, publish_error FROM outbox WHERE id = $1", bad)
    assert row["published_at"] is not None and "not a job" in row["publish_error"]
    assert await client.llen(f"{settings.namespace}-jobs:maintenance") == 1
    assert await client.xlen(stream_key(settings.namespace, "test")) == 2
    await client.aclose()


async def test_a_row_held_by_a_full_queue_sends_its_event_once_and_its_job_when_there_is_room(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """While its job waits for room, later rounds retry the job only: one stream entry, however
    many rounds (a copy per round would outrun the readers' de-duplication window)."""
    bounded = replace(settings, queue_max_lengths=((QUEUE_MAINTENANCE, 1.0),))
    broker = setup_broker(bounded)
    client = aioredis.Redis.from_url(bounded.redis_url or "")
    store = JobStore(client, broker.keys, [QUEUE_MAINTENANCE])
    filler = JOB.send(broker, 0)  # the maintenance queue is now at its bound
    async with pool.acquire() as conn, conn.transaction():
        held = await emit(conn, "test", "thing.happened", {"n": 1}, job=JOB.as_job(1))
    rounds: list[list[int]] = []
    relay = OutboxRelay(pool, bounded.database_url or "", client, broker, bounded.namespace,
                        on_round=lambda rows: rounds.append([r.id for r in rows]))
    key = stream_key(bounded.namespace, "test")
    try:
        for _ in range(4):
            assert await relay.publish_batch() == 0  # held: its job found no room
        assert await client.xlen(key) == 1
        assert rounds == [[held]] * 4  # each round reports the held row: the lag keeps growing
        row = await pool.fetchrow("SELECT published_at, event_published_at FROM outbox "
                                  "WHERE id = $1", held)
        assert row["published_at"] is None and row["event_published_at"] is not None
        assert await store.get(f"outbox-{held}-0") is None

        assert await store.remove(filler.job_id) == "removed"  # room at last
        assert await relay.publish_batch() == 1
        delivered = await store.get(f"outbox-{held}-0")
        assert delivered is not None and delivered["args"] == [1]
        assert await relay.publish_batch() == 0
        assert await client.xlen(key) == 1
    finally:
        broker.close()
        await client.aclose()
