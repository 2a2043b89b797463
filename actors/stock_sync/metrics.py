"""The stock syncer's Prometheus metrics, built per process on a registry it is given."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.circuit import BreakerState

# Error kinds, so a dashboard can tell a slow warehouse from a broken one.
ERROR_KINDS = ("timeout", "http", "malformed", "circuit_open", "database", "other")
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True)
class StockSyncMetrics:
    """Counters and gauges of the syncer (names in docs/externals.md)."""

    checked: Counter
    changed: Counter
    conflicts: Counter
    errors: Counter
    runs: Counter
    duration: Histogram
    last_success: Gauge
    overdue: Gauge
    breaker: Gauge

    def breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        """Hook for :class:`runtime.circuit.CircuitBreaker` ``on_change``."""
        self.breaker.labels(circuit=name).set(_BREAKER_VALUE[new])


def build_metrics(registry: CollectorRegistry) -> StockSyncMetrics:
    """Create the syncer's metrics on ``registry`` (call once per registry, after start-up)."""
    errors = Counter("shopflow_stock_sync_errors", "Failed warehouse batches, by kind",
                     ["kind"], registry=registry)
    for kind in ERROR_KINDS:
        errors.labels(kind=kind)
    runs = Counter("shopflow_stock_sync_runs", "Sync runs by outcome (ok, partial, failed, stopped)",
                   ["outcome"], registry=registry)
    return StockSyncMetrics(
        checked=Counter("shopflow_stock_sync_products_checked",
                        "Products whose warehouse stock was read", registry=registry),
        changed=Counter("shopflow_stock_sync_products_changed",
                        "Products whose quantity the sync changed", registry=registry),
        conflicts=Counter("shopflow_stock_sync_conflicts",
                          "Stock conflicts opened (warehouse below local reservations)",
                          registry=registry),
        errors=errors,
        runs=runs,
        duration=Histogram("shopflow_stock_sync_duration_seconds", "Duration of one sync run",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
                           registry=registry),
        last_success=Gauge("shopflow_stock_sync_last_success_timestamp_seconds",
                           "Unix time of the last sync in which every batch succeeded",
                           registry=registry),
        overdue=Gauge("shopflow_stock_sync_overdue",
                      "1 when no sync succeeded for the alert number of intervals",
                      registry=registry),
        breaker=Gauge("shopflow_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                      ["circuit"], registry=registry),
    )
