"""What counts as an unhealthy queue: plain functions over :class:`QueueStats`.

Each rule yields an :class:`~runtime.alerts.Alert` and whether it fires now;
the caller hands both to the alerter, which pages on the first firing check
and resolves on the first clear one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.monitor.queue_stats import QueueStats
from runtime.alerts import Alert, Severity
from runtime.settings import Settings

BACKLOG = "QueueBacklog"
OLDEST_JOB_AGE = "QueueOldestJobAge"
FAILURE_RATE = "QueueFailureRate"
NO_CONSUMER = "QueueNoConsumer"


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds, each with per-queue overrides (a queue not named takes the default)."""

    backlog: int
    backlog_by_queue: dict[str, float]
    oldest_age_s: float
    oldest_age_s_by_queue: dict[str, float]
    failure_ratio: float
    failure_min_attempts: int
    no_consumer_grace_s: float
    failure_ratio_by_queue: dict[str, float] = field(default_factory=dict)
    no_consumer_grace_s_by_queue: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        """The thresholds the settings name (``SHOPFLOW_MONITOR_*``)."""
        return cls(
            backlog=settings.monitor_backlog_threshold,
            backlog_by_queue=dict(settings.monitor_backlog_thresholds),
            oldest_age_s=settings.monitor_oldest_age_threshold_s,
            oldest_age_s_by_queue=dict(settings.monitor_oldest_age_thresholds_s),
            failure_ratio=settings.monitor_failure_rate_threshold,
            failure_min_attempts=settings.monitor_failure_rate_min_jobs,
            no_consumer_grace_s=settings.monitor_no_consumer_grace_s,
            failure_ratio_by_queue=dict(settings.monitor_failure_rate_thresholds),
            no_consumer_grace_s_by_queue=dict(settings.monitor_no_consumer_graces_s),
        )

    def backlog_for(self, queue: str) -> float:
        """Most jobs that may wait in ``queue`` before it alerts."""
        return self.backlog_by_queue.get(queue, self.backlog)

    def oldest_age_s_for(self, queue: str) -> float:
        """Longest a job may wait in ``queue`` before it alerts."""
        return self.oldest_age_s_by_queue.get(queue, self.oldest_age_s)

    def failure_ratio_for(self, queue: str) -> float:
        """Largest share of failed attempts ``queue`` may have before it alerts."""
        return self.failure_ratio_by_queue.get(queue, self.failure_ratio)

    def no_consumer_grace_s_for(self, queue: str) -> float:
        """How long work may wait in ``queue`` with no consumer before it alerts."""
        return self.no_consumer_grace_s_by_queue.get(queue, self.no_consumer_grace_s)


def evaluate(stats: QueueStats, limits: Thresholds) -> list[tuple[Alert, bool]]:
    """Every rule's alert for the queue and whether it fires now."""
    return [
        _backlog(stats, limits), _oldest_age(stats, limits), _failure_rate(stats, limits),
        _no_consumer(stats, limits),
    ]


def _labels(stats: QueueStats) -> dict[str, str]:
    return {"queue": stats.queue}


def _backlog(stats: QueueStats, limits: Thresholds) -> tuple[Alert, bool]:
    limit = limits.backlog_for(stats.queue)
    alert = Alert(BACKLOG, Severity.WARNING,
                  f"{stats.waiting} jobs wait in {stats.queue} (limit {limit:g})",
                  _labels(stats), {"waiting": stats.waiting, "limit": limit})
    return alert, stats.waiting > limit


def _oldest_age(stats: QueueStats, limits: Thresholds) -> tuple[Alert, bool]:
    limit_s = limits.oldest_age_s_for(stats.queue)
    age_s = stats.oldest_waiting_age_s or 0.0
    alert = Alert(OLDEST_JOB_AGE, Severity.WARNING,
                  f"the oldest job in {stats.queue} has waited {age_s:.0f}s (limit {limit_s:g}s)",
                  _labels(stats), {"oldest_waiting_age_s": round(age_s, 1), "limit_s": limit_s})
    return alert, age_s > limit_s


def _failure_rate(stats: QueueStats, limits: Thresholds) -> tuple[Alert, bool]:
    ratio = stats.failure_ratio or 0.0
    limit = limits.failure_ratio_for(stats.queue)
    alert = Alert(FAILURE_RATE, Severity.CRITICAL,
                  f"{ratio:.0%} of {stats.attempts_in_window} attempts failed in {stats.queue} "
                  f"(limit {limit:.0%})", _labels(stats),
                  {"failures": stats.failures_in_window, "attempts": stats.attempts_in_window,
                   "limit": limit})
    firing = stats.attempts_in_window >= limits.failure_min_attempts and ratio > limit
    return alert, firing


def _no_consumer(stats: QueueStats, limits: Thresholds) -> tuple[Alert, bool]:
    age_s = stats.oldest_waiting_age_s or 0.0
    alert = Alert(NO_CONSUMER, Severity.CRITICAL,
                  f"{stats.waiting} jobs wait in {stats.queue} and no live worker consumes it",
                  _labels(stats), {"waiting": stats.waiting, "oldest_waiting_age_s": age_s})
    grace_s = limits.no_consumer_grace_s_for(stats.queue)
    firing = stats.waiting > 0 and stats.consumers == 0 and age_s >= grace_s
    return alert, firing
