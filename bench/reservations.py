"""Stock reservation under contention: many orders over a few hot products.

On a throw-away embedded PostgreSQL (schema from runtime.db.migrate), for
each concurrency level: seed ``products`` hot products and ``orders``
pending orders (created with actors.orders.service.create_order, the same
fixed random baskets every time), then let N concurrent reservers (asyncio
tasks, each with its own connection) call
actors.inventory.reservations.reserve_for_order on every order. Demand is
about 1.4x the stock, so both outcomes (reserved, failed for shortage) occur
and every reserver fights over the same few inventory rows. Afterwards the
invariants are checked in SQL.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from actors.inventory.messages import RESERVE_STOCK
from actors.inventory.reservations import reserve_for_order
from actors.orders import service, state
from runtime import db, embedded

DEFAULT_ORDERS = 2_000
DEFAULT_PRODUCTS = 5
CONCURRENCY_LEVELS = (1, 5, 10)
CUSTOMERS = 50
SEED = 20_261_203
RESERVATION_TTL_S = 900
# Stock per product so that demand (about 3 units per order) is ~1.4x the stock.
STOCK_FACTOR = 0.7
ORDER_CREATORS = 10  # connections used to create the orders (not measured)

# Each query counts rows that break an invariant; all must be 0.
INVARIANTS: dict[str, str] = {
    "0 <= reserved_quantity <= quantity":
        "SELECT count(*) FROM inventory WHERE reserved_quantity < 0 OR reserved_quantity > quantity",
    "reserved_quantity = sum of the product's reservations":
        """SELECT count(*) FROM inventory i
           LEFT JOIN (SELECT product_id, sum(quantity) AS q FROM inventory_reservations GROUP BY 1) r
             USING (product_id)
           WHERE i.reserved_quantity <> coalesce(r.q, 0)""",
    "every order reserved or failed (none left pending)":
        f"SELECT count(*) FROM orders WHERE status NOT IN ('{state.RESERVED}', '{state.FAILED}')",
    "reserved orders hold every line exactly, failed orders hold nothing":
        f"""SELECT count(*) FROM order_items oi JOIN orders o ON o.id = oi.order_id
            LEFT JOIN inventory_reservations r ON r.order_id = oi.order_id AND r.product_id = oi.product_id
            WHERE (o.status = '{state.RESERVED}' AND r.quantity IS DISTINCT FROM oi.quantity)
               OR (o.status = '{state.FAILED}' AND r.order_id IS NOT NULL)""",
    "a failed order really lacked stock at the end (no product it wanted had room)":
        f"""SELECT count(*) FROM orders o WHERE o.status = '{state.FAILED}' AND NOT EXISTS (
              SELECT 1 FROM order_items oi JOIN inventory i USING (product_id)
              WHERE oi.order_id = o.id AND i.quantity - i.reserved_quantity < oi.quantity)""",
}


@dataclass
class LevelResult:
    """One concurrency level."""

    reservers: int
    orders: int
    elapsed_s: float
    reserved: int
    failed: int
    violations: dict[str, int] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.orders / self.elapsed_s

    @property
    def invariants_held(self) -> bool:
        return not any(self.violations.values())


@dataclass
class ReservationsResult:
    orders: int
    products: int
    stock_per_product: int
    server: str
    levels: list[LevelResult] = field(default_factory=list)

    @property
    def all_invariants_held(self) -> bool:
        return all(level.invariants_held for level in self.levels)


def baskets(orders: int, products: int) -> list[dict[int, int]]:
    """The same pseudo-random baskets every run: 1-2 hot products, 1-3 units each."""
    rng = random.Random(SEED)
    out = []
    for _ in range(orders):
        chosen = rng.sample(range(1, products + 1), k=rng.choice((1, 1, 2)))
        out.append({pid: rng.randint(1, 3) for pid in chosen})
    return out


async def _seed(pool: asyncpg.Pool, orders: list[dict[int, int]], products: int, stock: int) -> list[int]:
    async with pool.acquire() as conn:
        await conn.execute(
            """TRUNCATE customers, products, inventory, orders, order_items, order_status_history,
               inventory_reservations, outbox RESTART IDENTITY CASCADE""")
        await conn.executemany(
            "INSERT INTO products (id, sku, name, price_cents) VALUES ($1, $2, $3, 1990)",
            [(pid, f"HOT-{pid}", f"Hot product {pid}") for pid in range(1, products + 1)])
        await conn.executemany("INSERT INTO inventory (product_id, quantity) VALUES ($1, $2)",
                               [(pid, stock) for pid in range(1, products + 1)])
        await conn.executemany("INSERT INTO customers (id, name, email) VALUES ($1, $2, $3)",
                               [(c, f"Customer {c}", f"c{c}@example.com.br") for c in range(1, CUSTOMERS + 1)])
    ids: list[int] = [0] * len(orders)
    todo = iter(enumerate(orders))

    async def creator() -> None:
        async with pool.acquire() as conn:
            for i, basket in todo:
                new = service.parse_new_order({
                    "customer_id": i % CUSTOMERS + 1,
                    "items": [{"product_id": p, "quantity": q} for p, q in basket.items()]})
                ids[i], _ = await service.create_order(conn, new, RESERVE_STOCK.as_job())

    await asyncio.gather(*(creator() for _ in range(ORDER_CREATORS)))
    return ids


async def _reserve_all(pool: asyncpg.Pool, order_ids: list[int], reservers: int) -> float:
    todo = iter(order_ids)

    async def reserver() -> None:
        async with pool.acquire() as conn:
            for order_id in todo:
                await reserve_for_order(conn, order_id, RESERVATION_TTL_S)

    started = time.perf_counter()
    await asyncio.gather(*(reserver() for _ in range(reservers)))
    return time.perf_counter() - started


async def _check(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        return {name: int(await conn.fetchval(sql)) for name, sql in INVARIANTS.items()}


async def _run_async(database_url: str, orders: int, products: int) -> ReservationsResult:
    conn = await db.connect(database_url)
    try:
        await db.migrate(conn)
        server = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    plan = baskets(orders, products)
    stock = max(1, int(sum(sum(b.values()) for b in plan) * STOCK_FACTOR / products))
    out = ReservationsResult(orders, products, stock, server)
    for level in CONCURRENCY_LEVELS:
        pool = await db.create_pool(database_url, min_size=max(level, ORDER_CREATORS),
                                    max_size=max(level, ORDER_CREATORS))
        try:
            print(f"[reservations] seeding {orders} orders, {level} reserver(s) ...", flush=True)
            order_ids = await _seed(pool, plan, products, stock)
            elapsed_s = await _reserve_all(pool, order_ids, level)
            async with pool.acquire() as c:
                counts = dict(await c.fetch("SELECT status, count(*) FROM orders GROUP BY status"))
            result = LevelResult(level, orders, elapsed_s, counts.get(state.RESERVED, 0),
                                 counts.get(state.FAILED, 0), await _check(pool))
            print(f"[reservations] {level} reserver(s): {result.per_s:.0f} orders/s, "
                  f"invariants {'held' if result.invariants_held else 'BROKEN'}", flush=True)
            out.levels.append(result)
        finally:
            await pool.close()
    return out


def run(root: Path, orders: int, products: int) -> ReservationsResult:
    """Start a throw-away PostgreSQL under ``root``, measure, stop it."""
    from bench.run import free_port

    paths = embedded.EmbeddedPaths(root)
    url = embedded.ensure_postgres(paths, free_port())
    try:
        return asyncio.run(_run_async(url, orders, products))
    finally:
        embedded.stop_postgres(paths)
