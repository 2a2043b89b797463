"""Abandoned-cart reminders: one e-mail, cancelled by checkout or change, never twice."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from dramatiq import Worker

from actors.carts import actor as carts
from actors.carts.messages import REMINDER_DUE, SEND_CART_REMINDER
from actors.carts.reminders import (
    cancel_reminder,
    fire_reminder,
    reminder_key,
    schedule_reminder,
    send_reminder_email,
    sweep_idle_carts,
)
from actors.emailer.transports import OutboxTransport
from runtime.broker import QUEUE_MAINTENANCE
from runtime.outbox import OutboxRelay
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import build_root

DAY_S = 24 * 3600


async def _cart(pool: asyncpg.Pool, idle_for_s: float, customer: bool = True) -> tuple[int, datetime]:
    updated = datetime.now(UTC) - timedelta(seconds=idle_for_s)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ana', 'ana@example.com') "
                           "ON CONFLICT DO NOTHING")
        await conn.execute("INSERT INTO products (id, sku, name, price_cents) VALUES (1, 'S1', 'Disco', 4990) "
                           "ON CONFLICT DO NOTHING")
        cart_id = await conn.fetchval(
            "INSERT INTO carts (customer_id, updated_at) VALUES ($1, $2) RETURNING id",
            1 if customer else None, updated)
        await conn.execute("INSERT INTO cart_items (cart_id, product_id, quantity) VALUES ($1, 1, 2)",
                           cart_id)
    return cart_id, updated


async def _jobs(pool: asyncpg.Pool, actor: str) -> list[dict]:
    rows = await pool.fetch("SELECT job FROM outbox WHERE job->>'actor' = $1 ORDER BY id", actor)
    return [r["job"] for r in rows]


async def test_idle_cart_gets_exactly_one_reminder(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=DAY_S + 60)
    async with pool.acquire() as conn:
        plan = await schedule_reminder(conn, cart_id, DAY_S)
    assert plan is not None and plan.due_at == updated + timedelta(seconds=DAY_S)
    [due_job] = await _jobs(pool, REMINDER_DUE.actor)
    assert due_job["args"] == [cart_id, updated.isoformat()]
    assert due_job["options"]["delay_ms"] == 0  # already overdue

    async def fire() -> str:
        async with pool.acquire() as conn:
            return await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S)

    outcomes = await asyncio.gather(fire(), fire(), fire())  # redelivered / duplicated jobs
    assert sorted(outcomes) == ["already_sent", "already_sent", "sent"]
    [send_job] = await _jobs(pool, SEND_CART_REMINDER.actor)
    assert send_job["args"] == [cart_id]

    async with pool.acquire() as conn:  # a later change never schedules a second one
        await conn.execute("UPDATE carts SET updated_at = now() WHERE id = $1", cart_id)
        assert await schedule_reminder(conn, cart_id, DAY_S) is None


async def test_checkout_cancels_the_reminder(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=0)
    async with pool.acquire() as conn:
        plan = await schedule_reminder(conn, cart_id, DAY_S)
        assert plan is not None
        assert (await _jobs(pool, REMINDER_DUE.actor))[0]["options"]["delay_ms"] > (DAY_S - 60) * 1000
        async with conn.transaction():  # the checkout
            await conn.execute("UPDATE carts SET status = 'checked_out' WHERE id = $1", cart_id)
            assert await cancel_reminder(conn, cart_id, "checked_out")
        outcome = await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S, now=plan.due_at)
    assert outcome == "cancelled:checked_out"
    assert await _jobs(pool, SEND_CART_REMINDER.actor) == []


async def test_checkout_without_cancel_still_stops_the_job(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=DAY_S + 1)
    async with pool.acquire() as conn:
        await schedule_reminder(conn, cart_id, DAY_S)
        await conn.execute("UPDATE carts SET status = 'checked_out' WHERE id = $1", cart_id)
        assert await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S) == "cancelled:checked_out"
    assert await pool.fetchval("SELECT status FROM cart_reminders") == "cancelled"


async def test_a_change_supersedes_the_pending_job(pool: asyncpg.Pool) -> None:
    cart_id, first = await _cart(pool, idle_for_s=DAY_S + 10)
    async with pool.acquire() as conn:
        await schedule_reminder(conn, cart_id, DAY_S)
        second = await conn.fetchval(
            "UPDATE carts SET updated_at = now() - interval '25 hours' + interval '5 seconds' "
            "WHERE id = $1 RETURNING updated_at", cart_id)
        await schedule_reminder(conn, cart_id, DAY_S)
        assert await fire_reminder(conn, cart_id, first.isoformat(), DAY_S) == "superseded"
        assert await fire_reminder(conn, cart_id, second.isoformat(), DAY_S) == "sent"
    assert len(await _jobs(pool, REMINDER_DUE.actor)) == 2
    assert len(await _jobs(pool, SEND_CART_REMINDER.actor)) == 1


async def test_not_due_and_anonymous_carts(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=10)
    anon_id, _ = await _cart(pool, idle_for_s=DAY_S * 2, customer=False)
    async with pool.acquire() as conn:
        await schedule_reminder(conn, cart_id, DAY_S)
        assert await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S) == "not_due"
        assert await schedule_reminder(conn, anon_id, DAY_S) is None


async def test_a_reminder_that_fires_early_comes_back_when_due(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=10)
    async with pool.acquire() as conn:
        plan = await schedule_reminder(conn, cart_id, DAY_S)
        assert plan is not None
        assert await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S) == "not_due"
        first, again = await _jobs(pool, REMINDER_DUE.actor)
        # the early job put itself back, for the same cart version, delayed to the due time
        assert again["args"] == first["args"] == [cart_id, updated.isoformat()]
        assert again["options"]["delay_ms"] > (DAY_S - 60) * 1000
        assert await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S, now=plan.due_at) == "sent"
        assert await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S, now=plan.due_at) == "already_sent"
    assert len(await _jobs(pool, SEND_CART_REMINDER.actor)) == 1


async def test_sweep_fires_a_stranded_reminder_again_and_it_is_sent_once(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=DAY_S + 2 * 3600)
    async with pool.acquire() as conn:
        await schedule_reminder(conn, cart_id, DAY_S)  # its due job is lost on the way
        assert await sweep_idle_carts(conn, DAY_S) == 1
        jobs = await _jobs(pool, REMINDER_DUE.actor)
        assert len(jobs) == 2 and jobs[1]["args"] == [cart_id, updated.isoformat()]
        assert jobs[1]["options"]["delay_ms"] == 0
        outcomes = [await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S) for _ in jobs]
        assert outcomes == ["sent", "already_sent"]
        assert await sweep_idle_carts(conn, DAY_S) == 0  # sent: nothing stranded any more
    assert len(await _jobs(pool, SEND_CART_REMINDER.actor)) == 1


async def test_sweep_schedules_unannounced_idle_carts_once(pool: asyncpg.Pool) -> None:
    await _cart(pool, idle_for_s=DAY_S + 5)
    await _cart(pool, idle_for_s=60)
    async with pool.acquire() as conn:
        assert await sweep_idle_carts(conn, DAY_S) == 1
        assert await sweep_idle_carts(conn, DAY_S) == 0


async def test_the_reminder_email_is_delivered_once(pool: asyncpg.Pool, tmp_path) -> None:
    cart_id, _ = await _cart(pool, idle_for_s=DAY_S + 1)
    transport = OutboxTransport(tmp_path / "mail")
    first = await send_reminder_email(pool, transport, cart_id)
    again = await send_reminder_email(pool, transport, cart_id)  # a redelivered job
    assert (first.result, again.result) == ("sent", "already_sent")
    row = await pool.fetchrow("SELECT * FROM email_log WHERE idempotency_key = $1",
                              reminder_key(cart_id))
    assert row["status"] == "sent" and row["kind"] == "cart_reminder"
    [eml] = list((tmp_path / "mail").iterdir())
    assert "2 x Disco" in eml.read_text()


@pytest.mark.slow
async def test_reminder_runs_as_a_delayed_dramatiq_job(settings: Settings, pool: asyncpg.Pool) -> None:
    settings = replace(settings, cart_idle_s=1)
    cart_id, _ = await _cart(pool, idle_for_s=0)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE carts SET updated_at = now() WHERE id = $1", cart_id)
        await schedule_reminder(conn, cart_id, idle_s=1)
    [job] = await _jobs(pool, REMINDER_DUE.actor)
    assert 0 < job["options"]["delay_ms"] <= 1000

    ctx = await asyncio.to_thread(ProcessContext.start, settings, 2)
    concern = carts.concern(ctx)
    root = build_root("test-flow", [concern]).start()
    concern.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 30))
    worker = Worker(ctx.broker, queues={QUEUE_MAINTENANCE}, worker_threads=1, worker_timeout=100)
    redis = aioredis.Redis.from_url(settings.redis_url or "")
    relay = OutboxRelay(pool, settings.database_url or "", redis, ctx.broker, settings.namespace)
    worker.start()
    try:
        assert await relay.publish_batch() == 1  # the delayed REMINDER_DUE job
        async with asyncio.timeout(15):
            while await pool.fetchval("SELECT status FROM cart_reminders") != "sent":
                await asyncio.sleep(0.05)
        assert await relay.publish_batch() == 1  # SEND_CART_REMINDER
        async with asyncio.timeout(15):
            while await pool.fetchval("SELECT status FROM email_log") != "sent":
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(root.stop)
        await asyncio.to_thread(ctx.stop)
        await redis.aclose()
    assert len(list(settings.mail_dir.iterdir())) == 1
