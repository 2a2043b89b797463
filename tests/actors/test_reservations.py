"""Stock reservation: all or nothing, idempotent, never oversold."""

from __future__ import annotations

import asyncio

import asyncpg

from actors.inventory.messages import EVENT_STOCK_UPDATED
from actors.inventory.reservations import (
    allocate_for_order,
    release_order_stock,
    reserve_for_order,
)
from actors.orders import state
from tests.factories import inventory, make_order, make_shop

TTL_S = 900


async def test_reserves_every_line_or_none(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5, 2: 1})
        ok = await make_order(conn, 1, {1: 2, 2: 1})
        short = await make_order(conn, 2, {1: 2, 2: 1})
        assert (await reserve_for_order(conn, ok, TTL_S)).reserved
        outcome = await reserve_for_order(conn, short, TTL_S)
        assert not outcome.reserved and outcome.status == state.FAILED
        assert outcome.reason == "insufficient stock: product 2 (wanted 1, available 0)"
        assert await inventory(conn, 1) == (5, 2)  # nothing of product 1 held for the failed order
        assert await conn.fetchval("SELECT count(*) FROM inventory_reservations WHERE order_id = $1", short) == 0
        assert await conn.fetchval("SELECT status_reason FROM orders WHERE id = $1", short) == outcome.reason


async def test_reserving_twice_reserves_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        order_id = await make_order(conn, 1, {1: 3})
        first = await reserve_for_order(conn, order_id, TTL_S)
        second = await reserve_for_order(conn, order_id, TTL_S)
        assert (first.changed, second.changed) == (True, False)
        assert second.reserved
        assert await inventory(conn, 1) == (5, 3)


async def test_concurrent_orders_never_oversell(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 10, 2: 10}, customers=1)
        ids = [await make_order(conn, 1, {1: 1, 2: 1} if i % 2 else {2: 1, 1: 1}) for i in range(30)]

    async def reserve(order_id: int) -> bool:
        async with pool.acquire() as c:
            return (await reserve_for_order(c, order_id, TTL_S)).reserved

    results = await asyncio.gather(*(reserve(i) for i in ids))
    assert sum(results) == 10
    async with pool.acquire() as conn:
        assert await inventory(conn, 1) == (10, 10)
        assert await inventory(conn, 2) == (10, 10)


async def test_allocation_takes_reserved_stock_out_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        order_id = await make_order(conn, 1, {1: 2})
        await reserve_for_order(conn, order_id, TTL_S)
        async with conn.transaction():
            assert await allocate_for_order(conn, order_id, None) == 1
        async with conn.transaction():
            assert await allocate_for_order(conn, order_id, None) == 0
        assert await inventory(conn, 1) == (3, 0)


async def test_releasing_an_orders_stock_gives_back_what_it_holds_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5, 2: 4})
        allocated = await make_order(conn, 1, {1: 2, 2: 1})
        reserved = await make_order(conn, 2, {1: 1, 2: 3})
        untouched = await make_order(conn, 3, {1: 2})
        for order_id in (allocated, reserved, untouched):
            assert (await reserve_for_order(conn, order_id, TTL_S)).reserved
        async with conn.transaction():
            await allocate_for_order(conn, allocated, None)
        assert (await inventory(conn, 1), await inventory(conn, 2)) == ((3, 3), (3, 3))
        for _ in range(2):  # the second time there is nothing left to give back
            async with conn.transaction():
                await release_order_stock(conn, allocated, None)
                await release_order_stock(conn, reserved, None)
        # allocated: its 2 + 1 units are back on the shelf; reserved: its hold is gone
        assert (await inventory(conn, 1), await inventory(conn, 2)) == ((5, 2), (4, 0))
        assert await conn.fetchval("SELECT array_agg(order_id) FROM inventory_reservations") == [
            untouched]
        events = await conn.fetchval("SELECT count(*) FROM outbox WHERE event_type = $1",
                                     EVENT_STOCK_UPDATED)
        assert events == 5 + 2 + 4, "5 reserved lines, 2 allocated, 2 + 2 given back once"
