"""The queue feed: every queue's counts and throughput on the ``queues`` stream, live.

One api process at a time (a short lease in Redis) reads the counts every
``interval_s`` and appends an entry for each queue whose numbers changed to
``{namespace}:events:queues``, the notifier's ``queues`` channel: the
dashboard shows live counts from it without polling, and a client that
reconnects resumes from the stream like on any other channel. Throughput
(``processed_per_min``) is the change of the queue's completed + failed
totals over the last minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from runtime.jobs.store import JobStore, QueueCounts

log = logging.getLogger(__name__)

# How often the counts are read (the dashboard's refresh rate).
DEFAULT_FEED_INTERVAL_S = 1.0
# Throughput is measured over this window.
RATE_WINDOW_S = 60.0
# The queues stream keeps about this many entries (a few minutes of changes).
FEED_MAXLEN = 2_000
# Totals that count as "processed" for the throughput figure.
_PROCESSED = ("completed", "failed", "skipped", "cancelled", "dead")


def queues_stream(namespace: str) -> str:
    """The stream of the notifier's ``queues`` channel."""
    return f"{namespace}:events:queues"


class QueueFeed:
    """Publishes changed queue counts; run :meth:`run` as a task (an api's supervised child)."""

    def __init__(self, store: JobStore, redis: aioredis.Redis, namespace: str,
                 interval_s: float = DEFAULT_FEED_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._redis = redis
        self._stream = queues_stream(namespace)
        self._lease_key = f"{namespace}:queues-feed:lease"
        self._owner = uuid.uuid4().hex
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, dict[str, Any]] = {}
        self._history: dict[str, deque[tuple[float, int]]] = {}

    async def run(self) -> None:
        """Publish every ``interval_s`` while holding the lease; Redis errors wait a round."""
        while True:
            try:
                if await self._hold_lease():
                    await self.publish_once()
            except RedisError as exc:
                log.warning("queue feed could not reach Redis, will retry: %s", exc)
            await asyncio.sleep(self._interval_s)

    async def _hold_lease(self) -> bool:
        """Take or renew the publisher's lease (three intervals long); False if another holds it."""
        ttl_ms = int(self._interval_s * 3000)
        if await self._redis.set(self._lease_key, self._owner, nx=True, px=ttl_ms):
            return True
        holder = await self._redis.get(self._lease_key)
        if holder in (self._owner, self._owner.encode()):
            await self._redis.pexpire(self._lease_key, ttl_ms)
            return True
        return False

    async def publish_once(self) -> int:
        """Append an entry for every queue whose counts changed; return how many."""
        now = self._clock()
        counts = await self._store.counts()
        pipe = self._redis.pipeline(transaction=False)
        changed = 0
        for queue in counts:
            snapshot = self._snapshot(queue, now)
            if snapshot == self._last.get(queue.name):
                continue
            self._last[queue.name] = snapshot
            pipe.xadd(self._stream, {
                "id": "", "type": "queue.counts", "payload": json.dumps(snapshot),
                "correlation_id": "", "at": datetime.now(UTC).isoformat(),
            }, maxlen=FEED_MAXLEN, approximate=True)
            changed += 1
        if changed:
            await pipe.execute()
        return changed

    def _snapshot(self, queue: QueueCounts, now: float) -> dict[str, Any]:
        processed = sum(queue.totals.get(name, 0) for name in _PROCESSED)
        history = self._history.setdefault(queue.name, deque())
        history.append((now, processed))
        while len(history) > 1 and now - history[1][0] >= RATE_WINDOW_S:
            history.popleft()
        since, before = history[0]
        span_s = now - since
        rate = (processed - before) * 60.0 / span_s if span_s > 0 else 0.0
        return {**queue.as_json(), "processed_per_min": round(rate, 1)}
