"""Housekeeping and scheduled-run figures into the runtime's Prometheus metrics.

One object is both the :class:`~actors.housekeeping.actor.HousekeepingMeter`
(cleanup counts) and the scheduler middleware's
:class:`~runtime.scheduling.middleware.RunObserver` (every scheduled run's
outcome, duration and last success, labelled by schedule name).
"""

from __future__ import annotations

import time

from runtime.metrics import Metrics


class PrometheusMeter:
    """Feeds ``shopflow_carts_cleaned``, ``shopflow_reservations_released`` and the
    ``shopflow_cron_*`` metrics. Called from the loop and from worker threads; the
    prometheus-client objects are thread-safe."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def carts_deleted(self, count: int) -> None:
        """Count anonymous carts removed."""
        self._metrics.carts_cleaned.inc(count)

    def reservations_released(self, count: int) -> None:
        """Count expired reservations released."""
        self._metrics.reservations_released.inc(count)

    def run_finished(self, schedule: str, outcome: str, duration_s: float | None) -> None:
        """Count a scheduled run by outcome; time it; remember its last success."""
        self._metrics.cron_runs.labels(schedule, outcome).inc()
        if duration_s is not None:
            self._metrics.cron_duration.labels(schedule).observe(duration_s)
        if outcome == "succeeded":
            self._metrics.cron_last_success.labels(schedule).set(time.time())
