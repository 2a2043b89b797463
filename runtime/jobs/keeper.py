"""The job keeper: one thread per worker process that keeps jobs honest across hosts.

Every ``sweep_interval_s`` it

1. writes the worker's heartbeat, so a process busy with long jobs (whose
   consumers do not poll) is never presumed dead: a slow job is not run twice;
2. renews the leases of the concurrency-limit slots its running jobs hold;
3. sweeps (once it has itself been beating for a whole heartbeat timeout, so
   that after a Redis outage, when every heartbeat looks old, live workers
   have beaten again before anyone is judged): what a worker silent for
   longer than the heartbeat timeout had fetched goes back to the head of its
   queue; a job that worker was *running* is reported ``stalled`` and has used
   its attempt: it waits its backoff in the delayed set and runs again, or,
   on its last attempt, fails for good with the reason ``stalled``. A job that
   has killed its worker ``poison_deaths`` times is quarantined in the dead
   set with the reason instead of looping forever; a death counts towards
   that (and uses an attempt) only when the job ran alone on the worker (see
   docs/jobs.md, "Stalls and poison pills"), so a bystander of a pill is
   never quarantined nor charged; a job that died in company twice runs
   alone from then on, so the pill soon dies alone.

A worker that stops gracefully is never judged here: it hands back the jobs
it must abandon itself, uncharged, and leaves the heartbeats
(:meth:`runtime.jobs.middleware.JobsMiddleware.release`).

A stall is therefore seen within heartbeat timeout + sweep interval by a
keeper that was already running (twice the timeout right after a restart). Any
number of keepers may sweep at once (the sweep is one atomic script). A Redis
error is logged and the next round tries again.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis

from runtime.jobs.broker import JobBroker
from runtime.jobs.hooks import JobEvent

log = logging.getLogger(__name__)

HeldTokens = Callable[[], dict[str, tuple[str, ...]]]


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    requeued: int
    stalled: tuple[JobEvent, ...]


def _stalled_event(item: dict[str, Any]) -> JobEvent:
    """The ``stalled`` event of one job the sweep found; ``detail["outcome"]`` says what
    became of it: ``delayed`` (runs again after its backoff), ``failed`` or ``dead``."""
    detail = {name: item[name] for name in ("deaths", "shared_deaths", "outcome", "reason",
                                            "run_at_ms") if item.get(name) is not None}
    if item.get("critical") is True:
        detail["critical"] = True  # the message's own critical option (the actor's is known)
    args = item.get("args")
    return JobEvent("stalled", str(item["job_id"]), str(item["queue"]),
                    str(item.get("actor", "")), int(item.get("attempt") or 0), detail,
                    tuple(args) if isinstance(args, list) else ())


class JobKeeper:
    """Runs :meth:`beat` every ``sweep_interval_s`` on a daemon thread until stopped."""

    def __init__(self, broker: JobBroker, held: HeldTokens) -> None:
        self._broker = broker
        self._held = held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When this keeper's beats last started to get through without a gap (monotonic s).
        self._beating_since: float | None = None
        # Ids Redis listed as ours that no thread of ours held, at the last round, by queue.
        self._suspects: dict[str, set[str]] = {}

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="job-keeper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the current round; waits for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        interval_s = self._broker.config.sweep_interval_s
        while not self._stop.is_set():
            try:
                self.beat()
            except (redis.RedisError, OSError) as exc:
                self._beating_since = None
                log.warning("job keeper could not reach Redis, will retry: %s", exc)
            except Exception:  # the keeper must outlive a bug in one round; it is logged
                log.exception("job keeper round failed")
            self._stop.wait(interval_s)

    def beat(self) -> SweepReport:
        """One round: heartbeat, lease renewal, sweep; returns what the sweep did."""
        broker = self._broker
        now_ms = int(time.time() * 1000)
        lease_ms = broker.config.heartbeat_timeout_ms
        pipe = broker.client.pipeline(transaction=False)
        pipe.zadd(broker.keys.heartbeats, {broker.broker_id: now_ms})
        # A job running alone here keeps the worker to itself as long as the worker lives.
        pipe.pexpire(broker.keys.alone(broker.broker_id), lease_ms)
        for rid, keys in self._held().items():
            for key in keys:
                pipe.zadd(broker.keys.limit(key), {rid: now_ms + lease_ms}, xx=True)
        pipe.execute()
        self._reclaim_orphans()
        if self._beating_since is None:
            self._beating_since = time.monotonic()
        if time.monotonic() - self._beating_since < lease_ms / 1000:
            # After an outage every heartbeat in Redis is stale, the live workers' too:
            # sweep only once this keeper has beaten for a whole timeout, by when every
            # live worker has beaten again and only the dead look dead.
            return SweepReport(0, ())
        reply = json.loads(broker.jobs("sweep", broker.config.heartbeat_timeout_ms,
                                       broker.config.poison_deaths,
                                       broker.config.retry.as_json(), random.random(),
                                       broker.config.keep_failed))
        report = SweepReport(int(reply.get("requeued", 0)),
                             tuple(_stalled_event(item) for item in reply.get("stalled") or ()))
        for event in report.stalled:
            broker.hooks.emit(event)
            ended = event.detail.get("outcome")
            if ended in ("dead", "failed"):
                broker.hooks.emit(replace(event, kind=str(ended)))
        if report.requeued:
            log.info("gave back %d job(s) held by dead workers (%d were running)",
                     report.requeued, len(report.stalled))
        return report

    def _reclaim_orphans(self) -> int:
        """Hand back messages Redis lists as this worker's that no thread of it holds.

        A fetch whose reply was lost (Redis restarting mid-call) leaves such
        ids: this worker is alive, so no sweep would ever take them back. An id
        counts as orphaned when two rounds in a row see it unheld, which no
        fetch in flight can outlast (a reply takes milliseconds).
        """
        broker = self._broker
        queues = [q.decode() if isinstance(q, bytes) else str(q) for q in
                  broker.client.smembers(f"{broker.keys.namespace}:__queues__.{broker.broker_id}")]
        reclaimed = 0
        for queue in queues:
            listed = {r.decode() if isinstance(r, bytes) else str(r) for r in
                      broker.client.smembers(broker.keys.acks(broker.broker_id, queue))}
            unheld = listed - broker.held.snapshot(queue)
            orphans = unheld & self._suspects.get(queue, set())
            self._suspects[queue] = unheld - orphans
            if orphans:
                broker.jobs("requeue", queue, broker.broker_id, *sorted(orphans))
                reclaimed += len(orphans)
                log.warning("handed back %d message(s) of %s that a lost reply had left "
                            "listed as this worker's", len(orphans), queue)
        return reclaimed
