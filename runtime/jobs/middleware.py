"""The worker side of the job model: start, limits, retries, cancellation, outcomes.

:class:`JobsMiddleware` replaces Dramatiq's ``Retries``. For each message a
worker thread takes:

1. ``before_process_message``: one script call checks cancellation, takes
   the actor's concurrency and rate limits (all or none, across hosts) and
   marks the job ``active``. A job that cannot take its limits waits a little,
   then goes back to its queue without using an attempt; a cancelled one is
   skipped; a message for a job that already finished is let go.
2. ``after_process_message``: decides the outcome (completed, cancelled,
   retry after a backoff, failed for good) and attaches it to the message.
3. The consumer's ack or nack records that outcome and lets go of the
   message in one step (:meth:`JobBroker.finish`).

It also starts the process's :class:`~runtime.jobs.keeper.JobKeeper` when a
worker boots. Hooks run on Dramatiq's worker threads unless noted.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.errors import Retry
from dramatiq.middleware import Middleware, SkipMessage, TimeLimit

from runtime.errors import JobCancelled
from runtime.jobs.broker import JobBroker
from runtime.jobs.context import JobContext, enter_job
from runtime.jobs.hooks import JobEvent
from runtime.jobs.keeper import JobKeeper
from runtime.jobs.limits import actor_limits, resolve
from runtime.jobs.outcome import Outcome, peek_outcome, set_outcome
from runtime.jobs.retries import retry_delay_ms

log = logging.getLogger(__name__)

# A job held back by a limit is handed back to its queue with at least this delay.
MIN_REQUEUE_DELAY_MS = 50
# Why a job went back to its queue without using an attempt (shopflow_job_requeues_total).
REQUEUE_LIMITED = "limited"
REQUEUE_REDIS_AWAY = "redis_unavailable"
# ...because its worker was kept for a job that must run alone (one that died in company).
REQUEUE_ALONE = "running_alone"
# Message options that change a job's retry policy.
_POLICY_OPTIONS = frozenset({"attempts", "max_retries", "backoff", "backoff_ms", "backoff_max_ms",
                             "jitter"})
# While waiting for a limit slot, look again at most this often.
LIMIT_POLL_S = 0.02
# Results and errors kept on a job record are cut to this many characters.
MAX_TEXT = 2_000


def _short(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def result_text(result: Any) -> str | None:
    """A job's return value as stored on its record (JSON when it can be, else repr)."""
    if result is None:
        return None
    try:
        return _short(json.dumps(result, default=str))
    except (TypeError, ValueError):
        return _short(repr(result))


def error_text(exc: BaseException) -> str:
    """``Type: message`` of a failure, as shown to operators."""
    return _short(f"{type(exc).__name__}: {exc}")


class JobsMiddleware(Middleware):
    """Job lifecycle for every actor of a :class:`JobBroker` (see the module docstring)."""

    def __init__(self, rng: Callable[[], float] = random.random) -> None:
        self._rng = rng
        self._keeper: JobKeeper | None = None
        self._held: dict[str, tuple[str, ...]] = {}
        self._running: dict[str, MessageProxy] = {}  # message id -> the message, while it runs
        self._policies: dict[str, str] = {}  # actor name -> its policy JSON (a dict: GIL-safe)
        self._default_time_limit_ms: int | None = None  # TimeLimit's, looked up on first use
        self._lock = threading.Lock()

    @property
    def actor_options(self) -> set[str]:
        """Options an actor may declare: its retry policy, limits and retention."""
        return {"attempts", "max_retries", "backoff", "backoff_ms", "backoff_max_ms", "jitter",
                "limits", "concurrency", "keep_completed", "keep_failed", "dedup_s"}

    def held_limit_tokens(self) -> dict[str, tuple[str, ...]]:
        """Message id -> limit keys of every running job of this process (for lease renewal)."""
        with self._lock:
            return dict(self._held)

    # --- worker lifecycle (main thread) -------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Start the keeper: heartbeats, lease renewal, the stall sweep."""
        jb = _job_broker(broker)
        if jb.actors:
            # Producers that only know names (HTTP, other languages) check them against this,
            # and find each actor's attempts (its options over the settings) for the record.
            pipe = jb.client.pipeline(transaction=False)
            pipe.hset(jb.keys.actors, mapping={name: actor.queue_name
                                               for name, actor in jb.actors.items()})
            pipe.hset(jb.keys.actor_policies, mapping={
                name: jb.config.retry.with_options(actor.options).as_json()
                for name, actor in jb.actors.items()})
            pipe.execute()
        self._keeper = JobKeeper(jb, self.held_limit_tokens)
        self._keeper.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Keep beating while running jobs finish; the keeper stops after the worker."""

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop the keeper once every thread is done (or given up on: see :meth:`release`)."""
        self._stop_keeper()

    def _stop_keeper(self) -> None:
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None

    def release(self, broker: dramatiq.Broker) -> list[str]:
        """Hand back everything this worker still holds, as its graceful stop's last step;
        the ids of the jobs its threads were still running. Any thread.

        A job still running when the stop's time for jobs ran out is abandoned, not
        killed: left to the stall sweep it would count as a death (an attempt used,
        a poison-pill quarantine after a few deploys). Instead it goes back to waiting
        at its place as the same attempt, under a new run id (``jobs.lua`` ``release``),
        so the abandoned thread can neither finish it nor report progress on it
        later. The keeper stops first: the worker is then forgotten in Redis (no
        heartbeat to judge), and Redis errors reach the caller.
        """
        jb = _job_broker(broker)
        self._stop_keeper()
        with self._lock:
            running = [(rid, message, self._held.get(rid, ()))
                       for rid, message in self._running.items()]
        entries = []
        for rid, message, keys in running:
            new_rid = str(uuid.uuid4())
            next_run = message._message.copy(options={"redis_message_id": new_rid})
            entries.append({"queue": message.queue_name, "rid": rid, "new_rid": new_rid,
                            "new_message": next_run.encode().decode(),
                            "limit_keys": list(keys)})
        reply = json.loads(jb.jobs("release", jb.broker_id, json.dumps(entries)))
        released = [str(job_id) for job_id in reply.get("released") or ()]
        if released:
            log.warning("handed back %d job(s) still running at the stop, to run again "
                        "elsewhere as the same attempt: %s", len(released), ", ".join(released))
        return released

    # --- one attempt (worker thread) ------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Start the attempt, or skip it (cancelled, already finished, held back by a limit)."""
        jb = _job_broker(broker)
        job_id = _job_id(message)
        actor = jb.actors.get(message.actor_name)
        actor_options = actor.options if actor is not None else {}
        limits = resolve(actor_limits(message.actor_name, actor_options), message.options)
        lease_ms = jb.config.heartbeat_timeout_ms
        limits_json = json.dumps([lim.as_json(lease_ms) for lim in limits]) if limits else ""
        attempt = int(message.options.get("retries", 0)) + 1
        policy_json = self._policy_json(jb, message, actor_options)
        started_s = time.monotonic()
        deadline = started_s + jb.config.limit_wait_ms / 1000
        while True:
            try:
                reply = jb.jobs("start", message.queue_name, _rid(message), job_id,
                                message.actor_name, jb.broker_id, attempt, limits_json,
                                policy_json, lease_ms)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Dramatiq would log and run the job anyway, without its record or its
                # limits. Hand it back instead; the ack that does so is retried by
                # Dramatiq until Redis answers again.
                log.warning("job %s not started, Redis is away (%s); it goes back to its queue",
                            job_id, exc)
                set_outcome(message, self._next_run(jb, message, "requeue",
                                                    MIN_REQUEUE_DELAY_MS * 10, retried=False,
                                                    reason=REQUEUE_REDIS_AWAY))
                raise SkipMessage(f"job {job_id}: Redis is away") from None
            if reply[0] == "run":
                break
            if reply[0] == "limited" and reply[2:] == ["isolated"]:
                # This job must run alone and keeps the worker to itself meanwhile: it waits
                # for the jobs running here to end, up to a heartbeat timeout.
                deadline = max(deadline, started_s + lease_ms / 1000)
            if reply[0] == "limited" and time.monotonic() < deadline:
                time.sleep(min(int(reply[1]) / 1000, LIMIT_POLL_S,
                               max(0.0, deadline - time.monotonic())))
                continue
            self._skip(jb, message, job_id, reply)
        if len(reply) > 1 and int(reply[1]) > attempt:
            # A stall used an attempt the message does not know of (the sweep ran it again
            # as it was): this run, its retries and its next run count from the record's.
            attempt = int(reply[1])
            message.options["retries"] = attempt - 1
        keys = tuple(lim.key for lim in limits if lim.concurrency)
        with self._lock:
            self._held[_rid(message)] = keys
            self._running[_rid(message)] = message
        max_attempts = jb.max_attempts(message._message)
        limit_ms = self._time_limit_ms(jb, message, actor_options)
        deadline_s = time.monotonic() + limit_ms / 1000 if limit_ms else None
        enter_job(JobContext(job_id, message.queue_name, message.actor_name, attempt,
                             max_attempts, jb.client, jb.keys, jb.jobs, jb.hooks, deadline_s,
                             _rid(message)))
        jb.hooks.emit(JobEvent("active", job_id, message.queue_name, message.actor_name, attempt,
                               args=tuple(message.args)))

    def _time_limit_ms(self, jb: JobBroker, message: MessageProxy,
                       actor_options: dict[str, Any]) -> int | None:
        """The attempt's time limit as Dramatiq's TimeLimit enforces it: the message's
        ``time_limit`` (``timeout_ms``), its actor's, or the middleware's default."""
        limit = message.options.get("time_limit", actor_options.get("time_limit"))
        if limit is None:
            if self._default_time_limit_ms is None:
                self._default_time_limit_ms = next(
                    (int(m.time_limit) for m in jb.middleware if isinstance(m, TimeLimit)), 0)
            limit = self._default_time_limit_ms
        return int(limit) or None

    def _policy_json(self, jb: JobBroker, message: MessageProxy,
                     actor_options: dict[str, Any]) -> str:
        """The job's retry policy as its record keeps it (for the stall sweep); cached per
        actor for the common message that overrides none of it (one per job otherwise)."""
        if not _POLICY_OPTIONS.intersection(message.options):
            cached = self._policies.get(message.actor_name)
            if cached is None:
                cached = jb.config.retry.with_options(actor_options).as_json()
                self._policies[message.actor_name] = cached
            return cached
        return jb.config.retry.with_options(actor_options).with_options(message.options).as_json()

    def _skip(self, jb: JobBroker, message: MessageProxy, job_id: str, reply: list[Any]) -> None:
        """Attach the outcome of a start that did not run, and raise SkipMessage."""
        kind = reply[0]
        if kind == "limited":
            delay_ms = max(MIN_REQUEUE_DELAY_MS, int(reply[1]))
            reason = REQUEUE_ALONE if reply[2:] in (["alone"], ["isolated"]) else REQUEUE_LIMITED
            set_outcome(message, self._next_run(jb, message, "requeue", delay_ms, retried=False,
                                                reason=reason))
            log.debug("job %s held back by a limit, back in %d ms", job_id, delay_ms)
        elif kind == "cancelled":
            set_outcome(message, Outcome("cancelled", {"reason": "cancelled before it started"}))
        elif kind == "stale":
            # This worker was presumed dead and its fetched copy handed to another (or the
            # job has run again since): the other copy is the job's; this one goes.
            set_outcome(message, Outcome("ack"))
            log.warning("job %s: not starting a stale copy (%s)", job_id, reply[1])
        else:
            # A redelivered copy of a job that already ended: let it go.
            set_outcome(message, Outcome("ack"))
            log.info("job %s already %s; letting a redelivered copy go", job_id, reply[1])
        raise SkipMessage(f"job {job_id}: {kind}")

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy, *,
                              result: Any = None, exception: BaseException | None = None) -> None:
        """Decide the attempt's outcome and attach it for the consumer's ack or nack."""
        jb = _job_broker(broker)
        enter_job(None)
        with self._lock:
            keys = self._held.pop(_rid(message), ())
            self._running.pop(_rid(message), None)
        attempt = int(message.options.get("retries", 0)) + 1
        if exception is None:
            # Built with its limit keys at once: no dataclasses.replace on every job's path.
            outcome = Outcome("completed", {"result": result_text(result), "attempt": attempt},
                              limit_keys=keys)
        elif isinstance(exception, JobCancelled):
            outcome = Outcome("cancelled", {"reason": str(exception), "attempt": attempt},
                              limit_keys=keys)
        else:
            outcome = replace(self._after_failure(jb, message, exception, attempt),
                              limit_keys=keys)
        set_outcome(message, outcome)

    def _after_failure(self, jb: JobBroker, message: MessageProxy, exc: BaseException,
                       attempt: int) -> Outcome:
        message.options["traceback"] = _short(traceback.format_exc(limit=10))
        error = error_text(exc)
        retries = int(message.options.get("retries", 0))
        actor = jb.actors.get(message.actor_name)
        policy = jb.config.retry.with_options(actor.options if actor else {})
        policy = policy.with_options(message.options)
        delay: int | None
        if isinstance(exc, Retry) and exc.delay is not None:
            # The actor asked for a retry itself, after its own delay: still within the
            # job's attempts, or a job that always asks would run forever.
            delay = int(exc.delay) if retries < policy.attempts - 1 else None
        else:
            delay = retry_delay_ms(policy, jb.config.infra_retries, retries, exc, self._rng())
        if delay is None:
            message.fail()
            return Outcome("failed", {"error": error, "attempt": attempt})
        outcome = self._next_run(jb, message, "retry", delay, retried=True)
        return replace(outcome, detail={"error": error, "attempt": attempt, "delay_ms": delay})

    @staticmethod
    def _next_run(jb: JobBroker, message: MessageProxy, kind: str, delay_ms: int,
                  retried: bool, reason: str = "") -> Outcome:
        """A retry or requeue outcome carrying the next run's message.

        A requeue names its ``reason`` in the detail: metrics count hand-backs by reason,
        apart from the job's one end.
        """
        options: dict[str, Any] = {"redis_message_id": str(uuid.uuid4())}
        if retried:
            options["retries"] = int(message.options.get("retries", 0)) + 1
        next_message = message._message.copy(options=options)
        return Outcome(kind, {"reason": reason} if reason else {},
                       new_rid=options["redis_message_id"],
                       new_message=next_message.encode().decode(),
                       eta_ms=int(time.time() * 1000) + delay_ms if delay_ms else 0,
                       priority=int(message.options.get("priority", 0)))

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """A skip decided by another middleware (a duplicate scheduled slot, an age limit)."""
        enter_job(None)
        with self._lock:
            keys = self._held.pop(_rid(message), ())
            self._running.pop(_rid(message), None)
        if peek_outcome(message) is None:
            set_outcome(message, Outcome("skipped", {"reason": "skipped by the runtime"},
                                         limit_keys=keys))


def release_worker(broker: dramatiq.Broker) -> list[str]:
    """:meth:`JobsMiddleware.release` of ``broker``'s jobs middleware (nothing without one)."""
    for middleware in broker.middleware:
        if isinstance(middleware, JobsMiddleware):
            return middleware.release(broker)
    return []


def _job_broker(broker: dramatiq.Broker) -> JobBroker:
    if not isinstance(broker, JobBroker):
        raise TypeError("JobsMiddleware needs a JobBroker (runtime.broker.setup_broker builds one)")
    return broker


def _job_id(message: MessageProxy) -> str:
    return str(message.options.get("job_id") or message.message_id)


def _rid(message: MessageProxy) -> str:
    return str(message.options["redis_message_id"])
