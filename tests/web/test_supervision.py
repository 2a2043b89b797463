"""The api process's root supervisor: the outbox relay and the notifier are supervised actors.

Real server, real PostgreSQL and Redis. The failures are bugs injected into
this test process only: a relay whose publish raises, and a subscriber that
breaks while the notifier hands it an event. (A row whose job can never be
enqueued is not a crash: tests/runtime/test_outbox.py shows it set aside.)
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis
from aiohttp.test_utils import TestServer

from actors.notifier.channels import Viewer
from runtime import db
from runtime.outbox import OutboxRelay, emit
from runtime.root import EXIT_ESCALATED
from runtime.settings import Settings
from runtime.tree import TREE_REPORTER_CHILD, process_key, render_tree, tree_snapshot
from tests.support import (
    http_ready,
    next_supervision_event,
    published_root,
    spawn_module,
    stop,
    with_http_port,
)
from tests.web.conftest import Publisher, ServerFactory, build_app, next_of, subscribe
from web.app import FEED_CHILD, RELAY_CHILD, create_app
from web.auth import TokenSigner
from web.realtime import NOTIFIER_CHILD, NOTIFIER_KEY
from web.supervision import PROCESS_NAME, ROOT_NAME, root_of

WAIT_S = 30.0


async def published_api_root(settings: Settings) -> dict[str, Any]:
    return await asyncio.to_thread(published_root, settings, PROCESS_NAME, None, WAIT_S)


async def event(settings: Settings, kind: str, child: str | None,
                stream: str = "supervision") -> dict[str, Any]:
    return await asyncio.to_thread(next_supervision_event, settings, kind, child, stream, WAIT_S)


class RelayBreaks:
    """Makes the relay's publish raise a bug while ``broken`` (patched on the class)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.broken = False
        real = OutboxRelay.publish_batch

        async def publish_batch(relay: OutboxRelay) -> int:
            if self.broken:
                raise RuntimeError("a bug in the relay (injected by the test)")
            return await real(relay)

        monkeypatch.setattr(OutboxRelay, "publish_batch", publish_batch)


async def insert_row(settings: Settings) -> int:
    conn = await db.connect(settings.database_url or "")
    try:
        async with conn.transaction():
            return await emit(conn, "test-channel", "test.event", {"n": 1})
    finally:
        await conn.close()


async def test_the_api_runs_its_relay_and_notifier_under_one_published_root(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession) -> None:
    server = await start_server(create_app(web_settings))

    root = await published_api_root(web_settings)
    assert root["name"] == ROOT_NAME and root["state"] == "running"
    assert [c["id"] for c in root["children"]] == [RELAY_CHILD, FEED_CHILD, NOTIFIER_CHILD,
                                                   TREE_REPORTER_CHILD]

    # GET /api/v1/supervision: this process (not supervisord's here) with its root and actors.
    headers = {"Authorization": f"Bearer {signer.issue('staff', None, 60)}"}
    async with http.get(server.make_url("/api/v1/supervision"), headers=headers) as resp:
        assert resp.status == 200
        tree = await resp.json()
    [process] = [p for p in tree["children"] if p["pid"] == os.getpid()]
    [supervisor] = process["children"]
    assert supervisor["name"] == ROOT_NAME and supervisor["alive"] is True
    assert [(a["name"], a["alive"]) for a in supervisor["children"]] == [
        (RELAY_CHILD, True), (FEED_CHILD, True), (NOTIFIER_CHILD, True),
        (TREE_REPORTER_CHILD, True)]

    # `shopflow tree` prints the same.
    text = render_tree(await asyncio.to_thread(tree_snapshot, web_settings))
    assert f"(outside supervisord) {PROCESS_NAME} pid {os.getpid()}" in text
    assert f"{ROOT_NAME} [one_for_one, running]" in text
    assert f"{RELAY_CHILD} running restarts 0" in text
    assert f"{NOTIFIER_CHILD} running restarts 0" in text

    await server.close()  # a clean stop removes the process from the view
    client = redis.Redis.from_url(web_settings.redis_url or "")
    try:
        assert not client.exists(process_key(web_settings.namespace, PROCESS_NAME, os.getpid()))
    finally:
        client.close()


async def test_a_crashed_relay_is_restarted_visibly_and_publishes_again(
        web_settings: Settings, start_server: ServerFactory, pool: asyncpg.Pool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = replace(web_settings, supervisor_max_restarts=1_000)  # only restarts here
    breaks = RelayBreaks(monkeypatch)
    server = await start_server(create_app(settings))
    await published_api_root(settings)

    breaks.broken = True
    row_id = await insert_row(settings)
    restart = await event(settings, "restart", RELAY_CHILD)
    assert "RuntimeError" in restart["reason"] and restart["process"] == PROCESS_NAME

    # The bug is gone: a restarted relay publishes the row (nothing was lost meanwhile).
    breaks.broken = False
    async with asyncio.timeout(WAIT_S):
        while await pool.fetchval("SELECT published_at FROM outbox WHERE id = $1",
                                  row_id) is None:
            await asyncio.sleep(0.05)
    [relay, _, _, _] = root_of(server.app).snapshot()
    assert relay.restarts >= 1 and relay.state in ("running", "restarting")


@pytest.mark.slow
async def test_the_api_process_exits_70_when_its_root_gives_up(
        web_settings: Settings) -> None:
    settings = with_http_port(web_settings)
    proc = spawn_module(settings, "tests.web.crashing_api", log_name="api-escalates")
    try:
        async with asyncio.timeout(WAIT_S):
            while not http_ready(settings.http_port):
                assert proc.poll() is None, "the api exited before it served"
                await asyncio.sleep(0.05)
        await insert_row(settings)  # every relay incarnation crashes on it
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), WAIT_S)
    finally:
        stop(proc)
    assert code == EXIT_ESCALATED
    alert = await event(settings, "escalation", None, stream="alerts")
    assert alert["supervisor"] == ROOT_NAME and alert["process"] == PROCESS_NAME


class BreaksOnce:
    """A subscriber whose first delivery raises: a bug inside the notifier's loop."""

    def __init__(self) -> None:
        self.offers = 0

    @property
    def viewer(self) -> Viewer:
        return self

    @property
    def is_staff(self) -> bool:
        return True

    @property
    def customer_id(self) -> int | None:
        return None

    def offer(self, text: str) -> bool:
        self.offers += 1
        if self.offers == 1:
            raise RuntimeError("a subscriber broke mid-delivery")
        return True

    async def offer_backlog(self, text: str) -> bool:
        return self.offer(text)

    def refuse(self, code: int, reason: str) -> None:
        pass


async def test_a_crashed_notifier_is_restarted_and_delivers_again(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession, publish: Publisher) -> None:
    server: TestServer = await start_server(build_app(web_settings, signer))
    await published_api_root(web_settings)
    notifier = server.app[NOTIFIER_KEY]

    async def announce(last_id: str, resync: object) -> None:
        return None

    await notifier.subscribe(BreaksOnce(), "stock-updated", None, None, announce)
    await publish("stock-updated", {"product_id": 1, "n": 0})
    restart = await event(web_settings, "restart", NOTIFIER_CHILD)
    assert "a subscriber broke" in restart["reason"]
    assert await asyncio.to_thread(root_of(server.app).wait_running, NOTIFIER_CHILD, WAIT_S)

    token = signer.issue("customer", 1, 60)
    async with http.ws_connect(f"{server.make_url('/ws')}?token={token}") as ws:
        await subscribe(ws, "stock-updated")
        await publish("stock-updated", {"product_id": 1, "n": 1})
        assert (await next_of(ws, "event"))["payload"] == {"product_id": 1, "n": 1}
    child, reporter = root_of(server.app).snapshot()
    assert (child.id, child.restarts) == (NOTIFIER_CHILD, 1)
    assert reporter.id == TREE_REPORTER_CHILD
