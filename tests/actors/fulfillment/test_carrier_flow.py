"""The fulfilment flow's label and packing steps against the carrier and warehouse simulators.

Real HTTP servers (the simulators in ops/), the real HTTP gateway, real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from actors.fulfillment import actor as fulfillment
from actors.fulfillment.flow import EVENT_FULFILLMENT_FAILED, advance
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.inventory.messages import EVENT_STOCK_UPDATED
from actors.inventory.reservations import reserve_for_order
from actors.orders import service, state
from actors.orders.workflow import pay_order
from actors.shipping.gateway import HttpShippingGateway
from ops.simulators.carrier import CARRIER_KEY, create_carrier_app
from ops.simulators.faults import FAULTS_KEY, Faults, serve
from ops.simulators.warehouse import WAREHOUSE_KEY, create_warehouse_app
from runtime import db
from runtime.errors import ExternalServiceError
from runtime.http import RetryPolicy
from runtime.process import ProcessContext
from runtime.settings import Settings
from tests.factories import make_order, make_shop

TO_PROCESSING = (state.RESERVED, state.PAID, state.ALLOCATED, state.PROCESSING)


async def processing_order(pool: asyncpg.Pool) -> int:
    """An order that reached ``processing`` along the state machine (the label step is next)."""
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 10})
        order_id = await make_order(conn, 1, {1: 2})
        async with conn.transaction():
            for status in TO_PROCESSING:
                await service.transition(conn, order_id, status)
    return order_id


@dataclass
class Sims:
    carrier: web.Application
    warehouse: web.Application
    gateway: HttpShippingGateway

    def faults(self, app: web.Application, **knobs: float) -> None:
        app[FAULTS_KEY].faults = Faults().updated(knobs)

    def requests(self, app: web.Application, route: str) -> int:
        return app[FAULTS_KEY].stats[f"requests {route}"]

    def labels(self) -> list[dict[str, object]]:
        return list(self.carrier[CARRIER_KEY].labels.values())


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    carrier, warehouse = create_carrier_app(), create_warehouse_app()
    async with serve(carrier) as carrier_url, serve(warehouse) as warehouse_url, \
            aiohttp.ClientSession() as session:
        gateway = HttpShippingGateway(
            session=session, carrier_url=carrier_url, warehouse_url=warehouse_url,
            policy=RetryPolicy(attempts=3, base_backoff_s=0.01, max_backoff_s=0.02),
            connect_timeout_s=0.5, read_timeout_s=0.3)
        yield Sims(carrier, warehouse, gateway)


async def _order(pool: asyncpg.Pool, order_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT status, status_reason FROM orders WHERE id = $1", order_id)
    assert row is not None
    return row


async def _jobs_after(pool: asyncpg.Pool, status: str) -> int:
    """Outbox jobs that advance the flow, queued by the move into ``status``."""
    return int(await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE job->>'actor' = $1 AND payload->>'to_status' = $2",
        ADVANCE_FULFILLMENT.actor, status))


async def test_the_label_step_buys_one_label_and_packing_follows(
        pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await processing_order(pool)
    assert await advance(pool, sims.gateway, order_id) == state.LABEL_CREATED
    assert await advance(pool, sims.gateway, order_id) == state.READY_TO_SHIP
    [label] = sims.labels()
    shipment = await pool.fetchrow("SELECT * FROM shipments WHERE order_id = $1", order_id)
    assert (shipment["carrier"], shipment["tracking_code"]) == ("SimExpress",
                                                                label["tracking_code"])
    assert shipment["label_url"].endswith(f"/v1/labels/{label['tracking_code']}.pdf")
    assert shipment["packing_ref"] == next(iter(sims.warehouse[WAREHOUSE_KEY].packing.values()))[
        "packing_ref"]


async def test_a_carrier_4xx_fails_the_order_with_its_reason(pool: asyncpg.Pool,
                                                              sims: Sims) -> None:
    order_id = await processing_order(pool)
    sims.faults(sims.carrier, error_rate=1.0, error_status=422)
    assert await advance(pool, sims.gateway, order_id) == state.FAILED
    order = await _order(pool, order_id)
    assert order["status"] == state.FAILED
    assert order["status_reason"].startswith("shipping label failed: carrier rejected the "
                                             "request with 422")
    assert sims.requests(sims.carrier, "/v1/labels") == 1, "a 4xx is not retried"
    history = await pool.fetch("SELECT from_status, to_status, reason FROM order_status_history "
                               "WHERE order_id = $1 ORDER BY id DESC LIMIT 1", order_id)
    assert (history[0]["from_status"], history[0]["to_status"]) == (state.PROCESSING,
                                                                    state.FAILED)
    alert = await pool.fetchrow("SELECT channel, payload FROM outbox WHERE event_type = $1",
                                EVENT_FULFILLMENT_FAILED)
    assert alert["channel"] == "alerts"
    assert alert["payload"] == {"order_id": order_id, "step": "shipping label",
                                "from_status": state.PROCESSING, "http_status": 422,
                                "reason": order["status_reason"]}
    assert await _jobs_after(pool, state.FAILED) == 0, "nothing follows a failed order"
    assert await advance(pool, sims.gateway, order_id) == state.FAILED  # a redelivery: no-op
    assert sims.requests(sims.carrier, "/v1/labels") == 1


async def test_a_warehouse_4xx_on_packing_fails_the_order(pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await processing_order(pool)
    assert await advance(pool, sims.gateway, order_id) == state.LABEL_CREATED
    sims.faults(sims.warehouse, error_rate=1.0, error_status=400)
    assert await advance(pool, sims.gateway, order_id) == state.FAILED
    order = await _order(pool, order_id)
    assert order["status_reason"].startswith("packing request failed: warehouse-packing "
                                             "rejected the request with 400")


async def test_a_timeout_after_the_label_was_bought_buys_no_second_label(
        pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await processing_order(pool)
    sims.faults(sims.carrier, hang_after_next=1)  # the label is bought, the answer never comes
    assert await advance(pool, sims.gateway, order_id) == state.LABEL_CREATED
    assert sims.requests(sims.carrier, "/v1/labels") == 2  # the retry, with the same key
    [label] = sims.labels()
    assert await pool.fetchval("SELECT tracking_code FROM shipments WHERE order_id = $1",
                               order_id) == label["tracking_code"]


async def test_a_job_retried_after_every_attempt_timed_out_gets_the_same_label(
        pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await processing_order(pool)
    sims.faults(sims.carrier, hang_after_next=3)  # every attempt of this job: bought, no answer
    with pytest.raises(ExternalServiceError):  # transient: Dramatiq retries the job
        await advance(pool, sims.gateway, order_id)
    assert (await _order(pool, order_id))["status"] == state.PROCESSING
    assert await pool.fetchval("SELECT count(*) FROM shipments") == 0
    [bought] = sims.labels()

    sims.faults(sims.carrier)  # the carrier answers again: the job's retry
    assert await advance(pool, sims.gateway, order_id) == state.LABEL_CREATED
    assert sims.labels() == [bought], "the same idempotency key: no second label"
    assert sims.requests(sims.carrier, "/v1/labels") == 4
    assert await pool.fetchval("SELECT tracking_code FROM shipments WHERE order_id = $1",
                               order_id) == bought["tracking_code"]


STOCK = {1: 10, 2: 5}
LINES = {1: 2, 2: 1}


async def allocated_processing_order(pool: asyncpg.Pool, sims: Sims) -> int:
    """An order reserved, paid and allocated for real, now ``processing`` (the label is next)."""
    async with pool.acquire() as conn:
        await make_shop(conn, STOCK)
        order_id = await make_order(conn, 1, LINES)
        assert (await reserve_for_order(conn, order_id, ttl_s=900)).reserved
    await pay_order(pool, order_id)
    assert await advance(pool, sims.gateway, order_id) == state.ALLOCATED
    assert await advance(pool, sims.gateway, order_id) == state.PROCESSING
    return order_id


async def _stock(pool: asyncpg.Pool) -> dict[int, tuple[int, int]]:
    rows = await pool.fetch("SELECT product_id, quantity, reserved_quantity FROM inventory")
    return {r["product_id"]: (r["quantity"], r["reserved_quantity"]) for r in rows}


async def _stock_events(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch(
        "SELECT xmin::text AS tx, payload FROM outbox WHERE event_type = $1 ORDER BY id",
        EVENT_STOCK_UPDATED))


async def _assert_stock_given_back(pool: asyncpg.Pool, order_id: int) -> None:
    """Everything the order held is back, and it came back in the transaction that failed it."""
    assert await _stock(pool) == {pid: (qty, 0) for pid, qty in STOCK.items()}
    assert await pool.fetchval(
        "SELECT count(*) FROM inventory_reservations WHERE order_id = $1", order_id) == 0
    allocations = await pool.fetch(
        "SELECT product_id, quantity, released_at FROM inventory_allocations WHERE order_id = $1",
        order_id)
    assert {a["product_id"]: a["quantity"] for a in allocations} == LINES
    assert all(a["released_at"] is not None for a in allocations)
    failed_tx = await pool.fetchval("SELECT xmin::text FROM orders WHERE id = $1", order_id)
    given_back = [e["payload"] for e in await _stock_events(pool) if e["tx"] == failed_tx]
    assert sorted(given_back, key=lambda p: p["product_id"]) == [
        {"product_id": pid, "quantity": qty, "reserved_quantity": 0}
        for pid, qty in sorted(STOCK.items())], "stock-updated in the failing transaction"


async def test_a_carrier_4xx_gives_the_allocated_stock_back_once(
        pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await allocated_processing_order(pool, sims)
    assert await _stock(pool) == {1: (8, 0), 2: (4, 0)}, "allocation took the lines off"
    sims.faults(sims.carrier, error_rate=1.0, error_status=422)

    # A redelivered copy racing the first: one failure, one give-back.
    results = await asyncio.gather(*(advance(pool, sims.gateway, order_id) for _ in range(3)))
    assert results == [state.FAILED] * 3
    await _assert_stock_given_back(pool, order_id)
    events = len(await _stock_events(pool))

    assert await advance(pool, sims.gateway, order_id) == state.FAILED  # a later redelivery
    assert await _stock(pool) == {pid: (qty, 0) for pid, qty in STOCK.items()}
    assert len(await _stock_events(pool)) == events, "nothing given back twice"
    assert await pool.fetchval(
        "SELECT count(*) FROM order_status_history WHERE order_id = $1 AND to_status = $2",
        order_id, state.FAILED) == 1


async def test_a_warehouse_4xx_on_packing_gives_the_allocated_stock_back(
        pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await allocated_processing_order(pool, sims)
    assert await advance(pool, sims.gateway, order_id) == state.LABEL_CREATED
    sims.faults(sims.warehouse, error_rate=1.0, error_status=400)
    assert await advance(pool, sims.gateway, order_id) == state.FAILED
    await _assert_stock_given_back(pool, order_id)


async def test_stock_sold_meanwhile_stays_sold_when_an_order_gives_its_stock_back(
        pool: asyncpg.Pool, sims: Sims) -> None:
    order_id = await allocated_processing_order(pool, sims)
    async with pool.acquire() as conn:  # another order reserves what is left of product 1
        other = await make_order(conn, 2, {1: 8})
        assert (await reserve_for_order(conn, other, ttl_s=900)).reserved
    assert (await _stock(pool))[1] == (8, 8)
    sims.faults(sims.carrier, error_rate=1.0, error_status=403)
    assert await advance(pool, sims.gateway, order_id) == state.FAILED
    assert (await _stock(pool))[1] == (10, 8), "the other order's reservation is untouched"
    assert await pool.fetchval(
        "SELECT sum(quantity) FROM inventory_reservations WHERE product_id = 1") == 8


async def test_the_migration_records_allocations_of_orders_already_in_the_flow(
        pool: asyncpg.Pool, settings: Settings) -> None:
    order_id = await processing_order(pool)  # as if allocated before the table existed
    await pool.execute("DROP TABLE inventory_allocations")
    await pool.execute("DELETE FROM schema_migrations WHERE version = 10")
    conn = await db.connect(settings.database_url or "")
    try:
        assert await db.migrate(conn) == ["0010_stock_allocations"]
    finally:
        await conn.close()
    rows = await pool.fetch("SELECT order_id, product_id, quantity, released_at "
                            "FROM inventory_allocations")
    assert [tuple(r) for r in rows] == [(order_id, 1, 2, None)]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_the_default_run_serves_the_carrier_simulator_and_closes_it(
        settings: Settings) -> None:
    assert settings.carrier_url is None and settings.warehouse_url is None
    ctx = await asyncio.to_thread(ProcessContext.start, settings, 2)
    try:
        gateway = await asyncio.to_thread(fulfillment.make_gateway, ctx)
        assert isinstance(gateway, HttpShippingGateway)
        assert gateway.carrier_url == f"http://127.0.0.1:{settings.carrier_sim_port}"
        assert _listening(settings.carrier_sim_port) and _listening(settings.warehouse_sim_port)
        order_id = await asyncio.to_thread(ctx.run, processing_order(ctx.pool))
        assert await asyncio.to_thread(ctx.run, advance(ctx.pool, gateway, order_id)) == (
            state.LABEL_CREATED)
        carrier = await asyncio.to_thread(ctx.run, ctx.pool.fetchval(
            "SELECT carrier FROM shipments WHERE order_id = $1", order_id))
        assert carrier == "SimExpress", "labels come from the carrier simulator over HTTP"
    finally:
        await asyncio.to_thread(ctx.stop)
    assert gateway.session.closed, "the gateway's session is closed with the process"
    assert not _listening(settings.carrier_sim_port), "the simulator stopped with the process"
    assert not _listening(settings.warehouse_sim_port)
