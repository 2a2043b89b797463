"""Measure the agents' offline paths on a synthetic shop (run against a scratch database!).

Seeds N customers, P products and O orders (random, deterministic seed) into
the database at DATABASE_URL if it has no orders yet, then times:
the candidate/co-purchase SQL, a fallback recommendation (SQL + Redis cache),
a fallback support answer (SQL + log row), and the offline moderation
classifier. Usage (embedded servers of your own, see docs/agents.md):

    python ops/bench/agents_bench.py --customers 20000 --products 300 --orders 100000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from actors.agents.deps import open_deps
from actors.agents.moderation import profanity_probability
from actors.agents.recommendation import load_candidates, load_trending, recommend
from actors.agents.support import answer_support
from runtime.settings import Settings

CATEGORIES = ["jazz", "rock", "soul", "samba", "bossa nova", "classical", "pop", "blues"]
STATUSES = ["delivered"] * 6 + ["shipped", "paid", "processing", "cancelled"]


async def seed(conn: Any, customers: int, products: int, orders: int, rng: random.Random) -> None:
    if await conn.fetchval("SELECT count(*) FROM orders") > 0:
        return
    now = datetime.now(UTC)
    await conn.copy_records_to_table("customers", columns=["id", "name", "email"], records=[
        (c, f"Customer {c}", f"c{c}@bench.example") for c in range(1, customers + 1)])
    await conn.copy_records_to_table("products", columns=["id", "sku", "name", "category", "price_cents"], records=[
        (p, f"B-{p}", f"Album {p}", CATEGORIES[p % len(CATEGORIES)], 2000 + p * 7) for p in range(1, products + 1)])
    await conn.copy_records_to_table("inventory", columns=["product_id", "quantity"],
                                     records=[(p, 100) for p in range(1, products + 1)])
    weights = [1 / (p ** 0.8) for p in range(1, products + 1)]  # a long tail, like real sales
    order_rows: list[tuple[Any, ...]] = []
    item_rows: list[tuple[Any, ...]] = []
    for o in range(1, orders + 1):
        picked = set(rng.choices(range(1, products + 1), weights, k=rng.randint(1, 4)))
        order_rows.append((o, rng.randint(1, customers), rng.choice(STATUSES), 1000,
                           now - timedelta(days=rng.randint(0, 365))))
        item_rows.extend((o, p, 1, 1000) for p in picked)
    await conn.copy_records_to_table("orders", columns=["id", "customer_id", "status", "total_cents", "created_at"],
                                     records=order_rows)
    await conn.copy_records_to_table("order_items", columns=["order_id", "product_id", "quantity",
                                                             "unit_price_cents"], records=item_rows)
    await conn.execute("ANALYZE")


async def timed(label: str, n: int, fn: Callable[[int], Awaitable[Any]]) -> None:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await fn(i)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    print(f"{label:<40} n={n:<4} p50={statistics.median(samples):7.1f} ms  "
          f"p95={samples[int(0.95 * (n - 1))]:7.1f} ms", flush=True)


async def main(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    rng = random.Random(7)
    async with open_deps(settings, CollectorRegistry()) as deps:
        async with deps.pool.acquire() as conn:
            await seed(conn, args.customers, args.products, args.orders, rng)
        ids = [rng.randint(1, args.customers) for _ in range(args.samples)]
        now = datetime.now(UTC)
        await timed("trending SQL (shop-wide, cached 10 min)", 5, lambda i: load_trending(deps.pool, now))
        hot = await load_trending(deps.pool, now)
        await timed("candidates SQL (30)", len(ids), lambda i: load_candidates(deps.pool, ids[i], 30, hot))
        await timed("recommend, fallback, uncached", len(ids), lambda i: recommend(deps, ids[i], refresh=True))
        await timed("recommend, cached", len(ids), lambda i: recommend(deps, ids[i]))
        await timed("support answer, fallback", len(ids),
                    lambda i: answer_support(deps, ids[i], "Where is my last order?"))
        profanity_probability("warm up the classifier")
        texts = ["Great pressing, lovely sound.", "This is a piece of shit record.", "Buy at www.x.xyz"]

        async def classify(i: int) -> float:
            return profanity_probability(texts[i % len(texts)])

        await timed("moderation classifier (offline)", len(ids), classify)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
