"""The stock syncer's Prometheus metrics, built per process, never at import.

The four metrics every process shares (runs, products checked, errors, last
success) are defined once in :mod:`runtime.metrics` and summed across
processes by the api's ``/metrics``; the daemon passes that ``Metrics``
object in. The syncer's own detail (changes, conflicts, errors by kind,
duration, the overdue flag, the breaker) is created here on the registry it
is given. Without a shared object (tests, tools) all of them are created on
the registry, with the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.circuit import BreakerState
from runtime.metrics import Metrics

# Error kinds, so a dashboard can tell a slow warehouse from a broken one.
ERROR_KINDS = ("timeout", "http", "malformed", "circuit_open", "database", "other")
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
RUN_DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)


@dataclass(frozen=True)
class StockSyncMetrics:
    """Counters and gauges of the syncer (names in docs/externals.md)."""

    runs: Counter
    checked: Counter
    errors: Counter
    last_success: Gauge
    batch_errors: Counter
    changed: Counter
    conflicts: Counter
    duration: Histogram
    overdue: Gauge
    breaker: Gauge

    def breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        """Hook for :class:`runtime.circuit.CircuitBreaker` ``on_change``."""
        self.breaker.labels(circuit=name).set(_BREAKER_VALUE[new])


def _shared_on(registry: CollectorRegistry) -> tuple[Counter, Counter, Counter, Gauge]:
    """The shared four, as :mod:`runtime.metrics` defines them, on a private registry."""
    return (
        Counter("shopflow_stock_sync_runs", "Stock sync rounds by outcome.", ["outcome"],
                registry=registry),
        Counter("shopflow_stock_sync_products_checked", "Products compared with the warehouse.",
                registry=registry),
        Counter("shopflow_stock_sync_errors", "Products or rounds the stock sync could not "
                "complete.", registry=registry),
        Gauge("shopflow_stock_sync_last_success_timestamp_seconds",
              "When a stock sync round last completed.", multiprocess_mode="max",
              registry=registry),
    )


def build_metrics(registry: CollectorRegistry, shared: Metrics | None = None) -> StockSyncMetrics:
    """Create the syncer's metrics on ``registry`` (once per registry, after start-up)."""
    if shared is not None:
        runs, checked, errors, last_success = (
            shared.stock_sync_runs, shared.stock_sync_products_checked, shared.stock_sync_errors,
            shared.stock_sync_last_success)
    else:
        runs, checked, errors, last_success = _shared_on(registry)
    batch_errors = Counter("shopflow_stock_sync_batch_errors", "Failed warehouse batches, by kind",
                           ["kind"], registry=registry)
    for kind in ERROR_KINDS:
        batch_errors.labels(kind=kind)
    return StockSyncMetrics(
        runs=runs, checked=checked, errors=errors, last_success=last_success,
        batch_errors=batch_errors,
        changed=Counter("shopflow_stock_sync_products_changed",
                        "Products whose quantity the sync changed", registry=registry),
        conflicts=Counter("shopflow_stock_sync_conflicts",
                          "Stock conflicts opened (warehouse below local reservations)",
                          registry=registry),
        duration=Histogram("shopflow_stock_sync_duration_seconds", "Duration of one sync run",
                           buckets=RUN_DURATION_BUCKETS_S, registry=registry),
        overdue=Gauge("shopflow_stock_sync_overdue",
                      "1 when no sync succeeded for the alert number of intervals",
                      multiprocess_mode="livemax", registry=registry),
        breaker=Gauge("shopflow_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                      ["circuit"], multiprocess_mode="livemax", registry=registry),
    )
