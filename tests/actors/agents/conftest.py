"""Fixtures for the agents: the fake Messages API, seeded shop data, deps with a clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from actors.agents.deps import AgentDeps, build_deps
from actors.agents.metrics import create_agent_metrics
from runtime.settings import Settings
from tests.actors.agents.fake_anthropic import FakeAnthropic

# 15:00 UTC = noon in São Paulo: mid-day of the shop's day.
NOON = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url or "")
    yield client
    await client.aclose()


MakeDeps = Callable[..., AgentDeps]


@pytest.fixture
async def make_deps(
    settings: Settings, pool: asyncpg.Pool, redis: Redis, fake_llm: FakeAnthropic, clock: Clock
) -> AsyncIterator[MakeDeps]:
    """Deps against the fake API; keyword arguments override settings fields."""
    made: list[AgentDeps] = []

    def make(**overrides: Any) -> AgentDeps:
        base = replace(
            settings, anthropic_api_key="sk-ant-test", anthropic_base_url=fake_llm.url,
            llm_timeout_s=2.0, llm_max_retries=0,
        )
        deps = build_deps(replace(base, **overrides), pool, redis,
                          create_agent_metrics(CollectorRegistry()), clock)
        made.append(deps)
        return deps

    yield make
    for deps in made:
        await deps.llm.aclose()


def metric(deps: AgentDeps, name: str, **labels: str) -> float:
    """The current value of one of the agents' metric samples (0 when absent)."""
    for collector in vars(deps.metrics).values():
        for family in collector.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
    return 0.0


SeedFn = Callable[[], Awaitable[None]]


@pytest.fixture
async def shop(pool: asyncpg.Pool) -> None:
    """A small shop: four customers, eight products, orders old and recent.

    Ana (1) bought Kind of Blue and Abbey Road and likes soul; Bob (2) and
    Carla (3) also bought Kind of Blue (so their other albums are Ana's
    co-purchases); Dan (4) bought many Nevermind copies this month (trending).
    Product 8 is out of stock.
    """
    recent = NOON - timedelta(days=2)
    old = NOON - timedelta(days=200)
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO customers (id, name, email) VALUES ($1, $2, $3)",
            [(1, "Ana Souza", "ana@example.com"), (2, "Bob Builder", "bob@example.com"),
             (3, "Carla Dias", "carla@example.com"), (4, "Dan Lee", "dan@example.com")],
        )
        await conn.executemany(
            "INSERT INTO products (id, sku, name, category, price_cents) VALUES ($1, $2, $3, $4, $5)",
            [(1, "SKU-1", "Kind of Blue", "jazz", 4990), (2, "SKU-2", "A Love Supreme", "jazz", 4590),
             (3, "SKU-3", "Blue Train", "jazz", 3990), (4, "SKU-4", "Abbey Road", "rock", 5290),
             (5, "SKU-5", "Revolver", "rock", 4790), (6, "SKU-6", "Nevermind", "rock", 3990),
             (7, "SKU-7", "Back to Black", "soul", 4490), (8, "SKU-8", "Giant Steps", "jazz", 4190)],
        )
        await conn.executemany(
            "INSERT INTO inventory (product_id, quantity) VALUES ($1, $2)",
            [(p, 50) for p in range(1, 8)] + [(8, 0)],
        )
        orders = [
            (101, 1, "delivered", 4990, old, [(1, 1, 4990)]),
            (102, 1, "shipped", 5290, recent, [(4, 1, 5290)]),
            (201, 2, "paid", 13570, recent, [(1, 1, 4990), (2, 1, 4590), (3, 1, 3990)]),
            (301, 3, "delivered", 9580, old, [(1, 1, 4990), (2, 1, 4590)]),
            (302, 3, "processing", 4790, recent, [(5, 1, 4790)]),
            (401, 4, "delivered", 39900, recent, [(6, 10, 3990)]),
        ]
        for oid, cid, status, total, at, items in orders:
            await conn.execute(
                "INSERT INTO orders (id, customer_id, status, total_cents, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $5)", oid, cid, status, total, at,
            )
            await conn.executemany(
                "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents)"
                " VALUES ($1, $2, $3, $4)", [(oid, p, q, c) for p, q, c in items],
            )
        await conn.execute(
            "INSERT INTO shipments (order_id, carrier, tracking_code) VALUES (102, 'Correios', 'BR123456789')"
        )
        await conn.execute(
            "INSERT INTO customer_preferences (customer_id, favourite_categories, notes)"
            " VALUES (1, '{soul}', 'I love vinyl with big horns')"
        )
