"""The transactional outbox and its relay.

A state change and the events and jobs it causes are written in ONE
PostgreSQL transaction (:func:`emit` inserts into ``outbox`` on the caller's
connection). After commit, the relay publishes each row to a Redis Stream per
channel (so late or reconnecting listeners resume from an id) and enqueues its
Dramatiq job, then marks the row published. A crash between commit and
publish loses nothing (the row is still unpublished); a rollback publishes
nothing (the row never existed). A crash after publishing but before marking
can publish a row twice: stream readers de-duplicate on the outbox ``id``
field and jobs are idempotent.

A row whose job a full queue refuses is held: its event is out (and marked
so, ``event_published_at``) but the row stays unpublished, and later rounds
retry only its job, so the event reaches the stream once however long the
queue stays full.

Only one relay publishes at a time (a transaction-scoped advisory lock), so
events leave in commit order per channel even with a relay in every api
process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import dramatiq
import redis.asyncio as aioredis

from runtime.broker import enqueue_job
from runtime.errors import QueueFull, ValidationError

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "shopflow_outbox"
# Arbitrary constant: the advisory lock that makes one relay publish at a time.
_RELAY_LOCK_KEY = 0x5F0F_0002
# Rows published per relay transaction.
RELAY_BATCH = 200
# A relayed job's id refuses a re-publication this long after the job ended: long enough
# for a relay that crashed between publishing and marking to come back, short enough that
# the ids of a busy shop (several per order) do not fill Redis.
RELAY_DEDUP_S = 600
# Each channel's stream keeps about this many events for resuming listeners.
STREAM_MAXLEN = 100_000


def stream_key(namespace: str, channel: str) -> str:
    """The Redis Stream that carries ``channel``'s events."""
    return f"{namespace}:events:{channel}"


async def emit(
    conn: asyncpg.Connection,
    channel: str,
    event_type: str,
    payload: dict[str, Any],
    job: dict[str, Any] | None = None,
    correlation_id: uuid.UUID | str | None = None,
) -> int:
    """Record an event (and optionally a job) in the caller's open transaction."""
    if not conn.is_in_transaction():
        raise RuntimeError("outbox.emit must run inside the transaction of the change it reports")
    row_id: int = await conn.fetchval(
        """INSERT INTO outbox (channel, event_type, payload, job, correlation_id)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        channel, event_type, payload, job,
        uuid.UUID(str(correlation_id)) if correlation_id else None,
    )
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return row_id


@dataclass(frozen=True)
class OutboxRow:
    """One committed, unpublished outbox row."""

    id: int
    channel: str
    event_type: str
    payload: dict[str, Any]
    job: dict[str, Any] | None
    correlation_id: uuid.UUID | None
    created_at: datetime
    # The event is on its stream already (the row was held for its job): do not XADD it again.
    event_published: bool = False


def stream_fields(row: OutboxRow) -> dict[str, str]:
    """The stream entry for a row: the contract every listener reads."""
    return {
        "id": str(row.id),
        "type": row.event_type,
        "payload": json.dumps(row.payload),
        "correlation_id": str(row.correlation_id or ""),
        "at": row.created_at.astimezone(UTC).isoformat(),
    }


class OutboxRelay:
    """Publishes committed outbox rows; runs as a task on the process's loop."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        database_url: str,
        redis: aioredis.Redis,
        broker: dramatiq.Broker,
        namespace: str,
        poll_s: float = 1.0,
        on_published: Callable[[list[OutboxRow]], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_round: Callable[[list[OutboxRow]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._database_url = database_url
        self._redis = redis
        self._broker = broker
        self._namespace = namespace
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._on_published = on_published
        # Told when a round publishes nothing: this relay has no lag to report (the outbox is
        # empty, or another process's relay holds the lock and reports its own).
        self._on_idle = on_idle
        # Told the rows each round handles: the oldest unpublished ones, held rows included, so
        # the outbox lag still grows while a full queue holds every row back.
        self._on_round = on_round
        # The last round found a full batch of new rows: more may wait, go again at once.
        self._fresh_full = False

    async def publish_batch(self) -> int:
        """Publish up to :data:`RELAY_BATCH` new rows; return how many rows were marked published.

        0 if another relay holds the lock. A row whose job a full queue refused
        is not marked published (nor counted), only its event is: later rounds
        retry its job (up to :data:`RELAY_BATCH` held rows each, before the new
        rows, so held rows never crowd new events out) and never XADD its event
        again.
        """
        self._fresh_full = False
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK_KEY):
                return self._idle()
            held_before = await self._fetch(conn, event_published=True)
            fresh = await self._fetch(conn, event_published=False)
            self._fresh_full = len(fresh) == RELAY_BATCH
            rows = held_before + fresh
            if not rows:
                return self._idle()
            if self._on_round:
                self._on_round(rows)
            rejected, held = await self._publish(rows)
            published = [r for r in rows if r.id not in held]
            await conn.execute(
                "UPDATE outbox SET event_published_at = now() WHERE id = ANY($1::bigint[])",
                [r.id for r in fresh],
            )
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                [r.id for r in published],
            )
            if rejected:
                await conn.executemany("UPDATE outbox SET publish_error = $2 WHERE id = $1",
                                       sorted(rejected.items()))
        if self._on_published and published:
            self._on_published(published)
        if held:
            log.warning("outbox: %d row(s) wait for room in a full queue; the next round "
                        "tries their jobs again", len(held), extra={"outbox_ids": sorted(held)})
        return len(published)

    async def _fetch(self, conn: asyncpg.Connection, event_published: bool) -> list[OutboxRow]:
        """Unpublished rows in commit order: held ones (event out, job waiting) or new ones."""
        records = await conn.fetch(
            """SELECT id, channel, event_type, payload, job, correlation_id, created_at,
                      event_published_at IS NOT NULL AS event_published
               FROM outbox
               WHERE published_at IS NULL AND (event_published_at IS NOT NULL) = $1
               ORDER BY id LIMIT $2""",
            event_published, RELAY_BATCH,
        )
        return [OutboxRow(**dict(r)) for r in records]

    def _idle(self) -> int:
        """A round that published nothing: tell ``on_idle``; 0 rows."""
        if self._on_idle:
            self._on_idle()
        return 0

    async def _publish(self, rows: list[OutboxRow]) -> tuple[dict[int, str], set[int]]:
        """XADD every row's event (unless it is out already) and enqueue its job.

        Returns the rows whose job was set aside (with the reason) and the rows
        whose job a full queue refused (left unpublished for the next round).
        """
        events = [row for row in rows if not row.event_published]
        if events:
            pipe = self._redis.pipeline(transaction=False)
            for row in events:
                pipe.xadd(stream_key(self._namespace, row.channel), stream_fields(row),  # type: ignore[arg-type]
                          maxlen=STREAM_MAXLEN, approximate=True)
            await pipe.execute()
        jobs = [(row.id, 0, _with_correlation(row.job, row.correlation_id))
                for row in rows if row.job]
        if not jobs:
            return {}, set()
        return await asyncio.to_thread(self._enqueue_all, jobs)

    def _enqueue_all(self, jobs: list[tuple[int, int, dict[str, Any]]]
                     ) -> tuple[dict[int, str], set[int]]:
        """Enqueue each row's job under an id derived from the row, never blocking.

        A row published twice (a crash after publishing, before marking) finds
        its job already there. A full queue raises QueueFull: that row is held
        (left unpublished with its event marked out, so a later round
        enqueues its job once there is room) and the rows behind it go on, so one full queue does not stall
        every event and job of the batch. A job that can never be enqueued
        (ValidationError) is set aside and returned with the reason, so one
        bad row cannot hold up every event behind it.
        """
        rejected: dict[int, str] = {}
        held: set[int] = set()
        for row_id, n, job in jobs:
            try:
                enqueue_job(self._broker, job, job_id=f"outbox-{row_id}-{n}", block=False,
                            dedup_s=RELAY_DEDUP_S)
            except QueueFull:
                held.add(row_id)
            except ValidationError as exc:
                log.error("outbox row %d: its job was set aside, it can never be enqueued: %s",
                          row_id, exc, extra={"outbox_id": row_id, "job": job})
                rejected[row_id] = str(exc)
        return rejected, held

    def stop(self) -> None:
        """Make :meth:`run` return after the round in progress (call on the relay's loop).

        The owner may still cancel the task to cut a round short; the flag makes
        the relay stop even where a library swallows that cancel (on Python 3.11
        ``asyncio.wait_for``, which database drivers use inside, can).
        """
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Relay until :meth:`stop`: wake on NOTIFY, poll as a safety net, back off on errors."""
        listener: asyncpg.Connection | None = None
        try:
            while not self._stopping:
                if listener is None or listener.is_closed():
                    listener = await self._listen()  # (re)connect after a PostgreSQL restart
                try:
                    await self.publish_batch()
                    while self._fresh_full:
                        await self.publish_batch()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, aioredis.RedisError,
                        QueueFull) as exc:
                    log.warning("outbox relay could not publish, will retry: %s", exc)
                if not self._stopping:
                    await self._wait_for_wake()
        finally:
            if listener is not None and not listener.is_closed():
                await listener.close()

    async def _wait_for_wake(self) -> None:
        """Sleep until a NOTIFY wakes the relay or the safety-net poll interval passes.

        ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11, a cancel
        arriving in the loop turn where the wake-up completes is swallowed by
        ``wait_for``, and a cancelled relay would go on polling.
        """
        try:
            async with asyncio.timeout(self._poll_s):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(self._database_url)
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
            return conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("outbox relay runs without LISTEN (polling only) for now: %s", exc)
            return None


def _with_correlation(job: dict[str, Any], correlation_id: uuid.UUID | None) -> dict[str, Any]:
    """The row's correlation id rides on its job, so the job's log lines carry it too."""
    if correlation_id is None or not isinstance(job, dict):
        return job
    options = job.get("options")
    if options is not None and not isinstance(options, dict):
        return job  # malformed: enqueue_job sets it aside with the reason
    return {**job, "options": {"correlation_id": str(correlation_id), **(options or {})}}


def now_utc() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
