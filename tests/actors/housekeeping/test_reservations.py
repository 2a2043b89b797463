"""Releasing expired reservations against real PostgreSQL, including two runs at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from actors.housekeeping.reservations import (
    CANCEL_REASON,
    ReleaseOutcome,
    release_expired_reservations,
)
from runtime.errors import JobCancelled
from tests.actors.housekeeping import shopdata

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
PAST = NOW - timedelta(minutes=1)
FUTURE = NOW + timedelta(minutes=10)


async def reserved_of(pool: asyncpg.Pool) -> dict[int, int]:
    rows = await pool.fetch("SELECT product_id, reserved_quantity FROM inventory")
    return {r["product_id"]: r["reserved_quantity"] for r in rows}


async def test_release_gives_stock_back_and_cancels_only_waiting_orders(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        await shopdata.customer(conn)
        await shopdata.product(conn, 1, quantity=10, reserved=6)
        await shopdata.product(conn, 2, quantity=10, reserved=3)
        expired_reserved = await shopdata.order(conn, "reserved", {1: 2, 2: 1})
        expired_pending = await shopdata.order(conn, "pending", {1: 1})
        expired_paid = await shopdata.order(conn, "paid", {2: 2})
        fresh = await shopdata.order(conn, "reserved", {1: 3})
        await shopdata.reservation(conn, expired_reserved, 1, 2, PAST)
        await shopdata.reservation(conn, expired_reserved, 2, 1, PAST)
        await shopdata.reservation(conn, expired_pending, 1, 1, NOW)  # expires exactly now
        await shopdata.reservation(conn, expired_paid, 2, 2, PAST)
        await shopdata.reservation(conn, fresh, 1, 3, FUTURE)

    outcome = await release_expired_reservations(pool, NOW)

    assert (outcome.reservations, outcome.units, outcome.products, outcome.orders_cancelled) \
        == (4, 6, 2, 2)
    assert await reserved_of(pool) == {1: 3, 2: 0}
    left = await pool.fetch("SELECT order_id FROM inventory_reservations")
    assert [r["order_id"] for r in left] == [fresh]
    statuses = {r["id"]: (r["status"], r["status_reason"])
                for r in await pool.fetch("SELECT id, status, status_reason FROM orders")}
    assert statuses[expired_reserved] == ("cancelled", CANCEL_REASON)
    assert statuses[expired_pending] == ("cancelled", CANCEL_REASON)
    assert statuses[expired_paid] == ("paid", None)  # stock freed, order untouched
    assert statuses[fresh] == ("reserved", None)
    history = await pool.fetch(
        "SELECT order_id, from_status, to_status, reason, at FROM order_status_history "
        "ORDER BY order_id")
    assert [(h["order_id"], h["from_status"], h["to_status"]) for h in history] == [
        (expired_reserved, "reserved", "cancelled"), (expired_pending, "pending", "cancelled")]
    assert all(h["at"] == NOW and h["reason"] == CANCEL_REASON for h in history)
    events = await pool.fetch("SELECT channel, event_type, payload FROM outbox ORDER BY id")
    order_events = [e["payload"] for e in events if e["channel"] == "order-status-changed"]
    assert sorted(order_events, key=lambda p: p["order_id"]) == [
        {"order_id": expired_reserved, "customer_id": 1, "from_status": "reserved",
         "to_status": "cancelled", "reason": CANCEL_REASON},
        {"order_id": expired_pending, "customer_id": 1, "from_status": "pending",
         "to_status": "cancelled", "reason": CANCEL_REASON},
    ]
    assert {e["event_type"] for e in events if e["channel"] == "order-status-changed"} == \
        {"order.status_changed"}
    stock_events = sorted((e["payload"] for e in events if e["channel"] == "stock-updated"),
                          key=lambda p: p["product_id"])
    assert stock_events == [{"product_id": 1, "quantity": 10, "reserved_quantity": 3},
                            {"product_id": 2, "quantity": 10, "reserved_quantity": 0}]

    again = await release_expired_reservations(pool, NOW)  # nothing twice
    assert again.reservations == 0
    assert await reserved_of(pool) == {1: 3, 2: 0}
    assert await pool.fetchval("SELECT count(*) FROM order_status_history") == 2


async def test_reserved_quantity_never_goes_below_zero(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await shopdata.customer(conn)
        await shopdata.product(conn, 1, quantity=5, reserved=1)  # drifted: less than reserved
        order_id = await shopdata.order(conn, "reserved", {1: 4})
        await shopdata.reservation(conn, order_id, 1, 4, PAST)
    await release_expired_reservations(pool, NOW)
    assert await reserved_of(pool) == {1: 0}


async def test_two_concurrent_releases_release_each_reservation_once(
    pool: asyncpg.Pool,
) -> None:
    """Two runs race over 400 reservations across 3 products, in small batches so their
    statements interleave; totals add up exactly and every order is cancelled once."""
    async with pool.acquire() as conn:
        await shopdata.customer(conn)
        for pid in (1, 2, 3):
            await shopdata.product(conn, pid, quantity=10_000)
        # 200 reserved orders, each with two lines on two of the three products.
        await conn.execute(
            """INSERT INTO orders (id, customer_id, status, total_cents)
               SELECT g, 1, 'reserved', 0 FROM generate_series(1, 200) g""")
        await conn.execute(
            """INSERT INTO inventory_reservations (order_id, product_id, quantity, expires_at)
               SELECT g, 1 + g % 3, 1 + g % 4, $1::timestamptz FROM generate_series(1, 200) g
               UNION ALL
               SELECT g, 1 + (g + 1) % 3, 2, $1 FROM generate_series(1, 200) g""", PAST)
        await conn.execute(
            """UPDATE inventory i SET reserved_quantity = s.q FROM (
                   SELECT product_id, sum(quantity) AS q FROM inventory_reservations
                   GROUP BY product_id) s WHERE i.product_id = s.product_id""")
    before = await reserved_of(pool)
    assert sum(before.values()) > 0

    first, second = await asyncio.gather(
        release_expired_reservations(pool, NOW, batch=7),
        release_expired_reservations(pool, NOW, batch=7),
    )

    assert first.reservations > 0 and second.reservations > 0  # they really interleaved
    assert first.reservations + second.reservations == 400
    assert first.units + second.units == sum(before.values())
    assert first.orders_cancelled + second.orders_cancelled == 200
    assert await reserved_of(pool) == {1: 0, 2: 0, 3: 0}
    assert await pool.fetchval("SELECT count(*) FROM inventory_reservations") == 0
    assert await pool.fetchval(
        "SELECT count(*) FROM order_status_history WHERE to_status = 'cancelled'") == 200
    assert await pool.fetchval(
        "SELECT count(DISTINCT order_id) FROM order_status_history") == 200
    assert await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE channel = 'order-status-changed'") == 200


async def test_a_release_reports_each_full_batch_and_can_stop_between_batches(
    pool: asyncpg.Pool,
) -> None:
    """The housekeeping job reports its progress and sees a cancel request here."""
    async with pool.acquire() as conn:
        await shopdata.customer(conn)
        await shopdata.product(conn, 1, quantity=100, reserved=5)
        for _ in range(5):
            await shopdata.reservation(conn, await shopdata.order(conn, "paid", {1: 1}), 1, 1,
                                       PAST)
    seen: list[int] = []

    async def stop_after_four(so_far: ReleaseOutcome) -> None:
        seen.append(so_far.reservations)
        if so_far.reservations >= 4:
            raise JobCancelled("asked to stop")

    with pytest.raises(JobCancelled):
        await release_expired_reservations(pool, NOW, batch=2, between_batches=stop_after_four)
    assert seen == [2, 4]
    assert await pool.fetchval("SELECT count(*) FROM inventory_reservations") == 1
    assert await reserved_of(pool) == {1: 1}, "the batches before the stop stay released"
