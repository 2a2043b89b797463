"""Measure the scheduler's costs on this machine (numbers for docs/scheduling.md).

Run:  SHOPFLOW_VAR_DIR=var SHOPFLOW_EMBEDDED_REDIS_PORT=16391 SHOPFLOW_EMBEDDED_PG_PORT=15441 \
      python bench/scheduling_bench.py

Uses the embedded Redis/PostgreSQL from the settings (a database ``sched_bench`` is
created and dropped). Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from actors.housekeeping.reservations import release_expired_reservations
from actors.housekeeping.schedules import shop_schedules
from runtime import db, embedded
from runtime.broker import setup_broker
from runtime.scheduling import (
    CronTrigger,
    Scheduler,
    SchedulerStore,
    broker_sender,
    connect_redis,
    slots_between,
)
from runtime.settings import Settings


def bench_triggers() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for expr, zone in (("*/15 * * * *", "America/New_York"), ("0 8 * * *", "America/Sao_Paulo")):
        trigger = CronTrigger.parse(expr, zone)
        start = datetime(2024, 1, 1, tzinfo=UTC)
        t0 = time.perf_counter()
        count = sum(1 for _ in slots_between(trigger, start, start + timedelta(days=365)))
        elapsed = time.perf_counter() - t0
        out[f"{expr} {zone}"] = {"slots_in_a_year": count,
                                 "us_per_slot": round(elapsed / count * 1e6, 1)}
    return out


async def bench_ticks(settings: Settings) -> dict[str, Any]:
    redis = connect_redis(settings.redis_url or "")
    broker = setup_broker(settings)
    schedules = shop_schedules(settings)
    instances = [Scheduler(SchedulerStore(redis, settings.namespace), broker_sender(broker),
                           schedules, instance_id=f"bench-{i}") for i in range(3)]
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    leader_s: list[float] = []
    standby_s: list[float] = []
    sent = 0
    for step in range(600):  # ten simulated minutes at 1 s ticks
        for inst in instances:
            t0 = time.perf_counter()
            report = await inst.tick(now)
            (leader_s if report.leader else standby_s).append(time.perf_counter() - t0)
            sent += len(report.sent)
        now += timedelta(seconds=1)
    broker.close()
    async for key in redis.scan_iter(f"{settings.namespace}*"):  # only our own keys
        await redis.delete(key)
    await redis.aclose()
    return {"schedules": len(schedules), "leader_tick_ms_median": _ms(leader_s),
            "standby_tick_ms_median": _ms(standby_s), "messages_sent": sent}


def _ms(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2] * 1000, 2)


async def bench_release(server_url: str) -> dict[str, Any]:
    admin_url = server_url.rsplit("/", 1)[0] + "/postgres"
    admin = await asyncpg.connect(admin_url)
    await admin.execute('DROP DATABASE IF EXISTS "sched_bench" WITH (FORCE)')
    await admin.execute('CREATE DATABASE "sched_bench"')
    url = server_url.rsplit("/", 1)[0] + "/sched_bench"
    try:
        conn = await db.connect(url)
        await db.migrate(conn)
        past = datetime.now(UTC) - timedelta(minutes=1)
        await conn.execute("INSERT INTO customers (id, name, email) VALUES (1, 'c', 'c@x')")
        await conn.execute("""INSERT INTO products (id, sku, name, price_cents)
                              SELECT g, 'S' || g, 'P' || g, 100 FROM generate_series(1, 100) g""")
        await conn.execute("""INSERT INTO orders (id, customer_id, status, total_cents)
                              SELECT g, 1, 'reserved', 0 FROM generate_series(1, 10000) g""")
        await conn.execute("""INSERT INTO inventory_reservations
                                  (order_id, product_id, quantity, expires_at)
                              SELECT g, 1 + g % 100, 1, $1::timestamptz
                                FROM generate_series(1, 10000) g""", past)
        await conn.execute("""INSERT INTO inventory (product_id, quantity, reserved_quantity)
                              SELECT g, 1000, 100 FROM generate_series(1, 100) g""")
        await conn.close()
        pool = await db.create_pool(url, min_size=1, max_size=2)
        t0 = time.perf_counter()
        outcome = await release_expired_reservations(pool, datetime.now(UTC))
        elapsed = time.perf_counter() - t0
        await pool.close()
        return {"reservations": outcome.reservations, "orders_cancelled": outcome.orders_cancelled,
                "seconds": round(elapsed, 2),
                "reservations_per_s": round(outcome.reservations / elapsed)}
    finally:
        await admin.execute('DROP DATABASE IF EXISTS "sched_bench" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    settings = embedded.ensure_services(Settings.from_env())
    result = {
        "triggers": bench_triggers(),
        "ticks": await bench_ticks(settings),
        "release": await bench_release(settings.database_url or ""),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
