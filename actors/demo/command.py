"""``shopflow demo``: seed the demo shop and replay real orders through a running runtime."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from actors.demo import catalog
from actors.demo.replay import Replay, Summary
from runtime import db, embedded
from runtime.cli import add_command, run_migrations
from runtime.settings import Settings
from runtime.tokens import staff_token

# The replay's token stays valid this long past its timeout (late payments, retries).
TOKEN_SLACK_S = 3600

DATA_FILES = {"sample": catalog.DATA_FILE, "master": catalog.MASTER_FILE}
# How long seeding waits for the embedded warehouse simulator to answer.
SIMULATOR_TIMEOUT_S = 10.0


def scaled_stock_levels(stock_multiplier: int) -> dict[str, int]:
    """The generated catalogue's stock levels times ``stock_multiplier``, by external id."""
    return {p.external_id: p.stock
            for p in catalog.generate_products(stock_multiplier=stock_multiplier)}


def with_simulator_stock_file(settings: Settings, stock_multiplier: int) -> Settings:
    """Settings whose warehouse simulator starts with the scaled stock (a file in the var dir).

    Before the process tree starts, so the simulator serves those levels from
    its first request and the stock syncer's first run cannot apply its own
    random levels first (pinning over HTTP once the tree is up raced that
    run: a sync fetched before the pin and written after would leave the hits
    with a fraction of their stock). Unchanged with a real warehouse or the
    default multiplier.
    """
    if stock_multiplier == 1 or settings.warehouse_url:
        return settings
    path = settings.var_dir / "demo" / "warehouse-stock.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scaled_stock_levels(stock_multiplier)))
    return replace(settings, warehouse_sim_stock_file=path)


async def pin_simulator_stock(settings: Settings, stock_multiplier: int) -> dict[str, int]:
    """Give the embedded warehouse simulator the scaled stock levels too; return them.

    The stock syncer makes the warehouse's quantity the shop's every interval, so
    a multiplier applied only to the shop's table would be undone by the first
    sync. With a real warehouse (``WAREHOUSE_URL`` set) nothing is touched: its
    stock is the truth. Returns the levels pinned, by external id (empty when
    nothing was pinned), so the caller can make the shop's stock agree at once
    (:func:`align_shop_stock`) instead of waiting for the next sync.
    """
    if stock_multiplier == 1 or settings.warehouse_url:
        return {}
    levels = scaled_stock_levels(stock_multiplier)
    url = f"http://127.0.0.1:{settings.warehouse_sim_port}/_admin/stock"
    deadline = asyncio.get_running_loop().time() + SIMULATOR_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:  # the process serving the simulator may still be starting
            try:
                async with http.post(url, json=levels) as resp:
                    resp.raise_for_status()
                    return levels
            except (aiohttp.ClientError, TimeoutError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    print(f"warning: could not pin the warehouse simulator's stock at {url} ({exc});"
                          " the stock sync will apply the simulator's own levels", file=sys.stderr)
                    return {}
            await asyncio.sleep(0.2)


async def align_shop_stock(settings: Settings, levels: dict[str, int]) -> None:
    """Write pinned warehouse levels into the shop's inventory, as the next sync would.

    ``shopflow up`` seeds the shop before the process tree (and with it the
    simulator) runs, so the syncer's first run may have applied the
    simulator's unscaled levels before they were pinned; this puts the scaled
    ones back without waiting an interval. Never below what is reserved (the
    syncer's own rule).
    """
    if not levels:
        return
    _, database_url = settings.require_urls()
    conn = await db.connect(database_url)
    try:
        await conn.execute(
            """UPDATE inventory i SET quantity = GREATEST(t.qty, i.reserved_quantity),
                      synced_at = now(), updated_at = now()
                 FROM unnest($1::text[], $2::int[]) AS t(external_id, qty)
                WHERE i.external_id = t.external_id""",
            list(levels), list(levels.values()))
    finally:
        await conn.close()


async def seed_demo(settings: Settings, limit: int | None, data: str = "sample",
                    stock_multiplier: int = 1) -> list[catalog.CdnowOrder]:
    """Migrate, then insert the generated catalogue and the replayed orders' customers.

    Needs only the database: ``shopflow up`` runs it before it starts the
    process tree, so no process ever sees an unmigrated or empty shop.
    """
    await run_migrations(settings)
    orders = catalog.load_orders(DATA_FILES[data], limit=limit)
    _, database_url = settings.require_urls()
    conn = await db.connect(database_url)
    try:
        await catalog.seed(conn, orders, stock_multiplier)
    finally:
        await conn.close()
    return orders


async def replay_orders(settings: Settings, orders: list[catalog.CdnowOrder], day_s: float,
                        timeout_s: float, api_url: str | None = None,
                        progress: bool = True) -> Summary:
    """Replay seeded orders through the running runtime's API; return the summary."""
    redis_url, database_url = settings.require_urls()
    pool = await db.create_pool(database_url, min_size=1, max_size=4)
    client = aioredis.Redis.from_url(redis_url)
    try:
        url = api_url or f"http://{settings.http_host}:{settings.http_port}"
        # The replay plays the checkout service: a staff token that outlives the run.
        token = staff_token(settings, max(settings.token_ttl_s, int(timeout_s) + TOKEN_SLACK_S))
        replay = Replay(url, pool, client, settings.namespace, orders, day_s, timeout_s,
                        progress_to=sys.stderr if progress else None, token=token)
        return await replay.run()
    finally:
        await client.aclose()
        await pool.close()


async def run_demo(settings: Settings, limit: int | None, day_s: float, timeout_s: float,
                   api_url: str | None = None, progress: bool = True, data: str = "sample",
                   stock_multiplier: int = 1) -> Summary:
    """Seed and replay through a runtime that is already running; return the summary.

    The simulator is pinned before seeding, so a sync that runs in between
    writes the same numbers the seed does.
    """
    await pin_simulator_stock(settings, stock_multiplier)
    orders = await seed_demo(settings, limit, data, stock_multiplier)
    return await replay_orders(settings, orders, day_s, timeout_s, api_url, progress)


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """The replay options shared by ``demo`` and ``up``."""
    parser.add_argument("--limit", type=int, default=None,
                        help="replay only the first N orders by date (default: all of --data: "
                             "6,919 in the sample, 69,659 in the master file)")
    parser.add_argument("--day-s", type=float, default=0.02,
                        help="seconds of replay per day of CDNOW data (time compression; default 0.02)")
    parser.add_argument("--timeout-s", type=float, default=900.0,
                        help="give up waiting for outcomes after this long (default 900)")
    parser.add_argument("--data", choices=sorted(DATA_FILES), default="sample",
                        help="which CDNOW file: the 6,919-order sample (default) or the 69,659-order master")
    parser.add_argument("--stock-multiplier", type=int, default=1,
                        help="scale the generated stock levels, and the embedded warehouse "
                             "simulator's (benchmarks use 100 so nothing sells out)")
    parser.add_argument("--summary-json", type=Path, default=None, metavar="PATH",
                        help="also write the summary's figures to PATH as JSON (for scripts)")


def report_summary(summary: Summary, json_path: Path | None) -> int:
    """Print the summary (and write its JSON if asked); the exit status it means."""
    print(summary.render())
    if json_path is not None:
        json_path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return 0 if summary.complete else 1


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.ensure_services(settings)
    summary = asyncio.run(run_demo(settings, args.limit, args.day_s, args.timeout_s, args.api_url,
                                   data=args.data, stock_multiplier=args.stock_multiplier))
    return report_summary(summary, args.summary_json)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow demo`` into the command line."""
    parser = add_command(sub, "demo", _cmd_demo,
                         "replay real orders through a running runtime",
                         "seed the demo shop and replay real CDNOW orders through a running runtime")
    add_replay_arguments(parser)
    parser.add_argument("--api-url", default=None,
                        help="base URL of the HTTP API (default from settings); the replay signs "
                             "its staff token with this machine's token secret, so a remote api "
                             "needs the same SHOPFLOW_TOKEN_SECRET")
