"""Dramatiq's Redis broker with the job store underneath: priorities, delays, bounds, wake-ups.

:class:`JobBroker` keeps Dramatiq's Redis layout (so Dramatiq tooling and
producers in other languages that follow it keep working) and changes what
Dramatiq cannot do from the outside:

- **enqueue** is one call of ``jobs.lua``: it de-duplicates by ``job_id``,
  refuses a message when the queue is at its bound (the producer then waits
  or gets :class:`~runtime.errors.QueueFull`), places the message by
  priority, parks a delayed one in a sorted set in Redis (not in a worker's
  memory, so a 24-hour delay survives every restart), writes the job's record
  and its ``waiting`` event, and wakes one idle consumer;
- the **consumer** fetches high-priority messages first, moves due delayed
  ones in, prefetches no more than the worker's threads (so a high-priority
  job starts as soon as a slot frees, not after a prefetched backlog), and
  blocks on a wake-up list instead of polling with a growing back-off;
- **ack and nack** finish the job in the same script call: the outcome the
  :class:`~runtime.jobs.middleware.JobsMiddleware` decided (completed, retry
  with its delay, failed, cancelled...) and the removal of the message are
  one atomic step, so a crash can neither lose a retry nor run one twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import redis
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Middleware

from runtime.errors import QueueFull
from runtime.jobs.hooks import JobEvent, JobHooks
from runtime.jobs.options import (
    DEFAULT_DEDUP_S,
    DEFAULT_KEEP_COMPLETED,
    DEFAULT_KEEP_FAILED,
    JOB_OPTIONS,
    RetryPolicy,
    check_options,
    delay_of,
)
from runtime.jobs.outcome import (
    Outcome,
    Tally,
    peek_outcome,
    peek_tally,
    take_outcome,
    take_tally,
)
from runtime.jobs.script import JobKeys, JobScript, events_stream

log = logging.getLogger(__name__)

# A producer waiting for room in a full queue checks again after this long at first...
FULL_QUEUE_FIRST_WAIT_S = 0.005
# ...doubling up to this.
FULL_QUEUE_MAX_WAIT_S = 0.2
# An idle consumer blocks this long on its wake-up list before looking again.
DEFAULT_IDLE_TIMEOUT_MS = 1_000
# ...but at most this share of its connection's socket timeout (a blocking read must end first).
SOCKET_TIMEOUT_SHARE = 0.8


@dataclass(frozen=True)
class QueueBounds:
    """How long each queue may grow (waiting + delayed) and what a producer does then."""

    default_max: int = 0  # 0: unbounded
    per_queue: Mapping[str, int] = field(default_factory=dict)
    policy: str = "block"  # "block": wait up to timeout_s for room; "fail": QueueFull at once
    timeout_s: float = 5.0

    def max_for(self, queue: str) -> int:
        """The bound of ``queue``; 0 means none."""
        return int(self.per_queue.get(queue, self.default_max))


@dataclass(frozen=True)
class JobConfig:
    """Everything the job layer is told by settings; see runtime.settings for the defaults."""

    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=3))
    infra_retries: int = 25
    keep_completed: int = DEFAULT_KEEP_COMPLETED
    keep_failed: int = DEFAULT_KEEP_FAILED
    dedup_s: int = DEFAULT_DEDUP_S
    bounds: QueueBounds = field(default_factory=QueueBounds)
    poison_deaths: int = 3
    heartbeat_timeout_ms: int = 30_000
    sweep_interval_s: float = 5.0
    limit_wait_ms: int = 1_000
    idle_timeout_ms: int = DEFAULT_IDLE_TIMEOUT_MS


@dataclass(frozen=True)
class Submitted:
    """What a send did: enqueued a new job, or found the one with the same ``job_id``."""

    job_id: str
    state: str
    duplicate: bool
    message: dramatiq.Message[Any]

    @property
    def message_id(self) -> str:
        """The Dramatiq message id of what was sent (the same across retries)."""
        return str(self.message.message_id)


def enqueue_args(message: dramatiq.Message[Any], eta_ms: int, max_len: int,
                 max_attempts: int) -> list[Any]:
    """The ``enqueue`` command's arguments for a message that already has its ids."""
    options = message.options
    return [
        message.queue_name, options["redis_message_id"], options["job_id"], message.actor_name,
        message.encode(), int(options.get("priority", 0)), eta_ms, max_len,
        "1" if options.get("job_id_explicit") else "0", max_attempts,
    ]


def with_ids(message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
    """A copy with a fresh Redis message id and its job id (given, or the message id).

    Only a producer's own ``job_id`` de-duplicates. A message sent before (it
    has a Redis id) keeps what it was: the job id this function gave it is not
    the producer's, so sending that message again is a new run, not a
    duplicate of its own record.
    """
    options: dict[str, Any] = {"redis_message_id": str(uuid.uuid4())}
    if "job_id" not in message.options:
        options["job_id"] = message.message_id
    elif "redis_message_id" not in message.options:
        options["job_id_explicit"] = True
    return message.copy(options=options)


def submitted_from(reply: list[Any], message: dramatiq.Message[Any]) -> Submitted | None:
    """Read the ``enqueue`` reply; None means the queue was full."""
    if reply[0] == "full":
        return None
    job_id = str(message.options["job_id"])
    return Submitted(job_id, str(reply[1]), reply[0] == "duplicate", message)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class HeldMessages:
    """The message ids this process has fetched and not yet let go, by queue (any thread).

    Redis keeps the same set per worker (its acks). They differ only when a
    reply was lost on the way (Redis restarting mid-fetch): Redis then lists a
    message as ours that no thread of ours will ever run. The keeper finds
    those orphans by comparing the two and hands them back.
    """

    def __init__(self) -> None:
        self._ids: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, queue: str, rids: Iterable[str]) -> None:
        with self._lock:
            self._ids.setdefault(queue, set()).update(rids)

    def discard(self, queue: str, rids: Iterable[str]) -> None:
        with self._lock:
            self._ids.get(queue, set()).difference_update(rids)

    def snapshot(self, queue: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._ids.get(queue, ()))


# The in-process event each recorded outcome causes (requeue and ack cause none).
_EVENT_OF = {"completed": "completed", "skipped": "skipped", "failed": "failed",
             "cancelled": "cancelled", "retry": "retrying"}


class JobBroker(RedisBroker):
    """A Redis broker whose messages are jobs with records, priorities, bounds and limits."""

    def __init__(self, *, url: str, namespace: str, events_key: str | None = None,
                 config: JobConfig | None = None,
                 middleware: list[Middleware] | None = None) -> None:
        self.config = config or JobConfig()
        super().__init__(url=url, namespace=namespace, middleware=middleware,  # type: ignore[no-untyped-call]
                         heartbeat_timeout=self.config.heartbeat_timeout_ms,
                         maintenance_chance=0)  # the keeper's sweep replaces Dramatiq's
        self.keys = JobKeys(namespace, events_key or events_stream(namespace))
        self.jobs = JobScript(self.client, self.keys)
        self.hooks = JobHooks()
        self.held = HeldMessages()
        self._process_booted = False

    def boot_process(self) -> None:
        """Emit Dramatiq's ``process_boot`` once for this broker (idempotent; main thread).

        Dramatiq's own CLI emits it; our worker processes do not run that CLI.
        Without it TimeLimit never starts its watchdog thread, and neither a
        job's ``timeout_ms`` nor the default time limit ever interrupts a job.
        """
        if not self._process_booted:
            self._process_booted = True
            self.emit_after("process_boot")

    @property
    def consumer_class(self) -> type[JobConsumer]:
        return JobConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        """A consumer of ``queue_name`` (Dramatiq's delay queues are not used)."""
        return JobConsumer(self, queue_name, prefetch, self.config.idle_timeout_ms)

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue; no ``.DQ`` twin: delayed jobs wait in Redis, not in workers."""
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def flush(self, queue_name: str) -> None:
        """Drop every waiting and delayed job of a queue (and their records)."""
        self.jobs("purge", queue_name)

    def max_attempts(self, message: dramatiq.Message[Any]) -> int:
        """How many attempts this message gets (its options, its actor's, the default)."""
        actor = self.actors.get(message.actor_name)
        policy = self.config.retry.with_options(actor.options if actor else {})
        return policy.with_options(message.options).attempts

    def enqueue(self, message: dramatiq.Message[Any], *,
                delay: int | None = None) -> dramatiq.Message[Any]:
        """Dramatiq's enqueue: submit and return the message as sent."""
        return self.submit(message, delay_ms=delay).message

    def submit(self, message: dramatiq.Message[Any], delay_ms: int | None = None,
               block: bool | None = None) -> Submitted:
        """Enqueue ``message`` as a job; see the module docstring for what that does.

        ``block`` overrides the bounds' policy for this call (the outbox relay
        never blocks: a full queue leaves its row for the next round).
        Raises QueueFull when the queue stays at its bound.
        """
        message, delay_ms = self.checked(message, delay_ms)
        message = with_ids(message)
        queue = message.queue_name
        eta_ms = int(time.time() * 1000) + delay_ms if delay_ms else 0
        args = enqueue_args(message, eta_ms, self.config.bounds.max_for(queue),
                            self.max_attempts(message))
        self.emit_before("enqueue", message, delay_ms)
        submitted = self._submit_within_bounds(args, message, block)
        self.emit_after("enqueue", message, delay_ms)
        if not submitted.duplicate:
            self.hooks.emit(JobEvent(submitted.state, submitted.job_id, queue,
                                     message.actor_name, args=tuple(message.args)))
        return submitted

    def checked(self, message: dramatiq.Message[Any],
                delay_ms: int | None) -> tuple[dramatiq.Message[Any], int | None]:
        """``message`` with its options checked (runtime.jobs.options), and its delay.

        Every way of building a message ends here: ``JobSpec.message`` checked them
        already, but Dramatiq's own ``actor.send_with_options(...)`` and
        ``message_with_options`` did not, so a misspelled option raises
        ValidationError here instead of being carried along unnoticed. Options a
        middleware on this broker owns (``max_age``, ``on_success``...) pass as they are;
        ``timeout_ms`` becomes ``time_limit`` and ``delay_ms`` the delay, as on a spec.
        Dramatiq's ``eta`` (what its own ``enqueue(delay=...)`` and its worker's delay
        queue put on a message) becomes the delay too and leaves the message: a message
        stored with an eta would be parked in a worker's memory by Dramatiq.
        """
        owned = self.actor_options - JOB_OPTIONS - {"eta"}
        own = {k: v for k, v in message.options.items() if k not in owned}
        checked = check_options(own)
        if delay_ms is None:
            delay_ms = delay_of(own)
        if message.queue_name.endswith(".DQ"):
            # Dramatiq's name of a queue's delay queue: the delay is ours, the queue the job's.
            message = dataclasses.replace(message, queue_name=q_name(message.queue_name))
        if checked == own:
            return message, delay_ms
        kept = {k: v for k, v in message.options.items() if k in owned}
        return dataclasses.replace(message, options={**kept, **checked}), delay_ms

    def _submit_within_bounds(self, args: list[Any], message: dramatiq.Message[Any],
                              block: bool | None) -> Submitted:
        bounds = self.config.bounds
        blocking = bounds.policy == "block" if block is None else block
        deadline = time.monotonic() + bounds.timeout_s
        wait_s = FULL_QUEUE_FIRST_WAIT_S
        while True:
            reply = self.jobs("enqueue", *args)
            submitted = submitted_from(reply, message)
            if submitted is not None:
                return submitted
            left_s = deadline - time.monotonic()
            if not blocking or left_s <= 0:
                raise QueueFull(
                    f"queue {message.queue_name!r} is full ({reply[1]} jobs waiting, bound "
                    f"{bounds.max_for(message.queue_name)}); the job was not enqueued")
            time.sleep(min(wait_s, left_s))
            wait_s = min(wait_s * 2, FULL_QUEUE_MAX_WAIT_S)

    def reject_garbage(self, queue: str, rid: str) -> None:
        """Record a message body nobody can read as a failed job (its id is the Redis id)."""
        self.jobs("finish", queue, rid, rid, "", self.broker_id, "failed",
                  json.dumps({"error": "the message body is not a Dramatiq message"}),
                  self.config.keep_failed, 0, "[]", "", "", 0, 0)

    def finish(self, queue: str, message: MessageProxy, outcome: Outcome,
               tally: Tally | None = None) -> None:
        """Record ``outcome`` and let go of the message, in one step (consumer side).

        ``tally`` (see :class:`~runtime.jobs.outcome.Tally`) is counted in the same step,
        once, unless another worker had taken the job over.
        """
        job_id = str(message.options.get("job_id") or message.message_id)
        rid = str(message.options["redis_message_id"])
        actor = self.actors.get(message.actor_name)
        # The message's options win over its actor's, as everywhere.
        options = {**(actor.options if actor is not None else {}), **message.options}
        keep = self.config.keep_completed if outcome.kind in ("completed", "skipped") else \
            self.config.keep_failed
        keep = int(options.get(
            "keep_completed" if outcome.kind in ("completed", "skipped") else "keep_failed", keep))
        reply = self.jobs(
            "finish", queue, rid, job_id, message.actor_name, self.broker_id, outcome.kind,
            json.dumps(outcome.detail, default=str), keep,
            int(options.get("dedup_s", self.config.dedup_s)),
            json.dumps(list(outcome.limit_keys)) if outcome.limit_keys else "[]",
            outcome.new_rid, outcome.new_message, outcome.eta_ms, outcome.priority,
            *((tally.key, tally.field, tally.ttl_s) if tally is not None else ()),
        )
        if reply and reply[0] == "lost" and outcome.kind == "ack":
            log.info("job %s: let go of a copy the stall sweep had already taken back", job_id,
                     extra={"job_id": job_id, "queue": queue})
            return
        if reply and reply[0] == "lost":
            log.warning("job %s finished (%s) after another worker had taken it over; "
                        "that run owns its record", job_id, outcome.kind,
                        extra={"job_id": job_id, "queue": queue})
            return
        event = _EVENT_OF.get(outcome.kind)
        if event is not None:
            # After the record changed, so a listener that reads the store sees the outcome.
            self.hooks.emit(JobEvent(event, job_id, queue, message.actor_name,
                                     int(message.options.get("retries", 0)) + 1,
                                     dict(outcome.detail), tuple(message.args)))


class JobConsumer(Consumer):
    """Fetches a queue's jobs for one Dramatiq consumer thread.

    Not thread-safe (Dramatiq's rule for consumers), except :meth:`ack` and
    :meth:`nack`, which worker threads call and which only touch a set under
    a lock and an event.
    """

    def __init__(self, broker: JobBroker, queue_name: str, prefetch: int,
                 idle_timeout_ms: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.idle_timeout_s = idle_timeout_ms / 1000
        self.message_cache: list[tuple[str, bytes]] = []
        self._outstanding: set[str] = set()
        self._lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._wake_key = broker.keys.queue(queue_name, "wake")
        # Set (to the fetch's next due time) when the last fetch got fewer jobs than it had
        # room for, i.e. it emptied the queue: the next look waits for a wake-up instead.
        self._drained_next_due: str | None = None

    @property
    def outstanding_message_count(self) -> int:
        """Messages fetched and not yet finished (cached or running)."""
        with self._lock:
            return len(self._outstanding) + len(self.message_cache)

    def _done(self, message: MessageProxy) -> None:
        with self._lock:
            self._outstanding.discard(message.message_id)
        self._slot_freed.set()

    def ack(self, message: MessageProxy) -> None:
        """Finish a job that did not fail for good (worker thread)."""
        self._finish(message, peek_outcome(message) or Outcome("ack"))

    def nack(self, message: MessageProxy) -> None:
        """Finish a job that failed for good (worker thread)."""
        outcome = peek_outcome(message)
        if outcome is None or outcome.kind != "failed":
            exc = getattr(message, "_exception", None)
            outcome = Outcome("failed", {"error": f"{type(exc).__name__}: {exc}" if exc
                                         else "rejected"})
        self._finish(message, outcome)

    def _finish(self, message: MessageProxy, outcome: Outcome) -> None:
        """Record the outcome; on a Redis error keep it, for Dramatiq retries the ack.

        The outcome stays on the message until the finish went through: Dramatiq
        calls ack again after a connection error, and that call must record the
        same outcome, not a bare "let go".
        """
        try:
            self.broker.finish(self.queue_name, message, outcome, peek_tally(message))
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        take_outcome(message)
        take_tally(message)
        self.broker.held.discard(self.queue_name, [str(message.options["redis_message_id"])])
        self._done(message)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Hand fetched-but-unstarted messages back to the head of the queue (shutdown)."""
        rids = [str(m.options["redis_message_id"]) for m in messages]
        self._requeue_rids(rids)

    def _requeue_rids(self, rids: list[str]) -> None:
        if not rids:
            return
        try:
            self.broker.jobs("requeue", self.queue_name, self.broker.broker_id, *rids)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        self.broker.held.discard(self.queue_name, rids)

    def close(self) -> None:
        """Give back what was fetched but never handed to a worker thread.

        If Redis is away the ids stay held in Redis but not here: the keeper
        hands them back as orphans once Redis answers.
        """
        cached, self.message_cache = self.message_cache, []
        rids = [rid for rid, _ in cached]
        try:
            self._requeue_rids(rids)
        finally:
            self.broker.held.discard(self.queue_name, rids)

    def __next__(self) -> MessageProxy | None:
        """The next message, or None after waiting up to the idle timeout."""
        try:
            if self.message_cache:
                return self._next_cached()
            if self._drained_next_due is not None:
                # The last fetch emptied the queue, so fetching again now would come back
                # empty: one round trip per job at a steady rate. Every enqueue pushes a
                # wake-up token, so waiting for one misses nothing.
                next_due, self._drained_next_due = self._drained_next_due, None
                self._wait_for_work(next_due)
                return None
            room = self.prefetch - self.outstanding_message_count
            if room <= 0:
                self._slot_freed.wait(self.idle_timeout_s)
                self._slot_freed.clear()
                return None
            reply = self.broker.jobs.raw("fetch", self.queue_name, self.broker.broker_id, room)
            pairs = reply[1:]
            self.message_cache = [(_text(pairs[i]), pairs[i + 1].encode()
                                   if isinstance(pairs[i + 1], str) else pairs[i + 1])
                                  for i in range(0, len(pairs) - 1, 2)]
            next_due = _text(reply[0])
            if not self.message_cache:
                self._wait_for_work(next_due)
                return None
            self.broker.held.add(self.queue_name, [rid for rid, _ in self.message_cache])
            if len(self.message_cache) < room:
                self._drained_next_due = next_due
            return self._next_cached()
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _next_cached(self) -> MessageProxy | None:
        rid, data = self.message_cache.pop(0)
        try:
            message = dramatiq.Message.decode(data)
        except Exception:  # noqa: BLE001 - garbage from an outside producer must not stop the queue
            log.error("an undecodable message on queue %s was set aside as failed: %r",
                      self.queue_name, data[:200])
            self.broker.reject_garbage(self.queue_name, rid)
            self.broker.held.discard(self.queue_name, [rid])
            return None
        runnable = self._arrived(rid, message)
        if runnable is None:
            return None
        with self._lock:
            self._outstanding.add(runnable.message_id)
        return MessageProxy(runnable)

    def _arrived(self, rid: str, message: dramatiq.Message[Any]) -> dramatiq.Message[Any] | None:
        """The fetched message as the worker runs it, or None if it was parked until its eta.

        Messages from outside producers may follow Dramatiq's own delay convention:
        written to ``Q.DQ`` (the fetch moved them here, by due time) and carrying
        ``options.eta``. Left so, Dramatiq's worker would park the message in its
        memory and send it again later, which the job's de-duplication refuses:
        the job would be lost. So the eta leaves the message here; one not yet due
        goes back to the delayed set in Redis until it is.
        """
        if message.queue_name != self.queue_name:
            message = message.copy(queue_name=self.queue_name)  # Q.DQ: it runs on Q
        if message.options.get("redis_message_id") != rid:
            # The key it was fetched by is what start, finish and ack name it by. A producer
            # in another language may leave the option out (or get it wrong): without this
            # the job would run unrecorded, its ack would fail, and every restart would
            # hand it back to run again.
            message = message.copy(options={"redis_message_id": rid})
        if "eta" not in message.options:
            return message
        eta = message.options.pop("eta")
        if isinstance(eta, int | float) and not isinstance(eta, bool) \
                and eta > time.time() * 1000:
            self.broker.jobs("park", self.queue_name, self.broker.broker_id, rid, int(eta))
            self.broker.held.discard(self.queue_name, [rid])
            return None
        return message

    def _wait_for_work(self, next_due: str) -> None:
        """Block on the queue's wake-up list until a producer pushes, or the next delayed job.

        Never longer than the connection's own socket timeout allows (redis-py 8 sets
        5 s by default): a blocking read past it fails with TimeoutError, and Dramatiq
        restarts the whole consumer seconds later. The caller looks again after.
        """
        timeout_s = self.idle_timeout_s
        if next_due:
            timeout_s = min(timeout_s, max(0.0, float(next_due) / 1000 - time.time()))
        client = self.broker.jobs.connection()
        socket_timeout_s = getattr(client.connection, "socket_timeout", None)
        if isinstance(socket_timeout_s, int | float) and socket_timeout_s > 0:
            timeout_s = min(timeout_s, socket_timeout_s * SOCKET_TIMEOUT_SHARE)
        if timeout_s < 0.001:
            return
        client.blpop([self._wake_key], timeout=timeout_s)
