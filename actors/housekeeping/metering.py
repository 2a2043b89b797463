"""Housekeeping figures into the runtime's Prometheus metrics.

:class:`PrometheusMeter` is both the
:class:`~actors.housekeeping.actor.HousekeepingMeter` (cleanup counts) and,
through :class:`~runtime.scheduling.metering.ScheduleMetrics`, the scheduler
middleware's :class:`~runtime.scheduling.middleware.RunObserver` (every
scheduled run's outcome, duration and last success). Every worker process
gets the run figures anyway (``runtime.worker`` wires ``ScheduleMetrics``).
"""

from __future__ import annotations

from runtime.metrics import Metrics
from runtime.scheduling.metering import ScheduleMetrics


class PrometheusMeter(ScheduleMetrics):
    """Feeds ``shopflow_carts_cleaned``, ``shopflow_reservations_released`` and the
    ``shopflow_cron_*`` metrics. Called from the loop and from worker threads; the
    prometheus-client objects are thread-safe."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        self._cleanup = metrics

    def carts_deleted(self, count: int) -> None:
        """Count anonymous carts removed."""
        self._cleanup.carts_cleaned.inc(count)

    def reservations_released(self, count: int) -> None:
        """Count expired reservations released."""
        self._cleanup.reservations_released.inc(count)
