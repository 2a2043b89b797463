"""The daily sales report against real PostgreSQL: local-day bounds, figures, storage,
exactly one hand-off to the emailer."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from actors.emailer import emails
from actors.emailer.transports import OutboxTransport
from actors.reports.sales import (
    build_daily_sales_report,
    load_report,
    local_day_bounds,
    previous_local_day,
    send_daily_report,
    sold_statuses,
)
from runtime.broker import QUEUE_EMAILS, setup_broker
from runtime.outbox import OutboxRelay
from runtime.settings import Settings
from tests.actors.housekeeping import shopdata
from tests.runtime.scheduling.helpers import enqueued

ZONE = "America/Sao_Paulo"
# 08:00 local on 3 December: the report covers 2 December, 03:00 UTC to 03:00 UTC.
RUN_AT = datetime(2026, 12, 3, 11, 0, tzinfo=UTC)
DAY_START = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
DAY_END = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)


def test_previous_local_day_and_its_bounds_across_dst() -> None:
    assert previous_local_day(RUN_AT, ZONE) == date(2026, 12, 2)
    # 00:30 UTC on the 3rd is still the 2nd in Sao Paulo: "yesterday" is the 1st.
    assert previous_local_day(datetime(2026, 12, 3, 0, 30, tzinfo=UTC), ZONE) == date(2026, 12, 1)
    assert local_day_bounds(date(2026, 12, 2), ZONE) == (DAY_START, DAY_END)
    start, end = local_day_bounds(date(2018, 11, 4), ZONE)  # midnight skipped: a 23-hour day
    assert start == datetime(2018, 11, 4, 3, 0, tzinfo=UTC)
    assert end - start == timedelta(hours=23)
    start, end = local_day_bounds(date(2019, 2, 16), ZONE)  # 23:00 repeated: a 25-hour day
    assert end - start == timedelta(hours=25)
    start, end = local_day_bounds(date(2024, 11, 3), "America/New_York")
    assert end - start == timedelta(hours=25)


def test_sold_statuses_follow_the_state_machine() -> None:
    assert sold_statuses() == sorted(["paid", "allocated", "processing", "label_created",
                                      "ready_to_ship", "shipped", "delivered"])


async def seed(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await shopdata.customer(conn)
        for pid in (1, 2, 3):
            await shopdata.product(conn, pid, quantity=100)
        inside = DAY_START + timedelta(hours=5)
        await shopdata.order(conn, "paid", {1: 2, 2: 1}, created_at=DAY_START)  # 3000
        await shopdata.order(conn, "delivered", {2: 3}, created_at=inside, price_cents=1500)
        await shopdata.order(conn, "shipped", {3: 1}, created_at=DAY_END - timedelta(seconds=1))
        await shopdata.order(conn, "failed", {1: 9}, created_at=inside)
        await shopdata.order(conn, "cancelled", {1: 9}, created_at=inside)
        await shopdata.order(conn, "pending", {1: 9}, created_at=inside)
        # Outside the local day on either side.
        await shopdata.order(conn, "paid", {1: 50}, created_at=DAY_START - timedelta(seconds=1))
        await shopdata.order(conn, "paid", {1: 50}, created_at=DAY_END)


async def test_report_figures_for_the_previous_local_day(pool: asyncpg.Pool) -> None:
    await seed(pool)
    report = await build_daily_sales_report(pool, RUN_AT, ZONE)
    assert report.report_date == date(2026, 12, 2)
    assert (report.orders_count, report.completed_orders, report.failed_orders,
            report.cancelled_orders) == (6, 3, 1, 1)
    assert report.revenue_cents == 3000 + 4500 + 1000
    assert report.average_basket_cents == 2833  # 8500 / 3, rounded
    assert [(p["product_id"], p["units"], p["revenue_cents"]) for p in report.top_products] == [
        (2, 4, 1000 + 4500), (1, 2, 2000), (3, 1, 1000)]
    async with pool.acquire() as conn:
        stored = await load_report(conn, date(2026, 12, 2))
    assert stored is not None
    assert stored["revenue_cents"] == 8500 and stored["handed_off_at"] is None
    assert stored["top_products"][0]["sku"] == "SKU-2"
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_recomputing_replaces_figures_and_hands_off_once(pool: asyncpg.Pool) -> None:
    await seed(pool)
    await build_daily_sales_report(pool, RUN_AT, ZONE, hand_off=True)
    async with pool.acquire() as conn:
        await shopdata.order(conn, "paid", {3: 1}, created_at=DAY_START + timedelta(hours=1))
    again = await build_daily_sales_report(pool, RUN_AT + timedelta(minutes=5), ZONE,
                                           hand_off=True)
    assert again.completed_orders == 4
    assert await pool.fetchval("SELECT count(*) FROM daily_sales_reports") == 1
    assert await send_daily_report(pool, RUN_AT + timedelta(hours=1), ZONE) is False
    rows = await pool.fetch("SELECT channel, event_type, payload, job FROM outbox")
    assert len(rows) == 1
    assert rows[0]["channel"] == "jobs" and rows[0]["payload"] == {"report_date": "2026-12-02"}
    assert rows[0]["job"] == {"queue": "emails", "actor": "send_daily_report",
                              "args": ["2026-12-02"], "options": {}}


async def test_the_morning_email_computes_a_missing_report_once_even_racing(
    pool: asyncpg.Pool,
) -> None:
    await seed(pool)
    results = await asyncio.gather(
        send_daily_report(pool, RUN_AT + timedelta(hours=1), ZONE),
        send_daily_report(pool, RUN_AT + timedelta(hours=1), ZONE),
    )
    assert sorted(results) == [False, True]
    assert await pool.fetchval("SELECT revenue_cents FROM daily_sales_reports") == 8500
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE job IS NOT NULL") == 1


async def test_an_empty_day_is_a_report_of_zeros(pool: asyncpg.Pool) -> None:
    report = await build_daily_sales_report(pool, RUN_AT, ZONE)
    assert (report.orders_count, report.revenue_cents, report.average_basket_cents,
            report.top_products) == (0, 0, 0, [])


async def test_the_daily_report_reaches_the_team_once_a_day_even_when_run_twice(
    pool: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    """08:00 build, 09:00 hand-off (both jobs run twice), the outbox relay enqueues the
    e-mail job on the real broker, the emailer runs it (twice: a redelivery): one email_log
    row and one .eml file per day, with the day's figures; the next day gets its own."""
    await seed(pool)
    broker = setup_broker(settings)
    redis = aioredis.Redis.from_url(settings.redis_url or "")
    relay = OutboxRelay(pool, settings.database_url or "", redis, broker, settings.namespace)
    transport = OutboxTransport(tmp_path)
    outcomes: list[str] = []
    try:
        for day_offset in (0, 1):
            run_at = RUN_AT + timedelta(days=day_offset)
            for _ in range(2):
                await build_daily_sales_report(pool, run_at, ZONE)
                await send_daily_report(pool, run_at + timedelta(hours=1), ZONE)
            await relay.publish_batch()
            for message in enqueued(settings, QUEUE_EMAILS) * 2:
                outcome = await emails.send_daily_report(pool, transport, *message.args)
                outcomes.append(outcome.result)
            broker.flush(QUEUE_EMAILS)
    finally:
        broker.close()
        await redis.aclose()
    assert outcomes == ["sent", "already_sent"] * 2
    rows = await pool.fetch("SELECT idempotency_key, kind, recipient, status FROM email_log "
                            "ORDER BY idempotency_key")
    assert [tuple(r) for r in rows] == [
        ("daily-report:2026-12-02", "daily_report", emails.REPORT_RECIPIENT, "sent"),
        ("daily-report:2026-12-03", "daily_report", emails.REPORT_RECIPIENT, "sent")]
    files = sorted(tmp_path.glob("*.eml"))
    assert len(files) == 2
    first = files[0].read_text()
    assert "Vendas de 2026-12-02" in first and "R$ 85,00" in first
