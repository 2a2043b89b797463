"""Read a queue's state straight from the job store's Redis keys.

The layout (see runtime/jobs/jobs.lua), under the broker namespace
``{namespace}-jobs``:

- ``:{queue}``, ``:{queue}.hi``, ``:{queue}.lo``: waiting message ids (priority 0, >0, <0);
- ``:{queue}.msgs``: hash id -> message JSON (waiting, delayed and fetched);
- ``:{queue}.delayed``: delayed jobs and retries by due time;
- ``:{queue}.active``, ``.failed``, ``.dead``: job ids by state;
- ``:job:{id}``: the job's record (``run_at_ms``: when it became due);
- ``:__heartbeats__``: sorted set broker id -> last heartbeat (ms);
- ``:__acks__.{broker id}.{queue}``: ids a broker fetched and has not finished.

Heartbeats come from producers as well as workers, so which queues a live
worker consumes is read from the registry the metrics middleware keeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from runtime.metrics import OUTCOME_FAILED
from runtime.metrics_middleware import (
    OUTCOME_BUCKET_S,
    OUTCOME_RETRIED,
    consumers_key,
    outcomes_key,
)
from runtime.settings import Settings


@dataclass(frozen=True)
class QueueStats:
    """One queue at one moment. Ages in seconds; None when nothing waits."""

    queue: str
    waiting: int
    active: int
    delayed: int
    failed: int
    oldest_waiting_age_s: float | None
    consumers: int
    stalled: int
    attempts_in_window: int
    failures_in_window: int

    @property
    def failure_ratio(self) -> float | None:
        """Failed share of the window's attempts; None without attempts."""
        if not self.attempts_in_window:
            return None
        return self.failures_in_window / self.attempts_in_window


@dataclass(frozen=True)
class Workers:
    """Who is alive and what they hold, read once per check for every queue."""

    live: frozenset[str]
    consumes: dict[str, frozenset[str]] = field(default_factory=dict)
    # (broker id, queue name as in the ack key) -> number of unacked ids
    acks: dict[tuple[str, str], int] = field(default_factory=dict)

    def consumers_of(self, queue: str) -> int:
        """Live brokers that registered for the queue or hold its messages right now."""
        registered = {b for b, queues in self.consumes.items() if queue in queues}
        holding = {b for (b, q), n in self.acks.items() if q.removesuffix(".DQ") == queue and n}
        return len((registered | holding) & self.live)

    def held(self, queue: str, alive: bool) -> int:
        """Messages of ``queue`` fetched and unacked by live (or dead) brokers."""
        return sum(n for (b, q), n in self.acks.items() if q == queue and (b in self.live) == alive)


class QueueReader:
    """Reads :class:`QueueStats` for queues of one namespace (one event loop)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = redis
        self._ns = f"{settings.namespace}-jobs"

    async def workers(self, now_ms: int) -> Workers:
        """Live brokers, the queues they consume and their unacked messages.

        Also forgets registry entries of brokers that stopped heartbeating.
        """
        timeout_ms = self._settings.broker_heartbeat_timeout_ms
        members: list[Any] = await self._redis.zrangebyscore(
            f"{self._ns}:__heartbeats__", now_ms - timeout_ms, "+inf")
        live = {_text(b) for b in members}
        registry = await self._redis.hgetall(consumers_key(self._settings.namespace))
        consumes: dict[str, frozenset[str]] = {}
        gone = []
        for broker_id, raw in registry.items():
            record = json.loads(raw)
            bid = _text(broker_id)
            if bid not in live and now_ms - int(record.get("at_ms", 0)) > timeout_ms:
                gone.append(bid)
            consumes[bid] = frozenset(record.get("queues", ()))
        if gone:
            await self._redis.hdel(consumers_key(self._settings.namespace), *gone)
        return Workers(frozenset(live), consumes, await self._acks())

    async def _acks(self) -> dict[tuple[str, str], int]:
        prefix = f"{self._ns}:__acks__."
        keys = [_text(k) async for k in self._redis.scan_iter(match=prefix + "*", count=500)]
        if not keys:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.scard(key)
            sizes = await pipe.execute()
        out: dict[tuple[str, str], int] = {}
        for key, size in zip(keys, sizes):
            broker_id, _, queue = key[len(prefix):].partition(".")
            out[(broker_id, queue)] = int(size)
        return out

    async def read(self, queue: str, workers: Workers, now_ms: int) -> QueueStats:
        """The state of ``queue`` now (one transaction for the counts, so they agree)."""
        q = f"{self._ns}:{queue}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.llen(q)
            pipe.zcard(f"{q}.hi")
            pipe.zcard(f"{q}.lo")
            pipe.zcard(f"{q}.delayed")
            pipe.zcard(f"{q}.failed")
            pipe.zcard(f"{q}.dead")
            pipe.zcard(f"{q}.active")
            pipe.lindex(q, 0)
            pipe.zrange(f"{q}.hi", 0, 0)
            pipe.zrange(f"{q}.lo", 0, 0)
            plain, hi, lo, delayed, failed, dead, active, head, hi_head, lo_head = \
                await pipe.execute()
        heads = [h for h in (head, *hi_head, *lo_head) if h is not None]
        attempts, failures = await self._outcomes(queue, now_ms // 1000)
        return QueueStats(
            queue=queue, waiting=int(plain) + int(hi) + int(lo), active=int(active),
            delayed=int(delayed), failed=int(failed) + int(dead),
            oldest_waiting_age_s=await self._age_s(q, heads, now_ms),
            consumers=workers.consumers_of(queue), stalled=workers.held(queue, alive=False),
            attempts_in_window=attempts, failures_in_window=failures,
        )

    async def _age_s(self, q: str, head_ids: list[Any], now_ms: int) -> float | None:
        """How long the longest-waiting head job has been due (enqueued, or its retry due)."""
        if not head_ids:
            return None
        bodies = await self._redis.hmget(f"{q}.msgs", head_ids)
        job_ids = []
        for raw in bodies:
            if raw is None:
                continue  # fetched between the two reads: not waiting any more
            message = json.loads(raw)
            job_ids.append(str(message.get("options", {}).get("job_id")
                               or message.get("message_id")))
        if not job_ids:
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(f"{self._ns}:job:{job_id}", "run_at_ms")
            due = [int(d) for d in await pipe.execute() if d is not None]
        if not due:
            return None
        return max(0.0, (now_ms - min(due)) / 1000)

    async def _outcomes(self, queue: str, now_s: int) -> tuple[int, int]:
        """(attempts, failed attempts) in the failure-rate window, from the minute buckets."""
        window_s = self._settings.monitor_failure_rate_window_s
        buckets = range((now_s - window_s) // OUTCOME_BUCKET_S + 1, now_s // OUTCOME_BUCKET_S + 1)
        async with self._redis.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hgetall(outcomes_key(self._settings.namespace, queue, bucket))
            counts = await pipe.execute()
        attempts = failures = 0
        for bucket_counts in counts:
            for outcome, n in bucket_counts.items():
                attempts += int(n)
                if _text(outcome) in (OUTCOME_FAILED, OUTCOME_RETRIED):
                    failures += int(n)
        return attempts, failures


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def known_queues(declared: Iterable[str]) -> list[str]:
    """Canonical queue names (no delay queues), sorted."""
    return sorted({q.removesuffix(".DQ") for q in declared})
