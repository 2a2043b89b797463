"""The api's outbox relay metrics after known work: events published per channel and the lag.

The app of web/app.py on a real server (its relay runs under the api's root
supervisor), real PostgreSQL and Redis; the values are read from a real scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from runtime.outbox import NOTIFY_CHANNEL, emit
from runtime.settings import Settings
from tests.runtime.metrics_helpers import Samples, scrape, value
from tests.web.conftest import ServerFactory
from web.app import create_app

PUBLISHED = "shopflow_outbox_events_published_total"
LAG = "shopflow_outbox_lag_seconds"
# How long the rows had waited before the relay saw them.
WAITED_S = 45


@pytest.fixture
def relay_settings(web_settings: Settings) -> Settings:
    """A relay that wakes only on NOTIFY (its safety-net poll is far away), so each round is ours."""
    return replace(web_settings, outbox_poll_s=300.0)


@pytest.fixture
async def api(relay_settings: Settings, start_server: ServerFactory) -> AsyncIterator[TestServer]:
    yield await start_server(create_app(relay_settings))


async def scraped_until(settings: Settings, check: Callable[[Samples], bool], what: str,
                        timeout_s: float = 15.0) -> Samples:
    """Scrape (off the loop) until ``check`` holds; fail with ``what`` after the timeout."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                samples = await asyncio.to_thread(scrape, settings)
                if check(samples):
                    return samples
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _emit_waited(pool: asyncpg.Pool, rows: list[tuple[str, dict[str, int]]]) -> None:
    """Commit ``rows`` as if they had been written ``WAITED_S`` ago (the NOTIFY wakes the relay)."""
    async with pool.acquire() as conn, conn.transaction():
        ids = [await emit(conn, channel, "test", payload) for channel, payload in rows]
        await conn.execute("UPDATE outbox SET created_at = now() - make_interval(secs => $2) "
                           "WHERE id = ANY($1::bigint[])", ids, float(WAITED_S))


async def test_published_events_are_counted_per_channel_and_the_lag_is_their_wait(
        api: TestServer, pool: asyncpg.Pool, relay_settings: Settings) -> None:
    await _emit_waited(pool, [("order-status-changed", {"order_id": n}) for n in range(3)]
                       + [("stock-updated", {"product_id": n}) for n in range(2)])

    def published(s: Samples) -> bool:
        return (value(s, PUBLISHED, channel="order-status-changed") == 3
                and value(s, PUBLISHED, channel="stock-updated") == 2)

    samples = await scraped_until(relay_settings, published, "5 events published")
    lag = value(samples, LAG)
    assert lag is not None and WAITED_S <= lag < WAITED_S + 30, lag
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

    # A round that finds the outbox empty: nothing waits, so the lag is 0, not the last batch's.
    await pool.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    samples = await scraped_until(relay_settings, lambda s: value(s, LAG) == 0, "lag back to 0")
    assert value(samples, PUBLISHED, channel="order-status-changed") == 3, "nothing twice"
