"""Cleanup counts and scheduled runs reach the runtime's Prometheus metrics."""

from __future__ import annotations

from actors.housekeeping.metering import PrometheusMeter
from runtime.metrics import get_metrics
from runtime.settings import Settings
from tests.runtime.metrics_helpers import scrape, value


def test_prometheus_meter_feeds_the_cron_and_cleanup_metrics(settings: Settings) -> None:
    meter = PrometheusMeter(get_metrics(settings))
    meter.carts_deleted(3)
    meter.reservations_released(7)
    meter.run_finished("expired-carts", "succeeded", 0.25)
    meter.run_finished("expired-carts", "failed", None)
    samples = scrape(settings)
    assert value(samples, "shopflow_carts_cleaned_total") == 3
    assert value(samples, "shopflow_reservations_released_total") == 7
    assert value(samples, "shopflow_cron_runs_total", schedule="expired-carts",
                 outcome="succeeded") == 1
    assert value(samples, "shopflow_cron_runs_total", schedule="expired-carts",
                 outcome="failed") == 1
    assert value(samples, "shopflow_cron_duration_seconds_count", schedule="expired-carts") == 1
    last = value(samples, "shopflow_cron_last_success_timestamp_seconds",
                 schedule="expired-carts")
    assert last is not None and last > 1_700_000_000
