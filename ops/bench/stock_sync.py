"""Measure one stock sync: N linked products against the warehouse simulator.

Usage (embedded PostgreSQL under ./var unless DATABASE_URL is set):

    python -m ops.bench.stock_sync --products 10000 --batch 100 --concurrency 4

Creates a scratch database ``bench_stock_sync``, links N products, runs a
first sync (every row changes), a second one (nothing changes) and a third
after the simulator moved to its next stock generation (~10% change).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg

from actors.stock_sync.sync import SyncDeps, sync_once
from actors.stock_sync.warehouse_client import HttpWarehouse
from ops.simulators.faults import Faults, serve
from ops.simulators.warehouse import WAREHOUSE_KEY, create_warehouse_app
from runtime import db, embedded
from runtime.circuit import CircuitBreaker
from runtime.http import RetryPolicy

BENCH_DB = "bench_stock_sync"


async def _fresh_db(server_url: str) -> str:
    base = server_url.rpartition("/")[0]
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{BENCH_DB}"')
    finally:
        await admin.close()
    url = f"{base}/{BENCH_DB}"
    conn = await db.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    return url


async def _seed(pool: asyncpg.Pool, n: int) -> None:
    await pool.execute(
        """INSERT INTO products (id, sku, name, price_cents)
           SELECT g, 'SKU-' || g, 'Product ' || g, 1000 FROM generate_series(1, $1) g""", n)
    await pool.execute(
        """INSERT INTO inventory (product_id, quantity, reserved_quantity, external_id)
           SELECT g, 1000, g % 3, 'EXT-' || g FROM generate_series(1, $1) g""", n)


async def main(args: argparse.Namespace) -> None:
    server_url = args.database_url or embedded.ensure_postgres(
        embedded.EmbeddedPaths(Path(args.var_dir).resolve()), args.pg_port)
    url = await _fresh_db(server_url)
    pool = await db.create_pool(url, max_size=args.concurrency + 1)
    app = create_warehouse_app(seed=7, faults=Faults(latency_ms=args.latency_ms))
    try:
        await _seed(pool, args.products)
        async with serve(app) as wh_url, aiohttp.ClientSession() as session:
            client = HttpWarehouse(session, wh_url, CircuitBreaker("warehouse"), RetryPolicy())
            deps = SyncDeps(pool=pool, warehouse=client, batch_size=args.batch,
                            concurrency=args.concurrency)
            for label in ("first (all change)", "second (no change)", "after a generation"):
                if label.startswith("after"):
                    app[WAREHOUSE_KEY].generation += 1
                started = time.perf_counter()
                report = await sync_once(deps)
                print(f"{label:22s} {report.checked:6d} checked {report.changed:6d} changed "
                      f"{report.conflicts_opened:5d} conflicts in {time.perf_counter() - started:.2f}s "
                      f"({report.outcome})")
    finally:
        await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency-ms", type=int, default=0, help="simulated warehouse latency")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--var-dir", default="var/bench")
    parser.add_argument("--pg-port", type=int, default=5499)
    asyncio.run(main(parser.parse_args()))
