"""Abandoned-cart reminders driven through the HTTP API, a real Dramatiq worker and the outbox.

The carts concern runs in a real worker on real Redis; the outbox relay is
stepped by the test (``publish_batch``), so which job exists when is
deterministic. The test waits on the carts actor's answers (recorded by the
asker the thin Dramatiq actors call), never on the clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from dramatiq import Worker

from actors.carts import actor as carts_actor
from actors.carts.messages import CART_CHANGED, REMINDER_DUE, SEND_CART_REMINDER
from actors.inventory.messages import RESERVE_STOCK
from runtime.broker import QUEUE_MAINTENANCE
from runtime.outbox import OutboxRelay
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import build_root
from tests.web.conftest import ServerFactory, build_full_app, seed
from web.auth import TokenSigner

IDLE_S = 1  # reminders fall due a second after the cart's last change
WAIT_S = 20.0


class Answers:
    """What the carts actor answered, per message; thread-safe, waitable."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[Any, ...], Any]] = []
        self._cond = threading.Condition()

    def record(self, message: tuple[Any, ...], answer: Any) -> None:
        with self._cond:
            self.seen.append((message, answer))
            self._cond.notify_all()

    def of(self, kind: str) -> list[tuple[tuple[Any, ...], Any]]:
        with self._cond:
            return [(m, a) for m, a in self.seen if m[0] == kind]

    async def wait(self, kind: str, count: int) -> list[tuple[tuple[Any, ...], Any]]:
        """The first ``count`` answers to ``kind`` messages (fails after WAIT_S)."""

        def wait_sync() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.of(kind)) >= count, WAIT_S)

        assert await asyncio.to_thread(wait_sync), f"no {count} {kind!r} answers: {self.seen}"
        return self.of(kind)[:count]


@dataclass
class Shop:
    """The api, the carts worker and a relay the test steps."""

    call: Callable[..., Any]
    pool: asyncpg.Pool
    relay: OutboxRelay
    answers: Answers
    ctx: ProcessContext

    async def publish(self) -> int:
        return await self.relay.publish_batch()

    async def jobs(self, actor: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT job FROM outbox WHERE job->>'actor' = $1 ORDER BY id", actor)
        return [r["job"] for r in rows]

    async def reminder(self) -> asyncpg.Record:
        row: asyncpg.Record | None = await self.pool.fetchrow("SELECT * FROM cart_reminders")
        assert row is not None, "the cart has no reminder row"
        return row


@pytest.fixture
async def shop(web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
               pool: asyncpg.Pool, http: aiohttp.ClientSession) -> AsyncIterator[Shop]:
    settings = replace(web_settings, cart_idle_s=IDLE_S)
    await seed(settings)
    server: TestServer = await start_server(build_full_app(settings, signer))
    token = signer.issue("customer", 1, 600)

    async def call(method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with http.request(method, server.make_url(path), json=json,
                                headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body

    ctx = await asyncio.to_thread(ProcessContext.start, settings, 2)
    concern = carts_actor.concern(ctx)
    root = build_root("test-carts", [concern]).start()
    answers = Answers()

    def ask(child: str, message: Any) -> Any:
        answer = root.ask(child, message, 30)
        answers.record(message, answer)
        return answer

    concern.declare(ctx.broker, ask)
    worker = Worker(ctx.broker, queues={QUEUE_MAINTENANCE}, worker_threads=2, worker_timeout=50)
    redis = aioredis.Redis.from_url(settings.redis_url or "")
    relay = OutboxRelay(pool, settings.database_url or "", redis, ctx.broker, settings.namespace)
    worker.start()
    try:
        yield Shop(call, pool, relay, answers, ctx)
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(root.stop)
        await asyncio.to_thread(ctx.stop)
        await redis.aclose()


async def test_a_change_supersedes_and_checkout_cancels_the_reminder(shop: Shop) -> None:
    status, cart = await shop.call("POST", "/api/v1/carts", {})
    assert status == 201
    items = f"/api/v1/carts/{cart['id']}/items"
    status, v1 = await shop.call("PUT", f"{items}/1", {"quantity": 1})
    assert status == 200
    assert [j["args"] for j in await shop.jobs(CART_CHANGED.actor)] == [[cart["id"]]], (
        "the change put its CART_CHANGED job in the outbox, in its own transaction")
    await shop.publish()
    [(_, due_at)] = await shop.answers.wait("changed", 1)
    assert due_at is not None  # scheduled for the cart's first version
    reminder = await shop.reminder()
    assert reminder["status"] == "scheduled"
    assert reminder["cart_updated_at"].isoformat() == v1["updated_at"].replace("Z", "+00:00")

    status, _ = await shop.call("PUT", f"{items}/2", {"quantity": 2})  # a change: version 2
    assert status == 200
    await shop.publish()  # REMINDER_DUE(version 1) and the new CART_CHANGED
    [_, (_, rescheduled)] = await shop.answers.wait("changed", 2)
    assert rescheduled is not None, "the change scheduled a reminder for its own version"
    [(_, first_due)] = await shop.answers.wait("due", 1)
    assert first_due == "superseded", "the first version's reminder never goes out"

    status, order = await shop.call("POST", f"/api/v1/carts/{cart['id']}/checkout")
    assert status == 201
    assert order["status"] == "pending" and order["external_ref"] == f"cart:{cart['id']}"
    assert [(i["product_id"], i["quantity"]) for i in order["items"]] == [(1, 1), (2, 2)]
    reminder = await shop.reminder()
    assert (reminder["status"], reminder["reason"]) == ("cancelled", "checked_out"), (
        "checkout cancelled the reminder in the transaction that placed the order")
    assert [j["args"] for j in await shop.jobs(RESERVE_STOCK.actor)] == [[order["id"]]]

    status, again = await shop.call("POST", f"/api/v1/carts/{cart['id']}/checkout")
    assert (status, again["id"]) == (200, order["id"]), "a retried checkout: the same order"
    assert (await shop.call("PUT", f"{items}/1", {"quantity": 5}))[0] == 409

    await shop.publish()  # REMINDER_DUE(version 2) and the checkout's CART_CHANGED
    [_, (_, second_due)] = await shop.answers.wait("due", 2)
    assert second_due == "cancelled:checked_out"
    assert await shop.jobs(SEND_CART_REMINDER.actor) == []
    assert await shop.pool.fetchval("SELECT count(*) FROM email_log") == 0
    assert await shop.pool.fetchval("SELECT count(*) FROM orders") == 1


async def test_emptying_the_cart_cancels_the_reminder(shop: Shop) -> None:
    _, cart = await shop.call("POST", "/api/v1/carts", {})
    await shop.call("PUT", f"/api/v1/carts/{cart['id']}/items/1", {"quantity": 1})
    await shop.publish()
    await shop.answers.wait("changed", 1)
    status, emptied = await shop.call("DELETE", f"/api/v1/carts/{cart['id']}/items/1")
    assert status == 200 and emptied["items"] == []
    await shop.publish()
    await shop.answers.wait("changed", 2)
    reminder = await shop.reminder()
    assert (reminder["status"], reminder["reason"]) == ("cancelled", "empty")
    [(_, due)] = await shop.answers.wait("due", 1)
    assert due == "cancelled:empty"
    assert (await shop.call("POST", f"/api/v1/carts/{cart['id']}/checkout"))[0] == 409


async def test_the_reminder_is_sent_once_whatever_is_redelivered_or_changed(
        shop: Shop, web_settings: Settings) -> None:
    _, cart = await shop.call("POST", "/api/v1/carts", {})
    await shop.call("PUT", f"/api/v1/carts/{cart['id']}/items/3", {"quantity": 4})
    await shop.publish()
    await shop.answers.wait("changed", 1)
    await shop.publish()  # the delayed REMINDER_DUE
    [(due_message, outcome)] = await shop.answers.wait("due", 1)
    assert outcome == "sent"
    await shop.publish()  # SEND_CART_REMINDER
    [(_, delivered)] = await shop.answers.wait("send", 1)
    assert delivered == "sent"

    # A duplicated delayed job and a redelivered send job change nothing.
    REMINDER_DUE.send(shop.ctx.broker, *due_message[1:])
    SEND_CART_REMINDER.send(shop.ctx.broker, cart["id"])
    assert [a for _, a in await shop.answers.wait("due", 2)] == ["sent", "already_sent"]
    assert [a for _, a in await shop.answers.wait("send", 2)] == ["sent", "already_sent"]

    # A later change schedules no second reminder.
    status, _ = await shop.call("PUT", f"/api/v1/carts/{cart['id']}/items/3", {"quantity": 1})
    assert status == 200
    await shop.publish()
    [_, (_, after_change)] = await shop.answers.wait("changed", 2)
    assert after_change is None
    assert len(await shop.jobs(REMINDER_DUE.actor)) == 1
    assert await shop.pool.fetchval("SELECT count(*) FROM email_log") == 1
    assert len(list(web_settings.mail_dir.iterdir())) == 1
