"""Expired anonymous carts against real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from actors.housekeeping.carts import delete_expired_carts
from tests.actors.housekeeping import shopdata

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
DAY_S = 24 * 3600


async def cart(conn: asyncpg.Connection, customer_id: int | None, idle: timedelta,
               items: int) -> int:
    cart_id: int = await conn.fetchval(
        "INSERT INTO carts (customer_id, updated_at) VALUES ($1, $2) RETURNING id",
        customer_id, NOW - idle)
    for pid in range(1, items + 1):
        await conn.execute(
            "INSERT INTO cart_items (cart_id, product_id, quantity) VALUES ($1, $2, 1)",
            cart_id, pid)
    return cart_id


async def test_only_anonymous_carts_idle_past_the_limit_go_with_their_items(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        await shopdata.customer(conn)
        for pid in (1, 2, 3):
            await shopdata.product(conn, pid, quantity=10)
        stale = await cart(conn, None, timedelta(hours=25), items=3)
        stale_empty = await cart(conn, None, timedelta(days=30), items=0)
        fresh = await cart(conn, None, timedelta(hours=23, minutes=59), items=1)
        owned = await cart(conn, 1, timedelta(days=30), items=2)

    result = await delete_expired_carts(pool, NOW, DAY_S)

    assert (result.carts, result.items) == (2, 3)
    left = {r["id"] for r in await pool.fetch("SELECT id FROM carts")}
    assert left == {fresh, owned}
    assert stale not in left and stale_empty not in left
    items_left = {r["cart_id"] for r in await pool.fetch("SELECT cart_id FROM cart_items")}
    assert items_left == {fresh, owned}
    again = await delete_expired_carts(pool, NOW, DAY_S)
    assert (again.carts, again.items) == (0, 0)


async def test_the_age_limit_is_a_parameter(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await cart(conn, None, timedelta(hours=2), items=0)
    assert (await delete_expired_carts(pool, NOW, 3 * 3600)).carts == 0
    assert (await delete_expired_carts(pool, NOW, 3600)).carts == 1
