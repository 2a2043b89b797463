"""sync_once against the real warehouse simulator and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from actors.stock_sync.daemon import Schedule
from actors.stock_sync.metrics import RUN_DURATION_BUCKETS_S, build_metrics
from actors.stock_sync.sync import SyncDeps, sync_once, sync_overdue
from actors.stock_sync.warehouse_client import HttpWarehouse, parse_stock_answer
from ops.simulators.warehouse import quantity_for
from runtime import db
from runtime.circuit import BreakerState, CircuitBreaker
from runtime.errors import MalformedResponse
from runtime.http import RetryPolicy
from runtime.settings import Settings
from tests.actors.stock_sync.conftest import (
    InFlight,
    Warehouse,
    link_products,
    make_client,
    unaccepting_address,
)


async def _outbox(pool: asyncpg.Pool, event_type: str) -> list[dict]:
    rows = await pool.fetch("SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id", event_type)
    return [r["payload"] for r in rows]


async def test_normal_sync_writes_only_changes_and_emits_events(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    ext_ids = await link_products(pool, 250)
    registry = CollectorRegistry()
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url),
                    metrics=build_metrics(registry), batch_size=40, concurrency=3)

    report = await sync_once(deps)

    expected = {e: quantity_for(11, e, 0) for e in ext_ids}
    rows = await pool.fetch("SELECT external_id, quantity FROM inventory")
    assert {r["external_id"]: r["quantity"] for r in rows} == expected
    assert report.outcome == "ok" and report.batches == 7 and report.checked == 250
    changed = sum(1 for q in expected.values() if q != 0)
    assert report.changed == changed
    assert len(await _outbox(pool, "stock-updated")) == changed
    assert warehouse.lookups() == 7
    assert registry.get_sample_value("shopflow_stock_sync_products_changed_total") == changed
    assert registry.get_sample_value("shopflow_stock_sync_last_success_timestamp_seconds") > 0

    again = await sync_once(deps)
    assert again.changed == 0 and again.outcome == "ok"
    assert len(await _outbox(pool, "stock-updated")) == changed

    warehouse.state.generation += 1
    moved = sum(1 for e in ext_ids if quantity_for(11, e, 1) != expected[e])
    third = await sync_once(deps)
    assert third.changed == moved and 0 < moved < 60


@contextlib.asynccontextmanager
async def statement_log(database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """A pool whose connections record every statement they send to PostgreSQL."""
    sent: list[str] = []
    logged = await db.create_pool(database_url, min_size=2, max_size=2)
    try:
        async with logged.acquire() as a, logged.acquire() as b:
            for conn in (a, b):
                conn.add_query_logger(lambda record: sent.append(" ".join(record.query.split())))
        yield logged, sent
    finally:
        await logged.close()


def _writes(sent: list[str]) -> list[str]:
    """The data-changing statements among ``sent`` (a CTE counts by what it does)."""
    return [q for q in sent if re.search(r"\b(UPDATE|INSERT INTO|DELETE FROM)\b", q)]


async def test_each_batch_writes_with_one_statement_per_table(
        settings: Settings, pool: asyncpg.Pool, warehouse: Warehouse,
        http_session: aiohttp.ClientSession) -> None:
    ext_ids = await link_products(pool, 120)
    async with statement_log(settings.database_url or "") as (logged, sent):
        deps = SyncDeps(pool=logged, warehouse=make_client(http_session, warehouse.url),
                        batch_size=40, concurrency=2)
        report = await sync_once(deps)
    changed = sum(1 for e in ext_ids if quantity_for(11, e, 0) != 0)
    assert report.outcome == "ok" and report.batches == 3 and report.changed == changed > 3 * 2
    writes = _writes(sent)
    # per batch: ONE inventory UPDATE for all its changed products, ONE outbox INSERT for
    # all their events, ONE conflict-resolution UPDATE; never a statement per product
    assert sum("UPDATE inventory" in q for q in writes) == 3
    assert sum("INSERT INTO outbox" in q for q in writes) == 3
    assert sum("UPDATE stock_conflicts" in q for q in writes) == 3
    assert len(writes) == 9, writes


async def test_warehouse_below_reservations_opens_a_conflict(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 3, quantity=20, reserved=10)
    warehouse.state.pinned.update({"EXT-1": 3, "EXT-2": 30, "EXT-3": 10})
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url))

    report = await sync_once(deps)

    qty = {r["product_id"]: r["quantity"] for r in await pool.fetch("SELECT * FROM inventory")}
    assert qty == {1: 10, 2: 30, 3: 10}
    assert report.conflicts_opened == 1
    conflicts = await pool.fetch("SELECT * FROM stock_conflicts")
    assert [(c["product_id"], c["warehouse_quantity"], c["reserved_quantity"], c["status"])
            for c in conflicts] == [(1, 3, 10, "open")]
    alerts = await _outbox(pool, "stock-conflict")
    assert len(alerts) == 1 and alerts[0]["applied_quantity"] == 10

    # Seen again: still one open conflict, no second alert, nothing written.
    again = await sync_once(deps)
    assert again.conflicts_opened == 0 and again.changed == 0
    assert len(await _outbox(pool, "stock-conflict")) == 1
    assert await pool.fetchval("SELECT count(*) FROM stock_conflicts WHERE status = 'open'") == 1

    warehouse.state.pinned["EXT-1"] = 12
    healed = await sync_once(deps)
    assert healed.conflicts_resolved == 1
    assert await pool.fetchval("SELECT quantity FROM inventory WHERE product_id = 1") == 12
    assert await pool.fetchval("SELECT status FROM stock_conflicts") == "resolved"
    assert len(await _outbox(pool, "stock-conflict-resolved")) == 1


async def test_malformed_answers_change_nothing(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 30)
    warehouse.set_faults(malformed_rate=1.0)
    registry = CollectorRegistry()
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url),
                    metrics=build_metrics(registry), batch_size=10)

    report = await sync_once(deps)

    assert report.outcome == "failed" and set(report.error_kinds) == {"malformed"}
    assert await pool.fetchval("SELECT sum(quantity) FROM inventory") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    assert registry.get_sample_value("shopflow_stock_sync_batch_errors_total",
                                     {"kind": "malformed"}) == 3
    assert registry.get_sample_value("shopflow_stock_sync_errors_total") == 3
    assert registry.get_sample_value("shopflow_stock_sync_last_success_timestamp_seconds") == 0

    warehouse.set_faults()
    assert (await sync_once(deps)).outcome == "ok"


@pytest.mark.parametrize("text", [
    "<html>", "[1]", '{"items": [{"id": "A", "quantity": "3"}]}',
    '{"items": [{"id": "A", "quantity": -1}]}', '{"items": [{"id": "Z", "quantity": 1}]}',
    '{"items": [{"id": "A", "quantity": 1}, {"id": "A", "quantity": 2}]}',
    '{"items": [], "missing": "A"}', '{"items": [{"id": "A", "quantity": true}]}',
])
def test_parse_rejects_anything_but_the_documented_shape(text: str) -> None:
    with pytest.raises(MalformedResponse):
        parse_stock_answer(text, ["A", "B"])


def test_parse_accepts_the_documented_shape() -> None:
    answer = parse_stock_answer('{"items": [{"id": "A", "quantity": 4}], "missing": ["B"]}', ["A", "B"])
    assert answer.quantities == {"A": 4} and answer.missing == ("B",)


async def test_hanging_warehouse_fails_within_the_read_timeout(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 5)
    warehouse.set_faults(hang_rate=1.0)
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url,
                                                     read_timeout_s=0.2, attempts=2))
    report = await sync_once(deps)
    assert report.outcome == "failed" and report.error_kinds == ("timeout",)
    # Two attempts of 0.2 s plus backoff; far below any 1 s interval.
    assert report.duration_s < 1.0


async def test_breaker_opens_fails_fast_and_closes_again(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 50)
    now = [1000.0]
    breaker = CircuitBreaker("warehouse", failure_threshold=2, reset_timeout_s=30,
                             clock=lambda: now[0])
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url, breaker, attempts=1),
                    batch_size=10, concurrency=1)
    warehouse.set_faults(error_rate=1.0, error_status=503)

    failing = await sync_once(deps)
    assert breaker.state is BreakerState.OPEN
    assert failing.error_kinds == ("http", "http", "circuit_open", "circuit_open", "circuit_open")
    assert warehouse.lookups() == 2

    warehouse.set_faults()
    still_open = await sync_once(deps)
    assert set(still_open.error_kinds) == {"circuit_open"} and warehouse.lookups() == 2

    now[0] += 30
    assert breaker.state is BreakerState.HALF_OPEN
    recovered = await sync_once(deps)
    assert recovered.outcome == "ok" and breaker.state is BreakerState.CLOSED


async def test_the_first_run_after_an_outage_is_whole_at_full_concurrency(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 80)
    registry = CollectorRegistry()
    now = [1000.0]
    breaker = CircuitBreaker("warehouse", failure_threshold=2, reset_timeout_s=30,
                             clock=lambda: now[0])
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url, breaker, attempts=1),
                    metrics=build_metrics(registry), batch_size=10, concurrency=4)
    warehouse.set_faults(error_rate=1.0, error_status=503)
    assert (await sync_once(deps)).outcome == "failed" and breaker.state is BreakerState.OPEN
    now[0] += 30
    warehouse.set_faults(latency_ms=50)  # back, and slow enough that the trial is still in flight
    lookups_before = warehouse.lookups()

    recovered = await sync_once(deps)

    # the batches that met the trial in flight waited for it instead of failing
    assert recovered.outcome == "ok" and recovered.checked == 80, recovered
    assert warehouse.lookups() - lookups_before == 8
    assert breaker.snapshot().state is BreakerState.CLOSED
    assert (registry.get_sample_value("shopflow_stock_sync_last_success_timestamp_seconds") or 0) > 0


async def test_unknown_ids_are_reported_not_written(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 4, quantity=7)
    warehouse.state.unknown.add("EXT-2")
    report = await sync_once(SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url)))
    assert report.missing == 1 and report.outcome == "ok"
    assert await pool.fetchval("SELECT quantity FROM inventory WHERE product_id = 2") == 7


def test_overdue_after_n_intervals_without_success() -> None:
    assert not sync_overdue(None, now_s=80, interval_s=30, alert_after_intervals=3, started_at_s=0)
    assert sync_overdue(None, now_s=91, interval_s=30, alert_after_intervals=3, started_at_s=0)
    assert not sync_overdue(100, now_s=150, interval_s=30, alert_after_intervals=3, started_at_s=0)
    assert sync_overdue(100, now_s=191, interval_s=30, alert_after_intervals=3, started_at_s=0)


@pytest.mark.parametrize(("finished_at", "next_tick", "due_at", "skipped"), [
    (0.3, 1, 30.0, 0),    # a normal run: the next one is due on the grid
    (29.9, 1, 30.0, 0),   # a long run that still fits
    (31.0, 2, 60.0, 1),   # overran tick 1's start: tick 1 is skipped, not run late
    (95.0, 4, 120.0, 3),  # a very long run: ticks 1..3 skipped
])
def test_fixed_rate_schedule(finished_at: float, next_tick: int, due_at: float, skipped: int) -> None:
    schedule = Schedule(interval_s=30.0, start_s=0.0)
    assert schedule.advance(finished_at) == skipped
    assert (schedule.tick, schedule.due_at()) == (next_tick, due_at)


async def test_metrics_count_conflicts_and_time_each_run(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 4, quantity=20, reserved=10)
    warehouse.state.pinned.update({"EXT-1": 3, "EXT-2": 30, "EXT-3": 9, "EXT-4": 10})
    registry = CollectorRegistry()
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url),
                    metrics=build_metrics(registry), batch_size=2)

    first = await sync_once(deps)
    second = await sync_once(deps)  # the same two conflicts, still open: not counted again

    assert (first.conflicts_opened, second.conflicts_opened) == (2, 0)
    assert registry.get_sample_value("shopflow_stock_sync_conflicts_total") == 2
    assert registry.get_sample_value("shopflow_stock_sync_duration_seconds_count") == 2
    assert registry.get_sample_value("shopflow_stock_sync_duration_seconds_sum") == pytest.approx(
        first.duration_s + second.duration_s)
    slowest = max(first.duration_s, second.duration_s)
    top = min(b for b in RUN_DURATION_BUCKETS_S if b >= slowest)
    assert registry.get_sample_value("shopflow_stock_sync_duration_seconds_bucket",
                                     {"le": str(float(top))}) == 2
    assert registry.get_sample_value("shopflow_stock_sync_runs_total", {"outcome": "ok"}) == 2
    assert registry.get_sample_value("shopflow_stock_sync_products_checked_total") == 8


async def test_circuit_state_gauge_follows_the_breaker(
        pool: asyncpg.Pool, warehouse: Warehouse, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 20)
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    now = [1000.0]
    breaker = CircuitBreaker("warehouse", failure_threshold=2, reset_timeout_s=30,
                             clock=lambda: now[0], on_change=metrics.breaker_changed)
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url, breaker, attempts=1),
                    metrics=metrics, batch_size=10, concurrency=1)

    def gauge() -> float | None:
        return registry.get_sample_value("shopflow_circuit_state", {"circuit": "warehouse"})

    warehouse.set_faults(error_rate=1.0, error_status=503)
    await sync_once(deps)
    assert gauge() == 2  # open
    now[0] += 30
    assert breaker.state is BreakerState.HALF_OPEN and gauge() == 1
    warehouse.set_faults()
    assert (await sync_once(deps)).outcome == "ok"
    assert gauge() == 0  # closed again


async def test_at_most_concurrency_batches_are_in_flight(
        pool: asyncpg.Pool, counting_warehouse: tuple[Warehouse, InFlight],
        http_session: aiohttp.ClientSession) -> None:
    warehouse, in_flight = counting_warehouse
    await link_products(pool, 100)
    warehouse.set_faults(latency_ms=100)  # long enough for every admitted batch to overlap
    deps = SyncDeps(pool=pool, warehouse=make_client(http_session, warehouse.url),
                    batch_size=10, concurrency=3)

    report = await sync_once(deps)

    assert report.outcome == "ok" and warehouse.lookups() == 10
    assert in_flight.most == 3  # the limit was reached and never passed
    assert in_flight.now == 0


async def test_a_warehouse_that_does_not_accept_fails_within_the_connect_timeout(
        pool: asyncpg.Pool, http_session: aiohttp.ClientSession) -> None:
    await link_products(pool, 5)
    with unaccepting_address() as url:
        client = HttpWarehouse(
            session=http_session, base_url=url,
            breaker=CircuitBreaker("warehouse", failure_threshold=100),
            policy=RetryPolicy(attempts=2, base_backoff_s=0.01, max_backoff_s=0.02),
            # a read timeout far past the test's bound: only the connect timeout can end it
            connect_timeout_s=0.3, read_timeout_s=30.0)
        report = await asyncio.wait_for(sync_once(SyncDeps(pool=pool, warehouse=client)), 10)

    assert report.outcome == "failed" and report.error_kinds == ("timeout",)
    # two attempts of 0.3 s plus a little backoff
    assert 0.6 <= report.duration_s < 2.0
    assert await pool.fetchval("SELECT count(*) FROM inventory WHERE synced_at IS NOT NULL") == 0
