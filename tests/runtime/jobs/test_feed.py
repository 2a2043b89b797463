"""The queue feed puts changed counts on the ``queues`` stream, from one publisher at a time."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from runtime.broker import QUEUE_EMAILS, JobSpec
from runtime.jobs.broker import JobBroker
from runtime.jobs.feed import QueueFeed, queues_stream
from runtime.jobs.store import JobStore
from runtime.settings import Settings

SEND = JobSpec(QUEUE_EMAILS, "feed_test_send")


async def test_changed_counts_are_published_once_and_by_one_feed(
        settings: Settings, broker: JobBroker, store: JobStore) -> None:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    now = [1000.0]
    feed = QueueFeed(store, client, settings.namespace, clock=lambda: now[0])
    other = QueueFeed(store, client, settings.namespace)
    try:
        assert await feed._hold_lease() and not await other._hold_lease()
        first = await feed.publish_once()
        assert first == len(store.queues)  # every queue is new to the feed
        assert await feed.publish_once() == 0  # nothing changed
        for n in range(3):
            SEND.send(broker, n)
        now[0] += 1
        assert await feed.publish_once() == 1
        entries = await client.xrange(queues_stream(settings.namespace))
        last = json.loads(entries[-1][1][b"payload"])
        assert (entries[-1][1][b"id"], last["name"], last["waiting"], last["pending"]) == (
            b"", "emails", 3, 3)
        assert entries[-1][1][b"type"] == b"queue.counts"
    finally:
        await client.aclose()
