"""The queue monitor: every ``monitor_interval_s``, read, measure, alert."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from actors.monitor.queue_stats import QueueReader, QueueStats
from actors.monitor.rules import Thresholds, evaluate
from runtime.alerts import Alert, Alerter
from runtime.metrics import Metrics
from runtime.settings import Settings

log = logging.getLogger(__name__)

STATES = ("waiting", "active", "delayed", "failed")


@dataclass(frozen=True)
class CheckReport:
    """What one check saw and which alerts it fired or resolved (notifications sent)."""

    stats: tuple[QueueStats, ...]
    firing: tuple[Alert, ...]
    notified: tuple[tuple[Alert, bool], ...]
    # Notifications the webhook had refused earlier (any process's) that went out now.
    redelivered: tuple[str, ...] = ()


class QueueMonitor:
    """Checks ``queues`` on a timer; one instance per process, on its event loop."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        alerter: Alerter,
        metrics: Metrics,
        queues: Sequence[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._reader = QueueReader(settings, redis)
        self._alerter = alerter
        self._metrics = metrics
        self._queues = tuple(queues)
        self._limits = Thresholds.from_settings(settings)
        self._clock = clock

    async def check(self) -> CheckReport:
        """Check every queue once: update the gauges, fire and resolve alerts.

        First it sends again what the on-call webhook refused before (pages,
        resolves, failed-job pages of any process: they wait in Redis), oldest first.
        """
        redelivered = await self._alerter.deliver_pending()
        now_ms = int(self._clock() * 1000)
        workers = await self._reader.workers(now_ms)
        stats = [await self._reader.read(queue, workers, now_ms) for queue in self._queues]
        firing: list[Alert] = []
        notified: list[tuple[Alert, bool]] = []
        for queue_stats in stats:
            self._measure(queue_stats)
            for alert, fires in evaluate(queue_stats, self._limits):
                if fires:
                    firing.append(alert)
                if await self._alerter.update(alert, fires):
                    notified.append((alert, fires))
        self._metrics.monitor_last_check.set(now_ms / 1000)
        return CheckReport(tuple(stats), tuple(firing), tuple(notified), tuple(redelivered))

    def _measure(self, stats: QueueStats) -> None:
        m = self._metrics
        counts = {"waiting": stats.waiting, "active": stats.active, "delayed": stats.delayed,
                  "failed": stats.failed}
        for state in STATES:
            m.queue_jobs.labels(stats.queue, state).set(counts[state])
        m.queue_oldest_job_age.labels(stats.queue).set(stats.oldest_waiting_age_s or 0.0)
        m.queue_consumers.labels(stats.queue).set(stats.consumers)
        m.queue_failure_ratio.labels(stats.queue).set(stats.failure_ratio or 0.0)

    async def run(self, stop: asyncio.Event, interval_s: float | None = None,
                  on_report: Callable[[CheckReport], None] | None = None) -> None:
        """Check every ``interval_s`` (default ``monitor_interval_s``) until ``stop`` is set.

        ``on_report`` gets each check's report on this loop (``shopflow monitor
        --every`` prints it). A check that fails on Redis is logged and the next
        one tries again: the monitor outlives a Redis restart instead of
        crashing its supervisor.
        """
        every_s = self._settings.monitor_interval_s if interval_s is None else interval_s
        while not stop.is_set():
            try:
                report = await self.check()
            except RedisError as exc:
                # One line per failed check: Redis away for a while must not fill the log
                # with a traceback every interval (the cause is the same each time).
                log.warning("queue check failed: %s; next check in %ss", exc, every_s)
                log.debug("queue check failure", exc_info=True)
            else:
                if on_report is not None:
                    on_report(report)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
