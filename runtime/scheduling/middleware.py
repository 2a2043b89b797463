"""Worker-side half of the scheduler: one run per slot, and each run's outcome recorded.

Add :class:`ScheduledRunMiddleware` to the broker of every worker that runs
scheduled jobs. For messages the scheduler sent (they carry ``sched_name``
and ``sched_slot_ms`` in their options) it:

- refuses a second message for a slot that another message already ran
  (a re-send after a scheduler crash): it is skipped, logged and counted.
  Dramatiq's own retries of the same message are let through;
- logs and counts a run that starts late instead of dropping it (periodiq's
  middleware silently skips messages older than 30 s; this one never does);
- records the last run's status, times, result or error for
  ``shopflow schedules``, and clears the schedule's in-flight marker when the
  run is over, so the overlap policy sees it finished;
- also ends, as ``failed``, a run that the job keeper's stall sweep ended for
  good (its worker died on its last attempt, or it was quarantined as a
  poison pill): no worker calls ``after_nack`` for those, and without this the
  in-flight marker would hold the overlap policy until it expires.

Hooks run on Dramatiq's worker threads (and the keeper's thread), hence the
blocking Redis client.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.errors import DecodeError
from dramatiq.middleware import CurrentMessage, Middleware, SkipMessage

from runtime.jobs.broker import JobBroker
from runtime.jobs.hooks import JobEvent
from runtime.scheduling.metering import schedule_label
from runtime.scheduling.store import RUN_GUARD_TTL_MS, Keys

log = logging.getLogger(__name__)

# A run starting more than this long after its slot is logged as late.
DEFAULT_LATE_AFTER_S = 60.0
_MAX_TEXT = 500

# KEYS: run guard, state, stats. ARGV: message_id, ttl_ms, now_ms, slot_ms.
_GUARD = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[3], 'duplicates', 1)
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'last_status', 'running', 'last_slot_ms', ARGV[4],
           'last_started_at_ms', ARGV[3], 'last_msg', ARGV[1], 'last_error', '')
return 1
"""

# KEYS: inflight, state, stats. ARGV: message_id, status, now_ms, error, result, done (0/1).
_FINISH = """
if ARGV[6] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[2], 'last_msg') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'last_status', ARGV[2], 'last_finished_at_ms', ARGV[3],
             'last_error', ARGV[4], 'last_result', ARGV[5])
end
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""


_RESULT_OPTION = "sched_result"


def _short(text: str) -> str:
    return text[:_MAX_TEXT]


def scheduled_for(default: datetime) -> datetime:
    """The slot the current message was scheduled for, else ``default``.

    Worker thread, inside an actor. A scheduled job uses its slot as "now",
    so a run that starts late (or is retried tomorrow) still works on the
    period it was meant for. Needs Dramatiq's CurrentMessage middleware.
    """
    message = CurrentMessage.get_current_message()
    slot_ms = message.options.get("sched_slot_ms") if message is not None else None
    if not isinstance(slot_ms, int):
        return default
    return datetime.fromtimestamp(slot_ms / 1000, tz=UTC)


def record_run_result(value: Any) -> None:
    """Worker thread, inside an actor: keep ``value`` as the run's result for
    ``shopflow schedules`` (actors return None, as Dramatiq without a results
    backend expects)."""
    message = CurrentMessage.get_current_message()
    if message is not None:
        message.options[_RESULT_OPTION] = json.dumps(value, default=str)


class RunObserver(Protocol):
    """Told about every scheduled run's outcome (metrics plug in here).

    ``schedule`` is the schedule's metric label: its name for a built-in
    schedule, ``repeatable`` for every repeatable job
    (:func:`~runtime.scheduling.metering.schedule_label`), so labels stay bounded.
    """

    def run_finished(self, schedule: str, outcome: str, duration_s: float | None) -> None:
        """Worker (or keeper) thread. ``outcome``: succeeded, errored (a retry may follow),
        failed, skipped."""
        ...

    def run_started_late(self, schedule: str) -> None:
        """Worker thread: a run started more than the lateness bound after its slot."""
        ...


class ScheduledRunMiddleware(Middleware):
    """See the module docstring. Build one per worker process, after start-up."""

    def __init__(self, redis_url: str, namespace: str,
                 late_after_s: float = DEFAULT_LATE_AFTER_S,
                 observer: RunObserver | None = None) -> None:
        self._redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self._keys = Keys(namespace)
        self._late_after_s = late_after_s
        self.observer = observer
        self._guard = self._redis.register_script(_GUARD)
        self._finish = self._redis.register_script(_FINISH)
        # Per worker thread: (message id, monotonic start) of the run in progress.
        self._started = threading.local()
        self._unsubscribe: list[Callable[[], None]] = []

    @staticmethod
    def _slot(message: MessageProxy | dramatiq.Message[Any]) -> tuple[str, int] | None:
        name = message.options.get("sched_name")
        slot_ms = message.options.get("sched_slot_ms")
        if not isinstance(name, str) or not isinstance(slot_ms, int):
            return None
        return name, slot_ms

    @staticmethod
    def _label(message: MessageProxy | dramatiq.Message[Any]) -> str:
        """The run's metric label (bounded: repeatable jobs share one)."""
        source = message.options.get("sched_source")
        return schedule_label(str(message.options.get("sched_name")),
                              source if isinstance(source, str) else None)

    def before_process_message(self, broker: dramatiq.Broker,
                               message: MessageProxy) -> None:
        """Worker thread: claim the slot's run or skip the message as a duplicate."""
        slot = self._slot(message)
        if slot is None:
            return
        name, slot_ms = slot
        now_ms = int(time.time() * 1000)
        owned = self._guard(
            keys=[self._keys.run_guard(name, slot_ms), self._keys.state(name),
                  self._keys.stats(name)],
            args=[message.message_id, RUN_GUARD_TTL_MS, now_ms, slot_ms],
        )
        if not owned:
            log.warning("schedule %s slot %s already ran under another message; skipping %s",
                        name, message.options.get("sched_slot"), message.message_id,
                        extra={"schedule": name})
            raise SkipMessage()
        self._started.run = (message.message_id, time.monotonic())
        late_s = (now_ms - slot_ms) / 1000
        if late_s > self._late_after_s and not message.options.get("retries"):
            log.warning("schedule %s slot %s starts %.0fs late", name,
                        message.options.get("sched_slot"), late_s, extra={"schedule": name})
            self._redis.hincrby(self._keys.stats(name), "started_late", 1)
            if self.observer is not None:
                self.observer.run_started_late(self._label(message))

    def _record(self, message: MessageProxy | dramatiq.Message[Any], status: str, done: bool,
                error: str = "", result: str = "") -> None:
        slot = self._slot(message)
        if slot is None:
            return
        name, _ = slot
        self._finish(
            keys=[self._keys.inflight(name), self._keys.state(name), self._keys.stats(name)],
            args=[message.message_id, status, int(time.time() * 1000), error, result,
                  "1" if done else "0"],
        )
        if self.observer is not None:
            self.observer.run_finished(self._label(message), status,
                                       self._duration_s(message.message_id))

    def _duration_s(self, message_id: str) -> float | None:
        started: tuple[str, float] | None = getattr(self._started, "run", None)
        if started is None or started[0] != message_id:
            return None
        return time.monotonic() - started[1]

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy,
                              *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        """Worker thread: record success (the run is over) or an error (a retry may follow)."""
        noted = message.options.pop(_RESULT_OPTION, None)
        if self._slot(message) is None:
            return  # not a scheduled run: nothing to record (and no result to encode)
        if exception is None:
            text = noted if result is None and noted else json.dumps(result, default=str)
            self._record(message, "succeeded", done=True, result=_short(text))
        else:
            self._record(message, "errored", done=False, error=_short(repr(exception)))

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Worker thread: retries are exhausted; the run failed for good and is over."""
        slot = self._slot(message)
        if slot is not None:
            self._record(message, "failed", done=True,
                         error=_short(message.options.get("traceback", "")[-_MAX_TEXT:]))

    def after_skip_message(self, broker: dramatiq.Broker,
                           message: MessageProxy) -> None:
        """Worker thread: a skipped run is over too (the in-flight marker is only ours to clear)."""
        self._record(message, "skipped", done=True)

    # --- runs the job keeper's stall sweep ended (the keeper's thread) -------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Main thread: listen to the job keeper's sweep (a keeper runs in every worker), so a
        scheduled run it ends for good is finished here (see :meth:`swept`)."""
        if isinstance(broker, JobBroker) and not self._unsubscribe:
            self._unsubscribe = [broker.hooks.subscribe(kind, lambda e: self.swept(broker, e))
                                 for kind in ("failed", "dead")]

    def swept(self, broker: JobBroker, event: JobEvent) -> None:
        """Keeper thread: the sweep ended a job for good (``failed`` after a stall on its last
        attempt, or ``dead``: a poison pill). If it was a scheduled run, record it failed and
        clear the in-flight marker, as :meth:`after_nack` does for a failure a worker saw.

        Only the keeper's events carry ``outcome``; the job's message (with the schedule's
        options) is read back from its record, written by the same sweep.
        """
        if event.detail.get("outcome") not in ("failed", "dead"):
            return
        raw = broker.client.hget(broker.keys.job(event.job_id), "message")
        if not raw:
            log.warning("job %s ended in the stall sweep but its record is gone; if it was a "
                        "scheduled run its overlap marker expires on its own", event.job_id)
            return
        try:
            message = dramatiq.Message.decode(raw if isinstance(raw, bytes) else raw.encode())
        except DecodeError as exc:  # a record this code did not write; nothing to finish
            log.warning("job %s: unreadable message in its record: %s", event.job_id, exc)
            return
        if self._slot(message) is None:
            return
        reason = str(event.detail.get("reason") or "stalled")
        log.error("scheduled run of %s (slot %s) ended in the stall sweep: %s",
                  message.options.get("sched_name"), message.options.get("sched_slot"), reason,
                  extra={"schedule": message.options.get("sched_name"), "job_id": event.job_id})
        self._record(message, "failed", done=True, error=_short(f"{event.kind}: {reason}"))

    def close(self) -> None:
        """Close the Redis connections (worker shutdown)."""
        self._redis.close()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Main thread, at worker shutdown: stop listening to the sweep, release Redis."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self.close()


def ensure_scheduled_run_middleware(broker: dramatiq.Broker, redis_url: str, namespace: str,
                                    observer: RunObserver | None = None
                                    ) -> ScheduledRunMiddleware:
    """The broker's :class:`ScheduledRunMiddleware`, added if it has none yet.

    Call before the worker starts. Concerns that consume scheduled jobs call
    it from their ``declare`` step, so their runs are recorded (and the
    overlap policy sees them finish) even in a process that did not add the
    middleware itself. An ``observer`` is attached to an existing middleware
    that has none, so the order in which concerns declare does not matter.
    """
    for middleware in broker.middleware:
        if isinstance(middleware, ScheduledRunMiddleware):
            if observer is not None and middleware.observer is None:
                middleware.observer = observer
            return middleware
    added = ScheduledRunMiddleware(redis_url, namespace, observer=observer)
    broker.add_middleware(added)
    return added
