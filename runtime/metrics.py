"""Prometheus metrics for every ShopFlow process, added up across processes.

Each process writes its metric values to small memory-mapped files in one
directory (prometheus-client's multiprocess mode); whoever serves ``/metrics``
reads all files and adds them up. The rules that make the sums honest:

- The directory is emptied once per start of the tree, by supervisord itself
  before it spawns any program (:func:`prepare_metrics_dir`, called from
  ``runtime/supervisord_startup.py``), never by a process that merely restarts.
- Counters and histograms of a process that exits stay on disk and keep
  counting in the sum, so a restart never makes a counter go backwards.
- Gauges that describe "now" (jobs in progress, mailbox depth, connections)
  use the ``live*`` modes; :func:`mark_process_dead` deletes a dead
  process's live-gauge file, and :func:`render_metrics` does it for every
  process it finds dead, so their values never linger.
- Gauges that must outlive their writer (the last successful cron run, say)
  use ``max``, so a dead scheduler shows up as a stale timestamp, which is
  what the alert rules look for.

Nothing here runs at import time: :func:`get_metrics` builds the process's
:class:`Metrics` on first use. Label values are bounded: queue and actor names
come from declared actors, statuses and outcomes from fixed sets, never ids.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from runtime.settings import Settings

# Job durations: from a 5 ms stock reservation up to the 10 min time limit.
JOB_DURATION_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# Order latency: from checkout to a status, seconds up to a day (delivery is slower still).
ORDER_LATENCY_BUCKETS_S = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1_800.0, 3_600.0, 7_200.0, 21_600.0, 86_400.0,
)
# Cron runs: housekeeping is seconds, reports can take minutes.
CRON_DURATION_BUCKETS_S = (0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

# Gauge modes in which a dead process's file is deleted by mark_process_dead.
_LIVE_MODES = ("liveall", "livesum", "livemax", "livemin", "livemostrecent")

# Label values of shopflow_jobs_total's outcome.
OUTCOME_COMPLETED = "completed"
OUTCOME_FAILED = "failed"
OUTCOME_SKIPPED = "skipped"
OUTCOME_CANCELLED = "cancelled"


@dataclass(frozen=True)
class Metrics:
    """Every metric of the runtime, for one process. Build it with :func:`get_metrics`."""

    # Jobs (recorded for every actor by runtime.metrics_middleware).
    jobs: Counter
    job_duration: Histogram
    job_retries: Counter
    job_dead_letters: Counter
    job_stalls: Counter
    job_requeues: Counter
    jobs_in_progress: Gauge
    # Queues (set by the queue monitor).
    queue_jobs: Gauge
    queue_oldest_job_age: Gauge
    queue_consumers: Gauge
    queue_failure_ratio: Gauge
    monitor_last_check: Gauge
    # Cron and its results.
    cron_runs: Counter
    cron_duration: Histogram
    cron_last_success: Gauge
    cron_missed: Counter
    cron_late: Counter
    cron_started_late: Counter
    cron_expected_interval: Gauge
    carts_cleaned: Counter
    reservations_released: Counter
    # Stock sync.
    stock_sync_runs: Counter
    stock_sync_products_checked: Counter
    stock_sync_errors: Counter
    stock_sync_last_success: Gauge
    # Orders.
    order_latency: Histogram
    # Actors and supervision.
    mailbox_depth: Gauge
    actor_restarts: Counter
    actor_start_failures: Counter
    supervisor_give_ups: Counter
    supervisor_escalations: Counter
    process_fatal: Counter
    # WebSocket and events.
    websocket_connections: Gauge
    websocket_events_sent: Counter
    outbox_lag: Gauge
    outbox_events_published: Counter
    # LLM agents: their metrics are built by actors/agents/metrics.py (shopflow_agent_*).
    # Alerts.
    alerts: Counter
    alert_deliveries: Counter


def _build(registry: CollectorRegistry) -> Metrics:
    """Create every metric on ``registry`` (a private one: values live in the files)."""
    r = registry
    return Metrics(
        jobs=Counter("shopflow_jobs", "Jobs that ended, by outcome (completed, failed for good, "
                     "skipped, cancelled).", ["queue", "actor", "outcome"], registry=r),
        job_duration=Histogram("shopflow_job_duration_seconds", "Time one job attempt ran.",
                               ["queue", "actor"], buckets=JOB_DURATION_BUCKETS_S, registry=r),
        job_retries=Counter("shopflow_job_retries", "Failed attempts that were scheduled again.",
                            ["queue", "actor"], registry=r),
        job_dead_letters=Counter("shopflow_job_dead_letters", "Jobs moved to the dead-letter "
                                 "queue.", ["queue", "actor"], registry=r),
        job_stalls=Counter("shopflow_job_stalls", "Jobs found held by a worker whose heartbeat "
                           "stopped (they are redelivered).", ["queue"], registry=r),
        job_requeues=Counter("shopflow_job_requeues", "Times a job was handed back to its queue "
                             "without using an attempt (a limit held it back, Redis was away); "
                             "not an end.", ["queue", "reason"], registry=r),
        jobs_in_progress=Gauge("shopflow_jobs_in_progress", "Job attempts running now.",
                               ["queue", "actor"], multiprocess_mode="livesum", registry=r),
        queue_jobs=Gauge("shopflow_queue_jobs", "Jobs in a queue by state (waiting, active, "
                         "delayed, failed), from the queue monitor.", ["queue", "state"],
                         multiprocess_mode="livemostrecent", registry=r),
        queue_oldest_job_age=Gauge("shopflow_queue_oldest_job_age_seconds", "Age of the oldest "
                                   "waiting job.", ["queue"], multiprocess_mode="livemostrecent",
                                   registry=r),
        queue_consumers=Gauge("shopflow_queue_consumers", "Live worker processes consuming the "
                              "queue.", ["queue"], multiprocess_mode="livemostrecent", registry=r),
        queue_failure_ratio=Gauge("shopflow_queue_failure_ratio", "Share of attempts that failed "
                                  "in the monitor's window.", ["queue"],
                                  multiprocess_mode="livemostrecent", registry=r),
        monitor_last_check=Gauge("shopflow_queue_monitor_last_check_timestamp_seconds",
                                 "When the queue monitor last finished a check.",
                                 multiprocess_mode="max", registry=r),
        cron_runs=Counter("shopflow_cron_runs", "Cron runs by schedule and outcome.",
                          ["schedule", "outcome"], registry=r),
        cron_duration=Histogram("shopflow_cron_duration_seconds", "Time one cron run took.",
                                ["schedule"], buckets=CRON_DURATION_BUCKETS_S, registry=r),
        cron_last_success=Gauge("shopflow_cron_last_success_timestamp_seconds", "When the "
                                "schedule last ran successfully (kept after its process exits).",
                                ["schedule"], multiprocess_mode="max", registry=r),
        cron_missed=Counter("shopflow_cron_missed", "Slots due while no scheduler ran that did "
                            "not run (skipped, or folded into one catch-up run).", ["schedule"],
                            registry=r),
        cron_late=Counter("shopflow_cron_late", "Slots the scheduler sent after their misfire "
                          "grace (catch-up runs after an outage).", ["schedule"], registry=r),
        cron_started_late=Counter("shopflow_cron_started_late", "Scheduled runs a worker "
                                  "started more than a minute after their slot.", ["schedule"],
                                  registry=r),
        cron_expected_interval=Gauge("shopflow_cron_expected_interval_seconds", "The longest "
                                     "gap between two slots of a built-in schedule (set by "
                                     "the scheduler; the alert rules compare the last success "
                                     "with it).", ["schedule"], multiprocess_mode="mostrecent",
                                     registry=r),
        carts_cleaned=Counter("shopflow_carts_cleaned", "Abandoned carts removed by "
                              "housekeeping.", registry=r),
        reservations_released=Counter("shopflow_reservations_released", "Expired stock "
                                      "reservations released by housekeeping.", registry=r),
        stock_sync_runs=Counter("shopflow_stock_sync_runs", "Stock sync rounds by outcome.",
                                ["outcome"], registry=r),
        stock_sync_products_checked=Counter("shopflow_stock_sync_products_checked",
                                            "Products compared with the warehouse.", registry=r),
        stock_sync_errors=Counter("shopflow_stock_sync_errors", "Products or rounds the stock "
                                  "sync could not complete.", registry=r),
        stock_sync_last_success=Gauge("shopflow_stock_sync_last_success_timestamp_seconds",
                                      "When a stock sync round last completed.",
                                      multiprocess_mode="max", registry=r),
        order_latency=Histogram("shopflow_order_latency_seconds", "Time from an order's creation "
                                "to reaching a status.", ["status"],
                                buckets=ORDER_LATENCY_BUCKETS_S, registry=r),
        mailbox_depth=Gauge("shopflow_mailbox_depth", "Messages waiting in actor mailboxes.",
                            ["actor"], multiprocess_mode="livesum", registry=r),
        actor_restarts=Counter("shopflow_actor_restarts", "Actor restarts by their supervisor.",
                               ["actor"], registry=r),
        actor_start_failures=Counter("shopflow_actor_start_failures", "Actors whose on_start "
                                     "failed (first start or restart).", ["actor"], registry=r),
        supervisor_give_ups=Counter("shopflow_supervisor_give_ups", "Supervisors that hit their "
                                    "restart intensity and stopped their children.",
                                    ["supervisor"], registry=r),
        supervisor_escalations=Counter("shopflow_supervisor_escalations", "Supervisors that gave "
                                       "up (restart intensity exceeded).", ["supervisor"],
                                       registry=r),
        process_fatal=Counter("shopflow_process_fatal", "Programs supervisord gave up "
                              "restarting (FATAL), by program.", ["program"], registry=r),
        websocket_connections=Gauge("shopflow_websocket_connections", "Open WebSocket "
                                    "connections.", multiprocess_mode="livesum", registry=r),
        websocket_events_sent=Counter("shopflow_websocket_events_sent", "Events pushed to "
                                      "WebSocket clients.", ["channel"], registry=r),
        outbox_lag=Gauge("shopflow_outbox_lag_seconds", "Age of the oldest unpublished outbox "
                         "event.", multiprocess_mode="livemax", registry=r),
        outbox_events_published=Counter("shopflow_outbox_events_published", "Outbox events "
                                         "published to Redis.", ["channel"], registry=r),
        alerts=Counter("shopflow_alerts", "Alert notifications by name, severity and status "
                       "(firing, resolved).", ["alertname", "severity", "status"], registry=r),
        alert_deliveries=Counter("shopflow_alert_deliveries", "Webhook deliveries by outcome.",
                                 ["outcome"], registry=r),
    )


def metrics_dir(settings: Settings) -> Path:
    """The multiprocess directory: ``PROMETHEUS_MULTIPROC_DIR`` or ``var/metrics``."""
    return settings.metrics_dir or settings.var_dir / "metrics"


def prepare_metrics_dir(settings: Settings) -> Path:
    """Create the directory and delete every file in it; returns the directory.

    Only the start of the whole tree calls this, before any child starts
    (supervisord, through ``runtime.supervisord_startup``; ``shopflow metrics
    --reset`` by hand): files of the previous run would otherwise be added to
    this one.
    """
    path = metrics_dir(settings)
    path.mkdir(parents=True, exist_ok=True)
    for file in path.glob("*.db"):
        file.unlink(missing_ok=True)
    return path


def mark_process_dead(settings: Settings, pid: int) -> None:
    """Forget the live gauges of process ``pid``, which has exited.

    Its counters and histograms are kept on purpose: they still count in the
    sums, so totals never go backwards when a process restarts.
    """
    path = metrics_dir(settings)
    for mode in _LIVE_MODES:
        (path / f"gauge_{mode}_{pid}.db").unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_processes(settings: Settings) -> list[int]:
    """Mark every process dead whose live-gauge file remains but which is gone.

    Covers processes killed without running their exit hooks (SIGKILL, OOM).
    The directory is per host, so a pid check is meaningful. Returns the pids.
    """
    dead: set[int] = set()
    for file in metrics_dir(settings).glob("gauge_live*_*.db"):
        pid_text = file.stem.rpartition("_")[2]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in dead:
        mark_process_dead(settings, pid)
    return sorted(dead)


# The process's metrics, keyed by directory; empty until get_metrics runs (never at import).
_process_metrics: dict[tuple[int, Path], Metrics] = {}
_process_lock = threading.Lock()


def get_metrics(settings: Settings) -> Metrics:
    """This process's :class:`Metrics`, built on the first call and shared afterwards.

    prometheus-client keeps one file per process and metric type; two
    ``Metrics`` objects writing the same file would overwrite each other, so
    there is exactly one per process and directory. Switches prometheus-client
    into multiprocess mode for the settings' directory (tests that use another
    directory get another ``Metrics``; one directory at a time per process).
    """
    path = metrics_dir(settings)
    key = (os.getpid(), path)
    with _process_lock:
        found = _process_metrics.get(key)
        if found is not None:
            return found
        path.mkdir(parents=True, exist_ok=True)
        # prometheus-client reads this variable when it opens a process's files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        metrics = _build(CollectorRegistry(auto_describe=False))
        _process_metrics[key] = metrics
        atexit.register(_forget_own_live_gauges, settings, os.getpid())
        return metrics


def _forget_own_live_gauges(settings: Settings, pid: int) -> None:
    """At a clean exit, drop this process's live gauges (a forked child inherits the hook)."""
    if os.getpid() == pid:
        mark_process_dead(settings, pid)


class _DirectoryCollector(MultiProcessCollector):
    """prometheus-client's multiprocess collector, minus files still being created.

    A process creates its file empty and then sizes it; a scrape in between
    would fail on the empty file, so empty files are left for the next scrape.
    """

    def collect(self) -> Iterable[Metric]:
        files = [str(f) for f in Path(self._path).glob("*.db") if _size(f) > 0]
        result: Iterable[Metric] = self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return result


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except FileNotFoundError:
        return 0


def render_metrics(settings: Settings) -> tuple[bytes, str]:
    """The ``/metrics`` body adding up every process's files, and its content type.

    Live gauges of processes that died without notice are dropped first.
    """
    path = metrics_dir(settings)
    path.mkdir(parents=True, exist_ok=True)
    sweep_dead_processes(settings)
    registry = CollectorRegistry(auto_describe=False)
    _DirectoryCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
