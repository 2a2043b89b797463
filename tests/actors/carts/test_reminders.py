"""Abandoned-cart reminders: one e-mail, cancelled by checkout or change, never twice."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from dramatiq import Worker

from actors.carts.jobs import declare_cart_actors
from actors.carts.messages import REMINDER_DUE, SEND_EMAIL
from actors.carts.reminders import (
    cancel_reminder,
    fire_reminder,
    reminder_key,
    schedule_reminder,
    sweep_idle_carts,
)
from runtime import db
from runtime.broker import enqueue_job, setup_broker
from runtime.loop import LoopBridge
from runtime.settings import Settings

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
    [email_job] = await _jobs(pool, SEND_EMAIL.actor)
    email = email_job["args"][0]
    assert email["idempotency_key"] == reminder_key(cart_id) and email["to"] == "ana@example.com"
    assert email["template"] == "cart_reminder" and email["template_data"]["items"][0]["quantity"] == 2

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
    assert await _jobs(pool, SEND_EMAIL.actor) == []


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
    assert len(await _jobs(pool, SEND_EMAIL.actor)) == 1


async def test_not_due_and_anonymous_carts(pool: asyncpg.Pool) -> None:
    cart_id, updated = await _cart(pool, idle_for_s=10)
    anon_id, _ = await _cart(pool, idle_for_s=DAY_S * 2, customer=False)
    async with pool.acquire() as conn:
        await schedule_reminder(conn, cart_id, DAY_S)
        assert await fire_reminder(conn, cart_id, updated.isoformat(), DAY_S) == "not_due"
        assert await schedule_reminder(conn, anon_id, DAY_S) is None


async def test_sweep_schedules_unannounced_idle_carts_once(pool: asyncpg.Pool) -> None:
    await _cart(pool, idle_for_s=DAY_S + 5)
    await _cart(pool, idle_for_s=60)
    async with pool.acquire() as conn:
        assert await sweep_idle_carts(conn, DAY_S) == 1
        assert await sweep_idle_carts(conn, DAY_S) == 0


@pytest.mark.slow
async def test_reminder_runs_as_a_delayed_dramatiq_job(settings: Settings, pool: asyncpg.Pool) -> None:
    cart_id, _ = await _cart(pool, idle_for_s=0)
    async with pool.acquire() as conn:
        # Re-stamp the cart so it becomes due one second from now.
        await conn.execute("UPDATE carts SET updated_at = now() WHERE id = $1", cart_id)
        await schedule_reminder(conn, cart_id, idle_s=1)
    [job] = await _jobs(pool, REMINDER_DUE.actor)
    assert 0 < job["options"]["delay_ms"] <= 1000

    bridge = LoopBridge("test-carts").start()
    worker_pool = bridge.run(db.create_pool(settings.database_url or "", max_size=2))
    broker = setup_broker(replace(settings, cart_idle_s=1))
    declare_cart_actors(broker, bridge, worker_pool, replace(settings, cart_idle_s=1))
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        enqueue_job(broker, job)  # what the outbox relay does after commit
        async with asyncio.timeout(15):
            while await pool.fetchval("SELECT status FROM cart_reminders") != "sent":
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(worker.stop)
        bridge.run(worker_pool.close())
        bridge.stop()
        broker.close()
    assert len(await _jobs(pool, SEND_EMAIL.actor)) == 1
