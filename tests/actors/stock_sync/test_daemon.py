"""The stock-sync daemon: schedule, hangs, malformed answers, restarts, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import pykka
import pytest
import redis
from prometheus_client import CollectorRegistry

from actors.stock_sync.daemon import (
    CHILD_ID,
    PROCESS_NAME,
    RunRecord,
    StockSyncActor,
    StockSyncDaemon,
    build_daemon,
)
from ops.simulators.embedded import SIMULATOR_SEED
from ops.simulators.warehouse import load_stock_file, quantity_for
from runtime.circuit import BreakerState
from runtime.errors import ActorUnavailable
from runtime.loop import LoopBridge
from runtime.metrics import render_metrics
from runtime.settings import Settings
from runtime.tree import TREE_REPORTER_CHILD, process_key
from tests.actors.stock_sync.conftest import Warehouse, link_products
from tests.runtime.webhook_receiver import webhook_receiver
from tests.support import free_port, http_ready, next_supervision_event, published_root, wait_until


def _daemon_settings(settings: Settings, warehouse: Warehouse, interval_s: float) -> Settings:
    return replace(settings, warehouse_url=warehouse.url, stock_sync_interval_s=interval_s,
                   external_read_timeout_s=0.15, external_connect_timeout_s=0.5,
                   external_attempts=2, external_backoff_s=0.01, stock_sync_batch_size=10,
                   stock_sync_concurrency=2, breaker_failures=100)


class Runs:
    """Collects run records; lets the test wait for the n-th without sleeping."""

    def __init__(self, daemon_stop_after: int) -> None:
        self.records: list[RunRecord] = []
        self.enough = threading.Event()
        self.stop_after = daemon_stop_after
        self.daemon: StockSyncDaemon | None = None
        self.hooks: dict[int, object] = {}

    def __call__(self, record: RunRecord) -> None:
        self.records.append(record)
        hook = self.hooks.get(len(self.records))
        if callable(hook):
            hook()
        if len(self.records) >= self.stop_after and self.daemon is not None:
            self.daemon.stop.set()
            self.enough.set()


async def _run_daemon(settings: Settings, runs: Runs) -> StockSyncDaemon:
    bridge = LoopBridge("test-stock-sync").start()
    daemon = await asyncio.to_thread(build_daemon, settings, CollectorRegistry(), bridge, on_run=runs)
    runs.daemon = daemon
    try:
        assert await asyncio.wait_for(asyncio.to_thread(daemon.run_forever), 30) == 0
    finally:
        await asyncio.to_thread(daemon.close)
        await asyncio.to_thread(bridge.stop)
    return daemon


@pytest.mark.slow
async def test_hanging_warehouse_each_poll_fails_in_time_and_next_runs_on_schedule(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    await link_products(pool, 15)
    warehouse.set_faults(hang_rate=1.0)
    interval_s = 0.8
    runs = Runs(daemon_stop_after=3)
    daemon = await _run_daemon(_daemon_settings(settings, warehouse, interval_s), runs)

    assert [r.tick for r in runs.records] == [0, 1, 2]  # no tick skipped: none overran
    for record in runs.records:
        assert record.report is not None and record.report.outcome == "failed"
        assert set(record.report.error_kinds) == {"timeout"}
        assert record.report.duration_s < interval_s
    assert daemon.health.last_success_s is None


@pytest.mark.slow
async def test_malformed_answers_do_not_kill_the_actor(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    await link_products(pool, 15)
    warehouse.set_faults(malformed_rate=1.0)
    runs = Runs(daemon_stop_after=3)
    runs.hooks[2] = lambda: warehouse.set_faults()
    daemon = await _run_daemon(_daemon_settings(settings, warehouse, 0.3), runs)

    outcomes = [r.report.outcome for r in runs.records if r.report]
    assert outcomes == ["failed", "failed", "ok"]
    child, _reporter = daemon.root.snapshot()
    assert child.restarts == 0  # the same actor served every run
    assert daemon.health.last_success_s is not None
    assert await pool.fetchval("SELECT count(*) FROM inventory WHERE synced_at IS NOT NULL") > 0


async def test_a_dead_actor_is_restarted(settings: Settings, pool: asyncpg.Pool,
                                         warehouse: Warehouse) -> None:
    await link_products(pool, 3)
    bridge = LoopBridge("test-stock-sync").start()
    daemon = await asyncio.to_thread(build_daemon, _daemon_settings(settings, warehouse, 1.0),
                                     CollectorRegistry(), bridge)
    try:
        # The tree is published for `shopflow tree`, like a worker's.
        root = await asyncio.to_thread(published_root, settings, PROCESS_NAME)
        assert root["name"] == "stock-sync-root"
        assert [c["id"] for c in root["children"]] == [CHILD_ID, TREE_REPORTER_CHILD]
        first = await asyncio.to_thread(daemon.run_once)
        [ref] = pykka.ActorRegistry.get_by_class(StockSyncActor)
        ref.tell("not a message it knows")  # raises in on_receive: the actor crashes
        await asyncio.to_thread(ref.actor_stopped.wait, 10)
        # The restart is an event in Redis, not only a log line.
        restart = await asyncio.to_thread(next_supervision_event, settings, "restart", CHILD_ID)
        assert restart["process"] == PROCESS_NAME and "TypeError" in restart["reason"]
        second = await asyncio.to_thread(daemon.run_once)
        assert first.report is not None and second.report is not None
        assert second.report.outcome == "ok"
        assert [(c.alive, c.restarts) for c in daemon.root.snapshot()] == [(True, 1), (True, 0)]
    finally:
        await asyncio.to_thread(daemon.close)
        await asyncio.to_thread(bridge.stop)
    client = redis.Redis.from_url(settings.redis_url or "")
    try:  # a clean stop removes the process from the view
        assert not client.exists(process_key(settings.namespace, PROCESS_NAME, os.getpid()))
    finally:
        client.close()


async def test_a_root_that_gives_up_escalates_out_of_the_daemon(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    escalated = threading.Event()
    bridge = LoopBridge("test-stock-sync").start()
    daemon = await asyncio.to_thread(
        build_daemon, _daemon_settings(settings, warehouse, 1.0), CollectorRegistry(), bridge,
        on_escalate=lambda error: escalated.set())
    try:
        while not escalated.is_set():  # more crashes than SHOPFLOW_SUPERVISOR_MAX_RESTARTS in the window
            try:
                ref = await asyncio.to_thread(daemon.root.wait_for_ref, CHILD_ID,
                                              time.monotonic() + 10)
            except ActorUnavailable:
                break  # the root gave up meanwhile
            ref.tell("not a message it knows")
            await asyncio.to_thread(ref.actor_stopped.wait, 10)
        assert await asyncio.to_thread(escalated.wait, 10)
        alert = await asyncio.to_thread(next_supervision_event, settings, "escalation", None,
                                        "alerts")
        assert alert["supervisor"] == "stock-sync-root" and alert["process"] == PROCESS_NAME
    finally:
        await asyncio.to_thread(daemon.close)
        await asyncio.to_thread(bridge.stop)


async def test_the_root_takes_its_intensity_and_back_off_from_the_settings(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    """SHOPFLOW_SUPERVISOR_MAX_RESTARTS=0: the first crash of the syncer ends the daemon."""
    escalated = threading.Event()
    configured = replace(_daemon_settings(settings, warehouse, 1.0), supervisor_max_restarts=0,
                         supervisor_max_seconds=30.0, restart_backoff_base_s=0.25)
    bridge = LoopBridge("test-stock-sync").start()
    daemon = await asyncio.to_thread(build_daemon, configured, CollectorRegistry(), bridge,
                                     on_escalate=lambda error: escalated.set())
    try:
        assert (daemon.root.max_restarts, daemon.root.max_seconds,
                daemon.root.backoff_base_s) == (0, 30.0, 0.25)
        [ref] = pykka.ActorRegistry.get_by_class(StockSyncActor)
        ref.tell("not a message it knows")  # one crash
        assert await asyncio.to_thread(escalated.wait, 10)
    finally:
        await asyncio.to_thread(daemon.close)
        await asyncio.to_thread(bridge.stop)


@pytest.mark.slow
async def test_sigterm_finishes_the_current_batch_and_exits_0(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    await link_products(pool, 40)
    warehouse.set_faults(latency_ms=600)
    env = {
        **os.environ, "REDIS_URL": settings.redis_url or "", "DATABASE_URL": settings.database_url or "",
        "WAREHOUSE_URL": warehouse.url, "SHOPFLOW_STOCK_SYNC_INTERVAL_S": "5",
        "SHOPFLOW_STOCK_SYNC_BATCH_SIZE": "10", "SHOPFLOW_STOCK_SYNC_CONCURRENCY": "1",
        "SHOPFLOW_STOCK_SYNC_METRICS_PORT": "0", "SHOPFLOW_VAR_DIR": str(settings.var_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(settings.var_dir / "metrics"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.cli", "stock-sync", env=env,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(20):
            while warehouse.lookups() < 1:  # the first batch is in flight
                await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b'"outcome": "stopped"' in stderr
    assert warehouse.lookups() == 1
    synced = await pool.fetchval("SELECT count(*) FROM inventory WHERE synced_at IS NOT NULL")
    assert 1 <= synced <= 10  # the batch in flight was committed, nothing after it

    # The process wrote its metrics where the api's /metrics sums them.
    body, _ = render_metrics(replace(settings, metrics_dir=settings.var_dir / "metrics"))
    text = body.decode()
    assert 'shopflow_stock_sync_runs_total{outcome="stopped"} 1.0' in text
    assert f"shopflow_stock_sync_products_changed_total {float(synced)}" in text
    assert "shopflow_stock_sync_products_checked_total 10.0" in text


async def test_no_sync_for_n_intervals_pages_once_and_resolves_once(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    await link_products(pool, 3)
    now_s = [10_000.0]
    async with webhook_receiver() as receiver:
        settings = replace(_daemon_settings(settings, warehouse, 30.0),
                           stock_sync_alert_intervals=2, alert_webhook_url=receiver.url,
                           alert_resolve_after_s=60)
        warehouse.set_faults(error_rate=1.0, error_status=503)
        bridge = LoopBridge("test-stock-sync").start()
        daemon = await asyncio.to_thread(build_daemon, settings, CollectorRegistry(), bridge,
                                         wall_clock=lambda: now_s[0])

        async def tick(advance_s: float) -> RunRecord:
            now_s[0] += advance_s
            record = await asyncio.to_thread(daemon.run_once)
            assert await asyncio.to_thread(daemon.alerts.drain, 20)
            return record

        try:
            assert (await tick(0)).report.outcome == "failed"  # type: ignore[union-attr]
            assert receiver.bodies == [], "one failed interval is not yet an incident"
            await tick(61)  # two intervals without a success: page
            [page] = await receiver.wait_for(1)
            await tick(30)  # still overdue: no second page
            warehouse.set_faults()
            assert (await tick(30)).report.outcome == "ok"  # type: ignore[union-attr]
            assert len(receiver.bodies) == 1, "cleared, but not for the resolve hysteresis yet"
            await tick(61)
            await receiver.wait_for(2)
        finally:
            await asyncio.to_thread(daemon.close)
            await asyncio.to_thread(bridge.stop)
    assert [b["status"] for b in receiver.bodies] == ["firing", "resolved"]
    alert = page["alerts"][0]
    assert (alert["labels"]["alertname"], alert["labels"]["severity"]) == ("StockSyncOverdue",
                                                                           "critical")
    assert "no stock sync succeeded for 2 intervals" in alert["annotations"]["summary"]


async def test_overdue_and_circuit_gauges_follow_the_runs(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse) -> None:
    await link_products(pool, 3)
    now_s = [10_000.0]
    settings = replace(_daemon_settings(settings, warehouse, 30.0), stock_sync_alert_intervals=2,
                       breaker_failures=1, breaker_reset_s=0.2)
    warehouse.set_faults(error_rate=1.0, error_status=503)
    registry = CollectorRegistry()
    bridge = LoopBridge("test-stock-sync").start()
    daemon = await asyncio.to_thread(build_daemon, settings, registry, bridge,
                                     wall_clock=lambda: now_s[0])

    def gauge(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    async def tick(advance_s: float) -> RunRecord:
        now_s[0] += advance_s
        return await asyncio.to_thread(daemon.run_once)

    try:
        assert gauge("shopflow_circuit_state", circuit="warehouse") == 0
        assert (await tick(0)).report.outcome == "failed"  # type: ignore[union-attr]
        assert gauge("shopflow_stock_sync_overdue") == 0  # one failed interval is not overdue
        assert gauge("shopflow_circuit_state", circuit="warehouse") == 2  # one failure opens it
        await tick(61)
        assert gauge("shopflow_stock_sync_overdue") == 1  # two intervals without a success
        warehouse.set_faults()
        await asyncio.to_thread(wait_until, lambda: daemon.breaker.state is BreakerState.HALF_OPEN,
                                5, "the breaker's reset timeout")
        assert gauge("shopflow_circuit_state", circuit="warehouse") == 1
        assert (await tick(30)).report.outcome == "ok"  # type: ignore[union-attr]
        assert gauge("shopflow_stock_sync_overdue") == 0
        assert gauge("shopflow_circuit_state", circuit="warehouse") == 0
    finally:
        await asyncio.to_thread(daemon.close)
        await asyncio.to_thread(bridge.stop)


@pytest.mark.slow
@pytest.mark.parametrize("stock_file", [False, True], ids=["own-levels", "stock-file"])
async def test_without_warehouse_url_the_process_serves_the_simulator_and_syncs_from_it(
        settings: Settings, pool: asyncpg.Pool, stock_file: bool) -> None:
    """With SHOPFLOW_WAREHOUSE_SIM_STOCK_FILE the simulator starts with those levels (the ids
    it names), so the syncer never applies the simulator's own ones for them."""
    ext_ids = await link_products(pool, 25)
    sim_port = free_port()
    pinned = {e: 1_000 + i for i, e in enumerate(ext_ids[::2])} if stock_file else {}
    env = {key: value for key, value in os.environ.items() if key != "WAREHOUSE_URL"}
    env.update({
        "REDIS_URL": settings.redis_url or "", "DATABASE_URL": settings.database_url or "",
        "SHOPFLOW_WAREHOUSE_SIM_PORT": str(sim_port), "SHOPFLOW_STOCK_SYNC_INTERVAL_S": "1",
        "SHOPFLOW_STOCK_SYNC_METRICS_PORT": "0", "SHOPFLOW_VAR_DIR": str(settings.var_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(settings.var_dir / "metrics"),
    })
    if stock_file:
        path = settings.var_dir / "warehouse-stock.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(pinned))
        env["SHOPFLOW_WAREHOUSE_SIM_STOCK_FILE"] = str(path)
    expected = {e: pinned.get(e, quantity_for(SIMULATOR_SEED, e, 0)) for e in ext_ids}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.cli", "stock-sync", env=env,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            while await _inventory(pool) != expected:
                assert proc.returncode is None, "stock-sync exited early"
                await asyncio.sleep(0.1)
        assert http_ready(sim_port)  # the process itself serves the simulator there
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"syncing from the warehouse simulator" in stderr
    assert not http_ready(sim_port)  # stopped with its owner


async def _inventory(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT external_id, quantity FROM inventory")
    return {r["external_id"]: r["quantity"] for r in rows}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"CD-1": -1}', '{"CD-1": "7"}',
                                  '{"bad id!": 3}'])
def test_a_bad_stock_file_is_refused_with_its_name(tmp_path: Path, text: str) -> None:
    path = tmp_path / "stock.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="warehouse stock file .*stock.json"):
        load_stock_file(path)
