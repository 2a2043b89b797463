"""Job history and control for operators: counts, lists, inspect, retry, remove, cancel, pause.

:class:`JobStore` works on an asyncio Redis client (the api process, the
``shopflow jobs`` command) and needs no Dramatiq broker: every change is one
call of the same ``jobs.lua`` the workers use, so it is atomic with respect
to them. Counts are one pipelined round trip of O(1) commands per queue,
cheap enough for a dashboard that polls every second.

States: ``waiting`` (in its queue, by priority), ``delayed`` (due later, or a
retry's backoff), ``active``, and the ended ``completed``, ``skipped``,
``failed`` (attempts used up, or a permanent error), ``cancelled``, ``dead``
(quarantined: it killed its worker too often). Ended jobs are kept per queue
up to keep-last-N; dead ones until the dead set is emptied.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
import redis.asyncio as aioredis

from runtime.errors import Conflict, NotFound, QueueFull, ValidationError
from runtime.jobs.broker import QueueBounds, Submitted, enqueue_args, submitted_from, with_ids
from runtime.jobs.hooks import JobEvent, JobHooks
from runtime.jobs.options import DEFAULT_KEEP_FAILED, check_options, delay_of
from runtime.jobs.script import AsyncJobScript, JobKeys, text

# States a job can be listed by.
JOB_STATES = ("waiting", "delayed", "active", "completed", "failed", "dead", "cancelled")
# Ended states kept in a per-queue index (skipped jobs sit with the completed ones).
_INDEXED = ("completed", "failed", "dead", "cancelled")
# The totals that count a job's end: jobs.lua counts each end once, under one of these
# ("removed": deleted before it ran), so with an idle queue their sum is the jobs sent.
ENDED_TOTALS = ("completed", "skipped", "failed", "dead", "cancelled", "removed")
# At most this many jobs per list call.
MAX_LIST = 500
# Record fields shown as numbers / as times.
_INT_FIELDS = ("attempt", "max_attempts", "priority", "deaths", "shared_deaths")
_TIME_FIELDS = {"created_ms": "created_at", "enqueued_ms": "enqueued_at",
                "started_ms": "started_at", "finished_ms": "finished_at", "run_at_ms": "run_at"}


@dataclass(frozen=True)
class QueueCounts:
    """One queue at one moment; ``totals`` are counts since the queue was first used.

    ``completed``, ``failed``, ``dead`` and ``cancelled`` are the jobs *kept* in
    each ended state now (keep-last-N, dead ones until emptied), not how many
    ever ended so: ``totals`` (and :attr:`sent`, :attr:`ended`) count those.
    """

    name: str
    waiting: int
    active: int
    delayed: int
    completed: int
    failed: int
    dead: int
    cancelled: int
    paused: bool
    totals: dict[str, int]

    @property
    def sent(self) -> int:
        """Jobs put in the queue since its first use (an operator's retry counts again)."""
        return self.totals.get("enqueued", 0)

    @property
    def ended(self) -> int:
        """Jobs that ended since the queue's first use; equals :attr:`sent` once it is idle."""
        return sum(self.totals.get(name, 0) for name in ENDED_TOTALS)

    def as_json(self) -> dict[str, Any]:
        """The HTTP/dashboard shape (``pending`` is the dashboard's name for waiting)."""
        return {"name": self.name, "waiting": self.waiting, "pending": self.waiting,
                "active": self.active, "delayed": self.delayed, "completed": self.completed,
                "failed": self.failed, "dead": self.dead, "cancelled": self.cancelled,
                "paused": self.paused, "totals": self.totals}


def _iso(ms: str | int | None) -> str | None:
    if ms in (None, "", "0", 0):
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat()


def job_view(record: dict[str, str], message_json: str | None = None) -> dict[str, Any]:
    """A job record as operators read it: typed fields, ISO times, its arguments."""
    view: dict[str, Any] = {"id": record.get("id"), "queue": record.get("queue"),
                            "actor": record.get("actor"), "state": record.get("state")}
    for name in _INT_FIELDS:
        if record.get(name) not in (None, ""):
            view[name] = int(record[name])
    for name, shown in _TIME_FIELDS.items():
        view[shown] = _iso(record.get(name))
    for name in ("error", "reason", "worker"):
        if record.get(name):
            view[name] = record[name]
    view["cancel_requested"] = record.get("cancel_requested") == "1"
    for name in ("progress", "result"):
        raw = record.get(name)
        if raw is not None:
            try:
                view[name] = json.loads(raw)
            except ValueError:
                view[name] = raw
    body = message_json or record.get("message")
    if body:
        try:
            message = json.loads(body)
            view["args"] = message.get("args", [])
            view["kwargs"] = message.get("kwargs", {})
            view["options"] = {k: v for k, v in (message.get("options") or {}).items()
                               if k not in ("redis_message_id", "traceback", "job_id_explicit")}
        except ValueError:
            pass
    return view


class JobStore:
    """The operator's view of every queue; all methods are coroutines on the caller's loop."""

    def __init__(self, client: aioredis.Redis, keys: JobKeys, queues: Sequence[str],
                 bounds: QueueBounds | None = None, hooks: JobHooks | None = None, *,
                 keep_failed: int = DEFAULT_KEEP_FAILED) -> None:
        self._redis = client
        # Cancelled jobs are kept per queue up to this many (a message's keep_failed wins).
        self._keep_failed = keep_failed
        self.keys = keys
        # Events of the changes made through this store, in this process (and their log
        # lines); pass the process broker's hooks to listen with the broker's listeners.
        self.hooks = hooks or JobHooks()
        self.queues = tuple(queues)
        self._bounds = bounds or QueueBounds()
        self._script = AsyncJobScript(client, keys)

    def _check_queue(self, queue: str) -> None:
        if queue not in self.queues:
            raise NotFound(f"no queue {queue!r}; queues: {', '.join(self.queues)}")

    # --- counts -----------------------------------------------------------------

    async def counts(self, queues: Sequence[str] | None = None) -> list[QueueCounts]:
        """Counts of every queue (or of ``queues``), in one round trip."""
        names = tuple(queues) if queues is not None else self.queues
        k = self.keys
        pipe = self._redis.pipeline(transaction=False)
        for q in names:
            pipe.llen(k.queue(q))
            pipe.zcard(k.queue(q, "hi"))
            pipe.zcard(k.queue(q, "lo"))
            pipe.zcard(k.queue(q, "delayed"))
            pipe.zcard(k.queue(q, "active"))
            for state in _INDEXED:
                pipe.zcard(k.queue(q, state))
            pipe.sismember(k.paused, q)
            pipe.hgetall(k.queue(q, "stats"))
        replies = await pipe.execute()
        out = []
        width = 11  # commands per queue above
        for i, q in enumerate(names):
            r = replies[i * width:(i + 1) * width]
            totals = {text(key): int(value) for key, value in r[10].items()}
            out.append(QueueCounts(q, waiting=int(r[0]) + int(r[1]) + int(r[2]),
                                   delayed=int(r[3]), active=int(r[4]), completed=int(r[5]),
                                   failed=int(r[6]), dead=int(r[7]), cancelled=int(r[8]),
                                   paused=bool(r[9]), totals=totals))
        return out

    # --- reading jobs -------------------------------------------------------------

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """One job with its arguments and its last events, or None."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.lrange(self.keys.history(job_id), 0, -1)
        raw, history = await pipe.execute()
        if not raw:
            return None
        record = {text(k): text(v) for k, v in raw.items()}
        body = None
        if record.get("state") in ("waiting", "delayed", "active") and record.get("rid"):
            body = text(await self._redis.hget(self.keys.queue(record["queue"], "msgs"),
                                               record["rid"]))
        view = job_view(record, body)
        view["history"] = [_history_entry(text(h)) for h in history]
        return view

    async def list_jobs(self, queue: str, state: str, limit: int = 50,
                        offset: int = 0) -> list[dict[str, Any]]:
        """Jobs of ``queue`` in ``state``: waiting in run order, ended ones newest first."""
        self._check_queue(queue)
        if state not in JOB_STATES:
            raise ValidationError(f"state must be one of {', '.join(JOB_STATES)}", field="state")
        limit = max(1, min(limit, MAX_LIST))
        if state in ("waiting", "delayed"):
            return await self._list_queued(queue, state, limit, offset)
        index = self.keys.queue(queue, state)
        if state == "active":
            ids = await self._redis.zrange(index, offset, offset + limit - 1)
        else:
            ids = await self._redis.zrevrange(index, offset, offset + limit - 1)
        return await self._views([text(i) for i in ids])

    async def _list_queued(self, queue: str, state: str, limit: int,
                           offset: int) -> list[dict[str, Any]]:
        k = self.keys
        if state == "delayed":
            rids = [text(r) for r in await self._redis.zrange(k.queue(queue, "delayed"), offset,
                                                              offset + limit - 1)]
        else:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrange(k.queue(queue, "hi"), 0, offset + limit - 1)
            pipe.lrange(k.queue(queue), 0, offset + limit - 1)
            pipe.zrange(k.queue(queue, "lo"), 0, offset + limit - 1)
            hi, plain, lo = await pipe.execute()
            rids = [text(r) for r in [*hi, *plain, *lo]][offset:offset + limit]
        if not rids:
            return []
        ids, bodies = [], []
        for body in await self._redis.hmget(k.queue(queue, "msgs"), rids):
            if body is None:
                continue  # started or removed since the ids were read
            try:
                message = json.loads(text(body))
            except ValueError:
                continue
            ids.append(str((message.get("options") or {}).get("job_id")
                           or message.get("message_id")))
            bodies.append(text(body))
        return await self._views(ids, bodies)

    async def _views(self, ids: list[str],
                     bodies: list[str] | None = None) -> list[dict[str, Any]]:
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        views = []
        for n, raw in enumerate(await pipe.execute()):
            if raw:
                record = {text(k): text(v) for k, v in raw.items()}
                views.append(job_view(record, bodies[n] if bodies else None))
        return views

    async def events_tail(self) -> str:
        """The id of the newest lifecycle event (``0`` if none).

        Taken before reading a job, it is where to follow the stream from so
        that no event between the read and the first XREAD is missed.
        """
        newest = await self._redis.xrevrange(self.keys.events, count=1)
        return text(newest[0][0]) if newest else "0"

    async def events(self, since: str = "$", block_ms: int = 1_000,
                     job_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Follow the lifecycle event stream (optionally of one job), forever."""
        last = since
        while True:
            reply: Any = await self._redis.xread({self.keys.events: last}, block=block_ms,
                                                 count=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = text(entry_id)
                    f = {text(k): text(v) for k, v in fields.items()}
                    try:
                        payload = json.loads(f.get("payload", "{}"))
                    except ValueError:
                        continue
                    if job_id is not None and payload.get("job_id") != job_id:
                        continue
                    yield {"stream_id": last, "type": f.get("type"), "at": f.get("at"),
                           **payload}

    # --- control ------------------------------------------------------------------

    async def retry(self, job_id: str) -> None:
        """Run a failed, dead or cancelled job again with fresh attempts."""
        raw = await self._redis.hget(self.keys.job(job_id), "message")
        if raw is None:
            state = await self._redis.hget(self.keys.job(job_id), "state")
            if state is None:
                raise NotFound(f"no job {job_id!r}")
            raise Conflict(f"job {job_id} is {text(state)}; only failed, dead or cancelled "
                           f"jobs can be retried")
        message = dramatiq.Message.decode(raw if isinstance(raw, bytes) else raw.encode())
        rid = str(uuid.uuid4())
        options = {k: v for k, v in message.options.items() if k not in ("retries", "traceback")}
        options["redis_message_id"] = rid
        fresh: dramatiq.Message[Any] = dramatiq.Message(queue_name=message.queue_name, actor_name=message.actor_name,
                                 args=message.args, kwargs=message.kwargs, options=options,
                                 message_id=message.message_id,
                                 message_timestamp=message.message_timestamp)
        reply = await self._script("retry", job_id, rid, fresh.encode())
        _raise_for(reply, job_id, "retried")

    async def remove(self, job_id: str) -> str:
        """Delete a job that is not running; ``requested`` if a worker holds it unstarted."""
        reply = await self._script("remove", job_id)
        if reply[0] == "active":
            raise Conflict(f"job {job_id} is running; cancel it first")
        _raise_for(reply, job_id, "removed")
        self._emit("removed", job_id, reply)
        return str(reply[0])

    async def cancel(self, job_id: str) -> str:
        """Cancel a waiting or delayed job now, or ask a running one to stop.

        Returns ``cancelled`` or ``requested`` (the worker sees the request at
        its next check, or when it would start the job: the request is kept
        in Redis, so it outlives worker restarts).
        """
        reply = await self._script("cancel", job_id, self._keep_failed)
        if reply[0] == "finished":
            raise Conflict(f"job {job_id} has already ended ({reply[1]})")
        _raise_for(reply, job_id, "cancelled")
        self._emit("cancelled" if reply[0] == "cancelled" else "cancel_requested", job_id, reply)
        return str(reply[0])

    def _emit(self, kind: str, job_id: str, reply: list[Any],
              detail: dict[str, Any] | None = None) -> None:
        """The in-process event of a change whose script reply names queue, actor and the
        state before (the same event is already on the Redis stream)."""
        if len(reply) < 3:
            return  # e.g. a remove only requested of the worker holding the job
        detail = dict(detail or {})
        if len(reply) > 3:
            detail["while_state"] = str(reply[3])
        self.hooks.emit(JobEvent(kind, job_id, str(reply[1]), str(reply[2]), detail=detail))

    async def pause(self, queue: str) -> bool:
        """Stop workers taking jobs of ``queue`` (producers may still send); True if it changed."""
        self._check_queue(queue)
        return bool(await self._script("pause", queue, "1"))

    async def resume(self, queue: str) -> bool:
        """Let workers take jobs of ``queue`` again; True if it changed."""
        self._check_queue(queue)
        return bool(await self._script("pause", queue, "0"))

    async def empty_dead(self, queue: str | None = None) -> int:
        """Delete every dead (quarantined) job of ``queue`` or of all queues; how many."""
        names = [queue] if queue is not None else list(self.queues)
        for name in names:
            self._check_queue(name)
        total = 0
        for name in names:
            total += int(await self._script("empty_dead", name))
        return total

    async def progress(self, job_id: str, value_json: str) -> None:
        """Record progress for a job (for producers outside a worker)."""
        reply = await self._script("progress", job_id, value_json)
        _raise_for(reply, job_id, "updated")
        self._emit("progress", job_id, reply, {"progress": json.loads(value_json)})

    async def send(self, queue: str, actor: str, args: Sequence[Any] = (),
                   options: dict[str, Any] | None = None) -> Submitted:
        """Enqueue a job from outside a worker (HTTP, the command line); options are checked.

        Never blocks on a full queue: QueueFull at once, for the caller to
        report (HTTP 503 with Retry-After).
        """
        self._check_queue(queue)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self.keys.actors, actor)
        pipe.hget(self.keys.actor_policies, actor)
        declared, policy_json = await pipe.execute()
        if declared is None:
            raise ValidationError(f"no worker has declared an actor {actor!r}", field="actor")
        if text(declared) != queue:
            raise ValidationError(f"actor {actor!r} consumes queue {text(declared)!r}, "
                                  f"not {queue!r}", field="queue")
        options = dict(options or {})
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=tuple(args),
                                   kwargs={}, options=check_options(options))
        delay_ms = delay_of(options)
        message = with_ids(message)
        eta_ms = int(datetime.now(UTC).timestamp() * 1000) + delay_ms if delay_ms else 0
        max_attempts = int(message.options.get("attempts", _attempts_of(policy_json)))
        reply = await self._script("enqueue", *enqueue_args(
            message, eta_ms, self._bounds.max_for(queue), max_attempts))
        submitted = submitted_from(reply, message)
        if submitted is None:
            raise QueueFull(f"queue {queue!r} is full ({reply[1]} jobs waiting); "
                            f"the job was not enqueued")
        return submitted


def _attempts_of(policy_json: Any) -> int:
    """The attempts in an actor's registered policy (what its workers resolved from its
    options and the settings); 0 (unknown) without one."""
    if policy_json is None:
        return 0
    try:
        return int(json.loads(text(policy_json))["attempts"])
    except (ValueError, KeyError, TypeError):
        return 0


def _history_entry(raw: str) -> dict[str, Any]:
    try:
        entry = json.loads(raw)
    except ValueError:
        return {"event": "unreadable"}
    entry["at"] = _iso(entry.get("at"))
    if entry.get("detail") == []:  # Lua's cjson writes an empty table as a list
        entry["detail"] = {}
    return dict(entry)


def _raise_for(reply: list[Any], job_id: str, done: str) -> None:
    kind = reply[0]
    if kind == "missing":
        raise NotFound(f"no job {job_id!r}")
    if kind == "not_retryable":
        raise Conflict(f"job {job_id} is {reply[1]}; only failed, dead or cancelled jobs can "
                       f"be retried")
    if kind not in ("ok", "enqueued", "removed", "cancelled", "requested"):
        raise Conflict(f"job {job_id} could not be {done}: {kind}")
