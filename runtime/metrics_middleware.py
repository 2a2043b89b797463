"""Dramatiq middleware that measures every job of every actor.

What it records, per queue and actor:

- ``shopflow_jobs_total{outcome}``: a job ends once, when Redis learns its
  fate: acked after success (``completed``), acked after a skip
  (``skipped``), acked after it stopped on request (``cancelled``) or
  rejected into the dead-letter queue (``failed``). Counting
  at ack/nack time rather than after the actor returns is what makes the
  numbers right whatever the middleware order: the Retries middleware decides
  *after* us whether a failed attempt is retried.
- ``shopflow_job_retries_total``: attempts that failed and were acked because
  a retry was scheduled; ``shopflow_job_dead_letters_total``: rejections;
  ``shopflow_job_requeues_total{reason}``: hand-backs to the queue that use
  no attempt (a limit held the job back, Redis was away): not ends.
- ``shopflow_job_duration_seconds`` and ``shopflow_jobs_in_progress``.

While a job runs, every log line of its thread carries ``job_id``, ``queue``,
``actor`` and ``retries`` (``runtime.logs.log_context``).

It also keeps two small records in Redis for the queue monitor, which may run
on another host: per-minute outcome counts per queue (for the failure rate)
and which queues each live worker consumes (Dramatiq's heartbeats say that a
broker is alive, not what it consumes).

Actors may be declared with ``critical=True`` (or a message sent with it); when
such a job fails for good the ``on_failed_for_good`` callback is called once
(the worker wires it to :func:`runtime.alerts.page_job_failed`): after its
last attempt failed (the nack), and when the job keeper's stall sweep ends it
(quarantined in the dead set as a poison pill, or out of attempts after a stall).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from runtime.jobs.args import int_arg
from runtime.jobs.broker import JobBroker
from runtime.jobs.hooks import JobEvent
from runtime.jobs.outcome import Tally, add_tally, peek_outcome, take_tally
from runtime.logs import log_context
from runtime.metrics import (
    OUTCOME_CANCELLED,
    OUTCOME_COMPLETED,
    OUTCOME_FAILED,
    OUTCOME_SKIPPED,
    Metrics,
    get_metrics,
)
from runtime.settings import Settings

log = logging.getLogger(__name__)

# Outcome counts for the monitor are kept in buckets of this many seconds.
OUTCOME_BUCKET_S = 60
# Label value for queues or actors this process never declared (bounded labels).
UNKNOWN_LABEL = "unknown"
# Outcome of a failed attempt that will run again (monitor's Redis counts only).
OUTCOME_RETRIED = "retried"
# A job handed back to its queue without using an attempt (counted apart, never an end).
OUTCOME_REQUEUED = "requeued"


def outcomes_key(namespace: str, queue: str, bucket: int) -> str:
    """Redis hash of outcome -> count for ``queue`` in minute ``bucket`` (epoch s // 60)."""
    return f"{namespace}:monitor:outcomes:{queue}:{bucket}"


def consumers_key(namespace: str) -> str:
    """Redis hash of Dramatiq broker id -> JSON {queues, pid, host, at_ms} of live workers."""
    return f"{namespace}:monitor:consumers"


@dataclass(frozen=True)
class FailedJob:
    """A job that failed for good (after its last attempt, or a permanent error)."""

    queue: str
    actor: str
    message_id: str
    args: tuple[Any, ...]
    error: str | None
    retries: int


@dataclass
class _Attempt:
    queue: str
    actor: str
    started_s: float
    raised: bool = False
    skipped: bool = False
    # The job layer's outcome (runtime.jobs.outcome) and a requeue's reason, seen before the ack.
    kind: str | None = None
    reason: str = ""


class MetricsMiddleware(Middleware):
    """Records job outcomes, durations and retries for every actor of the broker.

    Hooks run on Dramatiq's worker threads (process, skip) and consumer
    threads (ack, nack); the shared state is one dict guarded by a lock.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        on_failed_for_good: Callable[[FailedJob], None] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._on_failed_for_good = on_failed_for_good
        self._attempts: dict[str, _Attempt] = {}
        self._unsubscribe: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._job_logs = threading.local()
        # Outcome buckets must outlive the monitor's window, plus one partial bucket.
        self._outcomes_ttl_s = settings.monitor_failure_rate_window_s + 2 * OUTCOME_BUCKET_S

    @property
    def actor_options(self) -> set[str]:
        """``critical``: page when the job fails for good."""
        return {"critical"}

    @property
    def metrics(self) -> Metrics:
        """The process's metrics, built on first use (after the worker process started)."""
        if self._metrics is None:
            self._metrics = get_metrics(self._settings)
        return self._metrics

    # --- labels -------------------------------------------------------------

    @staticmethod
    def _labels(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> tuple[str, str]:
        """(queue, actor), with undeclared names folded into ``unknown`` to bound labels."""
        queue = message.queue_name.removesuffix(".DQ")
        if queue not in broker.get_declared_queues():
            queue = UNKNOWN_LABEL
        actor = message.actor_name if message.actor_name in broker.actors else UNKNOWN_LABEL
        return queue, actor

    @staticmethod
    def _key(message: dramatiq.Message[Any]) -> str:
        return str(message.options.get("redis_message_id") or message.message_id)

    # --- processing (worker threads) -----------------------------------------

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Build the metrics as soon as a worker process boots (main thread)."""
        _ = self.metrics

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Start timing the attempt (worker thread)."""
        queue, actor = self._labels(broker, message)
        with self._lock:
            self._attempts[self._key(message)] = _Attempt(queue, actor, time.perf_counter())
        self.metrics.jobs_in_progress.labels(queue, actor).inc()
        self._enter_job_log(broker, message, queue, actor)

    def _enter_job_log(self, broker: dramatiq.Broker, message: Any, queue: str, actor: str) -> None:
        """Put the job's ids on every log line of this worker thread until the job ends."""
        self._leave_job_log()
        stack = ExitStack()
        actor_obj = broker.actors.get(message.actor_name)
        stack.enter_context(log_context(
            job_id=message.options.get("job_id") or message.message_id, queue=queue, actor=actor,
            retries=message.options.get("retries", 0),
            correlation_id=message.options.get("correlation_id"),
            order_id=int_arg(actor_obj.fn if actor_obj else None, message.args)))
        self._job_logs.stack = stack

    def _leave_job_log(self) -> None:
        stack: ExitStack | None = getattr(self._job_logs, "stack", None)
        if stack is not None:
            self._job_logs.stack = None
            stack.close()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Observe the attempt's duration; remember whether it raised (worker thread)."""
        self._leave_job_log()
        with self._lock:
            attempt = self._attempts.get(self._key(message))
        if attempt is None:
            return
        attempt.raised = exception is not None
        self.metrics.jobs_in_progress.labels(attempt.queue, attempt.actor).dec()
        self.metrics.job_duration.labels(attempt.queue, attempt.actor).observe(
            time.perf_counter() - attempt.started_s
        )

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Mark the job skipped (worker thread); a skip in an earlier middleware never started."""
        self._leave_job_log()
        key = self._key(message)
        with self._lock:
            attempt = self._attempts.get(key)
            if attempt is None:
                queue, actor = self._labels(broker, message)
                self._attempts[key] = _Attempt(queue, actor, time.perf_counter(), skipped=True)
                return
        attempt.skipped = True
        self.metrics.jobs_in_progress.labels(attempt.queue, attempt.actor).dec()

    # --- fate (consumer threads) ----------------------------------------------

    def before_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        """Note the job layer's outcome and ask for the monitor's count (see _ask_tally).

        Runs on the thread that acks, just before the ack (the consumer takes the
        outcome off the message in the ack); the attempt is only read here,
        :meth:`after_ack` takes it.
        """
        with self._lock:
            attempt = self._attempts.get(self._key(message))
        if attempt is None:
            return
        outcome = peek_outcome(message)
        if outcome is not None:
            attempt.kind = outcome.kind
            attempt.reason = str(outcome.detail.get("reason") or "")
        label = _acked_outcome(attempt)
        if label is not None and label != OUTCOME_REQUEUED:
            self._ask_tally(broker, message, attempt.queue, label)

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """Ask for the monitor's ``failed`` count to be written with the nack."""
        with self._lock:
            attempt = self._attempts.get(self._key(message))
        queue = attempt.queue if attempt else self._labels(broker, message)[0]
        self._ask_tally(broker, message, queue, OUTCOME_FAILED)

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        """Count the job's end, its retry or its hand-back (consumer thread).

        A job ends once in ``shopflow_jobs_total``: a hand-back to its queue (a
        limit, Redis away) is counted apart, by reason, and the let-go of a
        redelivered copy of a job that already ended is not counted at all. Acks
        of messages this middleware never saw processed are the delay queue
        handing a due message over to its queue: not an outcome either.
        """
        with self._lock:
            attempt = self._attempts.pop(self._key(message), None)
        if attempt is None:
            take_tally(message)
            return
        outcome = _acked_outcome(attempt)
        if outcome == OUTCOME_RETRIED:
            self.metrics.job_retries.labels(attempt.queue, attempt.actor).inc()
        elif outcome == OUTCOME_REQUEUED:
            self.metrics.job_requeues.labels(attempt.queue, attempt.reason or "other").inc()
        elif outcome is not None:
            self.metrics.jobs.labels(attempt.queue, attempt.actor, outcome).inc()
        self._record_outcome(broker, message)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """Count a job that failed for good and went to the dead-letter queue (consumer thread)."""
        with self._lock:
            attempt = self._attempts.pop(self._key(message), None)
        queue, actor = (attempt.queue, attempt.actor) if attempt else self._labels(broker, message)
        self.metrics.jobs.labels(queue, actor, OUTCOME_FAILED).inc()
        self.metrics.job_dead_letters.labels(queue, actor).inc()
        if self._on_failed_for_good is not None and self._is_critical(broker, message):
            self._on_failed_for_good(_failed_job(queue, actor, message))
        self._record_outcome(broker, message)

    @staticmethod
    def _is_critical(broker: dramatiq.Broker, message: Any) -> bool:
        actor = broker.actors.get(message.actor_name)
        return bool(message.options.get("critical") or (actor and actor.options.get("critical")))

    def _ask_tally(self, broker: dramatiq.Broker, message: Any, queue: str, outcome: str) -> None:
        """Ask for one more in this minute's outcome count for the queue monitor (any host).

        A JobBroker's consumer writes it in the script call that finishes the job, so
        the count costs no round trip of its own (it was one Redis pipeline per job)
        and is written once, together with the outcome it counts. On any other Redis
        broker :meth:`_record_outcome` writes it after the ack, as before.
        """
        if not isinstance(broker, RedisBroker) or queue == UNKNOWN_LABEL:
            return
        key = outcomes_key(self._settings.namespace, queue, int(time.time()) // OUTCOME_BUCKET_S)
        add_tally(message, Tally(key, outcome, self._outcomes_ttl_s))

    @staticmethod
    def _record_outcome(broker: dramatiq.Broker, message: Any) -> None:
        """Write the outcome count asked for before the ack if no job consumer wrote it."""
        tally = take_tally(message)
        if tally is None or not isinstance(broker, RedisBroker):
            return
        pipe = broker.client.pipeline(transaction=False)
        pipe.hincrby(tally.key, tally.field, 1)
        pipe.expire(tally.key, tally.ttl_s)
        pipe.execute()

    # --- jobs the stall sweep ended (the keeper's thread) ----------------------

    def _page_swept(self, broker: dramatiq.Broker, event: JobEvent) -> None:
        """Page for a critical job the keeper's sweep ended for good: quarantined as a poison
        pill (``dead``) or out of attempts after a stall (``failed``). Only the keeper's
        events carry ``outcome``: a failure a worker recorded pages in :meth:`after_nack`.
        Each swept job is reported by one sweep of one keeper, so it pages once."""
        if event.detail.get("outcome") not in ("dead", "failed"):
            return
        actor = broker.actors.get(event.actor)
        if not (event.detail.get("critical") or (actor and actor.options.get("critical"))):
            return
        if self._on_failed_for_good is not None:
            self._on_failed_for_good(FailedJob(
                queue=event.queue, actor=event.actor, message_id=event.job_id,
                args=event.args, error=str(event.detail.get("reason") or "stalled"),
                retries=max(0, event.attempt - 1)))

    # --- worker presence (main thread) -----------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Tell the queue monitor which queues this worker consumes; page for critical jobs
        this process's job keeper ends (a keeper runs in every worker)."""
        if isinstance(broker, JobBroker) and not self._unsubscribe:
            self._unsubscribe = [broker.hooks.subscribe(
                kind, lambda event: self._page_swept(broker, event)) for kind in ("dead", "failed")]
        if not isinstance(broker, RedisBroker):
            return
        queues = sorted({name.removesuffix(".DQ") for name in worker.consumers})
        record = {"queues": queues, "pid": os.getpid(), "host": socket.gethostname(),
                  "at_ms": int(time.time() * 1000)}
        broker.client.hset(consumers_key(self._settings.namespace), broker.broker_id,
                           json.dumps(record))

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Withdraw this worker from the monitor's consumer list."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if isinstance(broker, RedisBroker):
            broker.client.hdel(consumers_key(self._settings.namespace), broker.broker_id)


# What each outcome of the job layer counts as when acked (None: nothing ended).
_ACKED_LABELS: dict[str, str | None] = {
    "completed": OUTCOME_COMPLETED, "skipped": OUTCOME_SKIPPED, "cancelled": OUTCOME_CANCELLED,
    "retry": OUTCOME_RETRIED, "requeue": OUTCOME_REQUEUED, "ack": None,
}


def _acked_outcome(attempt: _Attempt) -> str | None:
    """What an acked attempt was: the job layer's outcome when it gave one; otherwise
    retried (it raised and a retry is scheduled), skipped or completed. None: not an end
    (a redelivered copy of a job that had already ended, let go)."""
    if attempt.kind is not None and attempt.kind in _ACKED_LABELS:
        return _ACKED_LABELS[attempt.kind]
    if attempt.raised:
        return OUTCOME_RETRIED
    return OUTCOME_SKIPPED if attempt.skipped else OUTCOME_COMPLETED


def _failed_job(queue: str, actor: str, message: Any) -> FailedJob:
    error = message.options.get("traceback")
    exc = getattr(message, "_exception", None)
    if exc is not None:
        error = f"{type(exc).__name__}: {exc}"
    return FailedJob(
        queue=queue, actor=actor, message_id=message.message_id, args=tuple(message.args),
        error=error.strip().splitlines()[-1] if error else None,
        retries=int(message.options.get("retries", 0)),
    )
