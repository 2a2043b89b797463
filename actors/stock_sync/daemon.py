"""The stock-sync daemon: a pykka actor running :func:`sync_once` on a fixed schedule.

Process layout (one OS process under supervisord, program ``stock-sync``):

- the **main thread** keeps the schedule: run *k* starts at
  ``start + k * interval``; a run that overruns makes the schedule skip the
  ticks it missed rather than bunch runs together. It owns SIGTERM/SIGINT.
- the **StockSyncActor** (a pykka thread) is asked to run one sync per tick,
  through the process's root :class:`runtime.supervision.Supervisor`
  (``stock-sync-root``, child ``stock-syncer``, restart type permanent): a
  crashed actor is restarted on the next tick; when the supervisor gives up
  it escalates and the process exits with code 70 so supervisord restarts it.
  The root is wired like a worker's
  (:func:`runtime.root.attach_process_supervision`): every restart is a log
  line, an event in Redis and a metric, and the tree is published for
  ``shopflow tree``.
- the **loop thread** (:class:`runtime.loop.LoopBridge`) owns every async
  resource: the asyncpg pool, the aiohttp session, the Redis client of the
  alerter, and, when no ``WAREHOUSE_URL`` is set, the warehouse simulator
  the syncer talks to.

After every run the daemon hands the alert condition ("no successful sync
for N intervals") to :class:`runtime.alerts.Alerter` on the loop, without
waiting: it pages once when the condition starts (``StockSyncOverdue``,
critical) and resolves once when it has cleared.

SIGTERM sets the stop flag: the batches in flight finish (their
transactions commit), the rest of the run is skipped, the daemon exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, cast

import aiohttp
import asyncpg
import pykka
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from actors.stock_sync.metrics import StockSyncMetrics, build_metrics
from actors.stock_sync.sync import SyncDeps, SyncHealth, SyncReport, sync_once
from actors.stock_sync.warehouse_client import HttpWarehouse
from runtime import db, embedded
from runtime.actor import MailboxConfig, SupervisedActor
from runtime.alerts import Alert, AlertDispatcher, Alerter, Severity
from runtime.circuit import CircuitBreaker
from runtime.errors import ActorUnavailable
from runtime.http import RetryPolicy
from runtime.loop import LoopBridge
from runtime.metrics import Metrics, get_metrics, render_metrics
from runtime.root import (
    ProcessSupervision,
    SharedSupervisionMetrics,
    attach_process_supervision,
    exit_process_on_escalate,
)
from runtime.settings import Settings
from runtime.supervision import (
    ChildSpec,
    EscalationHook,
    MetricsSink,
    Restart,
    Supervisor,
    supervisor_options,
)

log = logging.getLogger(__name__)

# A run may use this share of the interval; the rest is slack so the next
# run starts on time even when the warehouse hangs.
RUN_BUDGET_FRACTION = 0.8
# Extra wait for the actor's answer beyond the run's budget (DB commit, teardown).
ASK_MARGIN_S = 5.0
CHILD_ID = "stock-syncer"
# The daemon's name in the supervision tree (``shopflow tree``).
PROCESS_NAME = "stock-sync"
# The alert raised while no sync succeeds (ops/prometheus/alerts.yml has the same
# condition, from the metrics, as ShopflowStockSyncStale).
OVERDUE_ALERT = "StockSyncOverdue"


@dataclass(frozen=True)
class SyncNow:
    """Message: run one sync and answer with its :class:`SyncReport`."""


class StockSyncActor(SupervisedActor):
    """Thin actor around :func:`sync_once`; its (bounded) mailbox serialises runs.

    ``on_receive`` runs in the actor's own thread and hands the coroutine to
    the process's loop through the bridge. A bug escaping it crashes the actor
    (the supervisor restarts it, with the cause in the restart's reason); a
    database outage goes back to the daemon as a failed run.
    """

    def __init__(self, bridge: LoopBridge, deps: SyncDeps, ask_timeout_s: float,
                 mailbox: MailboxConfig | None = None) -> None:
        super().__init__(mailbox=mailbox)
        self._bridge = bridge
        self._deps = deps
        self._ask_timeout_s = ask_timeout_s

    def on_receive(self, message: Any) -> Any:
        """Run one sync for a :class:`SyncNow`; anything else is a programming error."""
        if isinstance(message, SyncNow):
            return self._bridge.run(sync_once(self._deps), timeout_s=self._ask_timeout_s)
        raise TypeError(f"StockSyncActor does not understand {message!r}")


@dataclass
class Resources:
    """What lives on the loop thread; opened by :func:`open_resources`, closed by ``close``."""

    pool: asyncpg.Pool
    session: aiohttp.ClientSession
    warehouse_url: str
    redis: aioredis.Redis
    simulator: web.AppRunner | None = None

    async def close(self) -> None:
        """Close in reverse order of opening."""
        await self.redis.aclose()
        await self.session.close()
        await self.pool.close()
        if self.simulator is not None:
            await self.simulator.cleanup()


async def open_resources(settings: Settings) -> Resources:
    """Pool, HTTP session and (without WAREHOUSE_URL) a local warehouse simulator.

    The simulator is started on ``SHOPFLOW_WAREHOUSE_SIM_PORT``, or the one
    already listening there is used (the flow worker's, or ``shopflow
    simulators``): ``ops/simulators/embedded.py``.
    """
    from ops.simulators.embedded import embedded_warehouse_app, start_or_reuse

    redis_url, database_url = settings.require_urls()
    pool = await db.create_pool(database_url, min_size=1, max_size=settings.stock_sync_concurrency + 1)
    redis = aioredis.Redis.from_url(redis_url)
    session = aiohttp.ClientSession()
    simulator = None
    url = settings.warehouse_url
    if url is None:
        url = f"http://127.0.0.1:{settings.warehouse_sim_port}"
        simulator = await start_or_reuse("warehouse", embedded_warehouse_app(settings),
                                         settings.warehouse_sim_port)
        log.info("no WAREHOUSE_URL set: syncing from the warehouse simulator at %s", url)
    return Resources(pool, session, url, redis, simulator)


@dataclass
class Schedule:
    """Fixed-rate ticks: tick k is due at ``start_s + k * interval_s``."""

    interval_s: float
    start_s: float
    tick: int = 0

    def due_at(self) -> float:
        """When the current tick is due."""
        return self.start_s + self.tick * self.interval_s

    def advance(self, now_s: float) -> int:
        """Move to the next tick due after ``now_s``; return how many ticks were skipped."""
        next_tick = self.tick + 1
        behind = int((now_s - self.start_s) // self.interval_s) + 1
        skipped = max(0, behind - next_tick)
        self.tick = max(next_tick, behind)
        return skipped


@dataclass(frozen=True)
class RunRecord:
    """One scheduled run as the daemon saw it (for logs and tests)."""

    tick: int
    due_s: float
    started_s: float
    report: SyncReport | None
    error: str | None = None


@dataclass
class StockSyncDaemon:
    """Owns the actor, the schedule and the stop flag of one stock-sync process."""

    settings: Settings
    bridge: LoopBridge
    resources: Resources
    metrics: StockSyncMetrics
    stop: threading.Event = field(default_factory=threading.Event)
    on_run: Callable[[RunRecord], None] | None = None
    clock: Callable[[], float] = time.monotonic
    # Where restarts are counted (the shared metrics in production, see build_daemon).
    supervision_metrics: MetricsSink | None = None
    # What a root that gave up does: end the process with exit code 70 (tests record it).
    on_escalate: EscalationHook = field(default_factory=exit_process_on_escalate)
    # Wall time of the alert condition and its incidents (tests pass their own).
    wall_clock: Callable[[], float] = time.time
    shared: Metrics | None = None
    breaker: CircuitBreaker = field(init=False)
    health: SyncHealth = field(init=False)
    root: Supervisor = field(init=False)
    reporting: ProcessSupervision = field(init=False)
    alerter: Alerter = field(init=False)
    alerts: AlertDispatcher = field(init=False)
    _overdue: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.breaker = CircuitBreaker("warehouse", failure_threshold=s.breaker_failures,
                                      reset_timeout_s=s.breaker_reset_s,
                                      on_change=self.metrics.breaker_changed)
        self.metrics.breaker.labels(circuit="warehouse").set(0)
        self.health = SyncHealth(s.stock_sync_interval_s, s.stock_sync_alert_intervals,
                                 self.wall_clock())
        self.alerter = Alerter(s, self.resources.redis, self.shared, clock=self.wall_clock)
        self.alerts = AlertDispatcher(self.bridge)
        child = ChildSpec(CHILD_ID, lambda: StockSyncActor.start(
            self.bridge, self.deps(), self.budget_s + ASK_MARGIN_S,
            MailboxConfig.from_settings(s)), Restart.PERMANENT,
            shutdown_timeout_s=self.budget_s + ASK_MARGIN_S)
        # Intensity and back-off are the operator's (SHOPFLOW_SUPERVISOR_*, *_RESTART_BACKOFF_*).
        self.root = Supervisor(f"{PROCESS_NAME}-root", [child], on_escalate=self.on_escalate,
                               **supervisor_options(s))
        self.reporting = attach_process_supervision(s, PROCESS_NAME, self.root,
                                                    self.supervision_metrics)
        try:
            self.root.start()
        except BaseException:
            self.reporting.stop()
            raise
        self.reporting.start()

    @property
    def budget_s(self) -> float:
        """The most one run may take."""
        return self.settings.stock_sync_interval_s * RUN_BUDGET_FRACTION

    def deps(self) -> SyncDeps:
        """The collaborators of :func:`sync_once` for this process."""
        s = self.settings
        client = HttpWarehouse(
            session=self.resources.session, base_url=self.resources.warehouse_url,
            breaker=self.breaker,
            policy=RetryPolicy(attempts=s.external_attempts, base_backoff_s=s.external_backoff_s,
                               max_backoff_s=s.external_backoff_s * 8),
            connect_timeout_s=s.external_connect_timeout_s,
            read_timeout_s=s.external_read_timeout_s, token=s.warehouse_token)
        return SyncDeps(pool=self.resources.pool, warehouse=client, metrics=self.metrics,
                        batch_size=s.stock_sync_batch_size, concurrency=s.stock_sync_concurrency,
                        deadline_s=self.budget_s, should_stop=self.stop.is_set)

    def run_once(self, tick: int = 0, due_s: float | None = None) -> RunRecord:
        """Ask the actor for one run; a failed ask is recorded, never raised."""
        started = self.clock()
        try:
            report = cast(SyncReport, self.root.ask(CHILD_ID, SyncNow(), self.budget_s + ASK_MARGIN_S))
            record = RunRecord(tick, due_s or started, started, report)
        except (ActorUnavailable, pykka.Timeout) as exc:
            log.warning("stock syncer unavailable this tick: %s", exc)
            record = RunRecord(tick, due_s or started, started, None, f"actor: {exc!r}")
        except Exception as exc:  # the run itself failed (e.g. database down): count it, go on
            log.exception("stock sync run failed")
            self.metrics.runs.labels(outcome="failed").inc()
            record = RunRecord(tick, due_s or started, started, None, repr(exc))
        if record.report is not None:
            self.health.record(record.report, self.wall_clock())
        self._check_overdue()
        if self.on_run is not None:
            self.on_run(record)
        return record

    def _check_overdue(self) -> None:
        """Gauge, log and alert (paged once, resolved once) for the overdue condition."""
        overdue = self.overdue()
        self.metrics.overdue.set(1 if overdue else 0)
        if overdue and not self._overdue:
            log.error("no stock sync succeeded for %d intervals", self.health.alert_after_intervals,
                      extra={"alert": "stock-sync-overdue"})
        self._overdue = overdue
        # The alerter decides whether this check pages or resolves; this thread does not wait.
        self.alerts.submit(self.alerter.update(self.overdue_alert(), overdue),
                           what="stock-sync overdue alert", key=OVERDUE_ALERT)

    def overdue(self) -> bool:
        """The alert condition: no successful sync for the configured number of intervals."""
        return self.health.overdue(self.wall_clock())

    def overdue_alert(self) -> Alert:
        """The incident the condition raises (same labels every time: one incident)."""
        h = self.health
        last = h.last_success_s
        return Alert(
            OVERDUE_ALERT, Severity.CRITICAL,
            f"no stock sync succeeded for {h.alert_after_intervals} intervals "
            f"({h.alert_after_intervals * h.interval_s:g} s); stock may drift from the warehouse",
            details={"last_success_at": None if last is None else _iso_s(last),
                     "interval_s": h.interval_s, "warehouse_url": self.resources.warehouse_url})

    def run_forever(self) -> int:
        """Run on schedule until the stop flag is set; return the exit code."""
        schedule = Schedule(self.settings.stock_sync_interval_s, self.clock())
        while not self.stop.is_set():
            self.run_once(schedule.tick, schedule.due_at())
            skipped = schedule.advance(self.clock())
            if skipped:
                log.warning("stock sync overran; skipped %d tick(s)", skipped)
            self.stop.wait(max(0.0, schedule.due_at() - self.clock()))
        log.info("stock sync stopping: stop requested, current run finished")
        return 0

    def close(self) -> None:
        """Stop the supervision tree and its reporting, let alerts in flight finish, close."""
        self.root.stop()
        self.reporting.stop()
        if not self.alerts.drain(self.alerter.max_delivery_s() + 1.0):
            log.error("stock-sync alerts still undelivered at shutdown")
        self.bridge.run(self.resources.close(), timeout_s=10)


def _iso_s(at_s: float) -> str:
    return datetime.fromtimestamp(at_s, UTC).isoformat()


def build_daemon(settings: Settings, registry: CollectorRegistry, bridge: LoopBridge,
                 shared: Metrics | None = None, **kwargs: Any) -> StockSyncDaemon:
    """Open the resources on ``bridge`` and build the daemon (not yet running).

    ``shared`` is the process's :func:`runtime.metrics.get_metrics` object in
    production (the api's ``/metrics`` sums it with every other process,
    supervision's restarts included); tests leave it out and read ``registry``.
    """
    resources = bridge.run(open_resources(settings), timeout_s=30)
    if shared is not None:
        kwargs.setdefault("supervision_metrics", SharedSupervisionMetrics(shared))
    return StockSyncDaemon(settings, bridge, resources, build_metrics(registry, shared),
                           shared=shared, **kwargs)


async def start_metrics_endpoint(settings: Settings, port: int) -> web.AppRunner:
    """``GET /metrics`` on ``port``: the summed multiprocess files, as the api serves them.

    For hosts where no api process runs next to the daemon.
    """

    async def handle(request: web.Request) -> web.Response:
        body, content_type = await asyncio.to_thread(render_metrics, settings)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def _install_signal_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _cmd_stock_sync(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.ensure_services(settings)
    bridge = LoopBridge("stock-sync-loop").start()
    daemon = build_daemon(settings, CollectorRegistry(), bridge, shared=get_metrics(settings))
    _install_signal_handlers(daemon.stop)
    endpoint = None
    if settings.stock_sync_metrics_port and not args.once:
        try:
            endpoint = bridge.run(start_metrics_endpoint(settings, settings.stock_sync_metrics_port))
        except OSError as exc:
            # Metrics are worth a warning, not worth stopping the stock sync for.
            log.warning("cannot serve metrics on port %d: %s", settings.stock_sync_metrics_port, exc)
    try:
        if args.once:
            record = daemon.run_once()
            print(json.dumps(asdict(record.report) if record.report else {"error": record.error},
                             default=str))
            return 0 if record.report is not None and record.report.succeeded else 1
        return daemon.run_forever()
    finally:
        if endpoint is not None:
            bridge.run(endpoint.cleanup())
        daemon.close()
        bridge.stop()


def register(subparsers: Any) -> None:
    """Entry point for ``shopflow.commands``: adds ``shopflow stock-sync``."""
    from runtime.cli import add_command

    parser = add_command(subparsers, "stock-sync", _cmd_stock_sync,
                         "run the stock-sync daemon (warehouse -> inventory)",
                         "run the stock-sync daemon (warehouse -> inventory every interval)")
    parser.add_argument("--once", action="store_true", help="run one sync, print its report, exit")
