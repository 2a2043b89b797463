"""The job keeper: one thread per worker process that keeps jobs honest across hosts.

Every ``sweep_interval_s`` it

1. writes the worker's heartbeat, so a process busy with long jobs (whose
   consumers do not poll) is never presumed dead: a slow job is not run twice;
2. renews the leases of the concurrency-limit slots its running jobs hold;
3. sweeps: what a worker silent for longer than the heartbeat timeout had
   fetched goes back to the head of its queue; a job that worker was
   *running* is reported ``stalled`` and counts a death, and a job that has
   killed its worker ``poison_deaths`` times is quarantined in the dead set
   with the reason instead of looping forever.

A stall is therefore seen within heartbeat timeout + sweep interval. Any
number of keepers may sweep at once (the sweep is one atomic script). A Redis
error is logged and the next round tries again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

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


class JobKeeper:
    """Runs :meth:`beat` every ``sweep_interval_s`` on a daemon thread until stopped."""

    def __init__(self, broker: JobBroker, held: HeldTokens) -> None:
        self._broker = broker
        self._held = held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        for rid, keys in self._held().items():
            for key in keys:
                pipe.zadd(broker.keys.limit(key), {rid: now_ms + lease_ms}, xx=True)
        pipe.execute()
        reply = json.loads(broker.jobs("sweep", broker.config.heartbeat_timeout_ms,
                                       broker.config.poison_deaths))
        report = SweepReport(int(reply.get("requeued", 0)), tuple(
            JobEvent("dead" if item.get("dead") else "stalled", str(item["job_id"]),
                     str(item["queue"]), str(item.get("actor", "")), 0,
                     {"deaths": int(item.get("deaths", 0))},
                     tuple(item.get("args") or ()) if isinstance(item.get("args"), list) else ())
            for item in reply.get("stalled") or ()))
        for event in report.stalled:
            broker.hooks.emit(JobEvent("stalled", event.job_id, event.queue, event.actor, 0,
                                       event.detail, event.args))
            if event.kind == "dead":
                broker.hooks.emit(event)
        if report.requeued:
            log.info("gave back %d job(s) held by dead workers (%d were running)",
                     report.requeued, len(report.stalled))
        return report
