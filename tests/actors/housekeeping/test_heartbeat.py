"""The cron heartbeat key and the health view /health reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from actors.housekeeping.heartbeat import beat
from runtime.scheduling import SchedulerStore, scheduler_health
from runtime.settings import Settings

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


async def test_heartbeat_key_expiry_and_staleness(settings: Settings) -> None:
    raw = aioredis.Redis.from_url(settings.redis_url or "")  # bytes, as ProcessContext's
    text = aioredis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    try:
        health = await scheduler_health(text, settings.namespace, NOW)
        assert not health.ok and "no cron heartbeat" in health.detail

        await beat(raw, settings.namespace, NOW, ttl_s=600)
        key = f"{settings.namespace}:cron:heartbeat"
        assert 590 <= await raw.ttl(key) <= 600
        assert await text.get(key) == NOW.isoformat()

        store = SchedulerStore(text, settings.namespace)
        assert await store.acquire_lease("sched-1", NOW + timedelta(seconds=55), 15)
        health = await scheduler_health(text, settings.namespace, NOW + timedelta(minutes=1))
        assert health.ok and health.leader == "sched-1" and health.heartbeat_age_s == 60
        assert health.as_json()["heartbeat_at"] == NOW.isoformat()

        # Eleven minutes later with no beat: stale (the key would also have expired).
        late = await scheduler_health(text, settings.namespace, NOW + timedelta(minutes=11))
        assert not late.ok and "last cron heartbeat 660s ago" in late.detail
        assert "no scheduler holds the lease" in late.detail
        # Works with a client that does not decode responses too.
        assert (await scheduler_health(raw, settings.namespace, NOW)).heartbeat_at == NOW
    finally:
        await raw.aclose()
        await text.aclose()


async def test_a_scheduler_that_just_started_is_not_stale_yet(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    try:
        store = SchedulerStore(client, settings.namespace)
        await store.acquire_lease("sched-1", NOW, 15)
        await store.init_cursor("cron-heartbeat", NOW)  # first sight by the scheduler
        soon = await scheduler_health(client, settings.namespace, NOW + timedelta(seconds=10))
        assert soon.ok and soon.heartbeat_at is None
        await store.acquire_lease("sched-1", NOW + timedelta(minutes=11), 15)
        later = await scheduler_health(client, settings.namespace, NOW + timedelta(minutes=11))
        assert not later.ok and "no cron heartbeat" in later.detail
    finally:
        await client.aclose()

