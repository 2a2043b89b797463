"""The replay's summary on a re-run: orders an earlier run created are told apart.

A second `shopflow up` over the same var dir finds its orders by external_ref
(the API answers with the existing order). Those orders count in the outcomes
and e-mails, but a rate or a latency measured on them would describe the
earlier run, not this one. Real PostgreSQL; no api is needed, since the
summary is read from the database alone.
"""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from actors.demo.replay import Replay
from runtime.settings import Settings
from runtime.tokens import staff_token
from tests.factories import make_order, make_shop


def _replay(settings: Settings, pool: asyncpg.Pool, order_ids: list[int]) -> Replay:
    replay = Replay("http://127.0.0.1:9", pool, aioredis.Redis.from_url(settings.redis_url or ""),
                    settings.namespace, [], day_s=0.0, timeout_s=1.0, progress_to=None,
                    token=staff_token(settings, 60))
    replay.state.order_ids = {order_id: n for n, order_id in enumerate(order_ids)}
    return replay


async def test_orders_of_an_earlier_run_count_as_earlier_and_stay_out_of_the_rates(
        settings: Settings, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 10})
        async with conn.transaction():
            earlier = [await make_order(conn, 1, {1: 1}), await make_order(conn, 2, {1: 1})]
        since = await conn.fetchval("SELECT clock_timestamp()")
        async with conn.transaction():
            new = await make_order(conn, 3, {1: 1})

    summary = await _replay(settings, pool, [*earlier, new]).summary(2.0, since)

    assert (summary.orders, summary.earlier, summary.new_orders) == (3, 2, 1)
    assert summary.throughput == 0.5  # the one new order over 2 s, not 3 orders
    assert summary.to_json()["earlier_orders"] == 2
    assert "(1 new; 2 replayed by an earlier run" in summary.render()


async def test_a_run_that_created_nothing_says_so_instead_of_a_rate(
        settings: Settings, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 10})
        async with conn.transaction():
            earlier = [await make_order(conn, 1, {1: 1})]
        since = await conn.fetchval("SELECT clock_timestamp()")

    summary = await _replay(settings, pool, earlier).summary(1.6, since)

    assert (summary.earlier, summary.new_orders, summary.throughput) == (1, 0, 0.0)
    text = summary.render()
    assert "none measured: this run created no order" in text
    assert "orders/s" not in text
