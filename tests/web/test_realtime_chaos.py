"""The notifier under failure: Redis restarts, slow clients, dead peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from runtime import embedded
from runtime.settings import Settings
from tests.web.conftest import (
    Publisher,
    ServerFactory,
    build_app,
    masked_frame,
    next_of,
    notifier_of,
    raw_ws_connect,
    subscribe,
)
from web.auth import TokenSigner
from web.realtime import RECORD_KEY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[embedded.EmbeddedPaths, int, str]]:
    """A Redis this test may stop and start (its own var dir and port)."""
    paths = embedded.EmbeddedPaths(tmp_path / "redis-var")
    port = _free_port()
    url = embedded.ensure_redis(paths, port)
    yield paths, port, url
    embedded.stop_redis(paths, port)


@pytest.mark.chaos
async def test_redis_restart_loses_nothing(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession,
        own_redis: tuple[embedded.EmbeddedPaths, int, str]) -> None:
    paths, port, url = own_redis
    settings = replace(web_settings, redis_url=url)
    server = await start_server(build_app(settings, signer))
    notifier = notifier_of(server)
    ws_url = f"{server.make_url('/ws')}?token={signer.issue('staff', None, 60)}"
    client = aioredis.Redis.from_url(url, decode_responses=True)
    publish = Publisher(client, settings.namespace)
    async with http.ws_connect(ws_url) as ws:
        await subscribe(ws, "stock-updated")
        await publish("stock-updated", {"n": 1})
        first = await next_of(ws, "event")

        await client.aclose()
        await asyncio.to_thread(embedded.stop_redis, paths, port)
        await notifier.wait_for(lambda s: not s.connected, timeout_s=10)
        await asyncio.to_thread(embedded.ensure_redis, paths, port)

        client = aioredis.Redis.from_url(url, decode_responses=True)
        publish = Publisher(client, settings.namespace)
        for n in (2, 3, 4):
            await publish("stock-updated", {"n": n})
        got = [(await next_of(ws, "event", timeout_s=10))["payload"]["n"] for _ in range(3)]
        assert got == [2, 3, 4]
        assert notifier.stats().reconnects >= 1

    # A client that dropped before the restart resumes from its last id across it.
    async with http.ws_connect(ws_url) as ws:
        await subscribe(ws, "stock-updated", since=first["id"])
        got = [(await next_of(ws, "event"))["payload"]["n"] for _ in range(3)]
        assert got == [2, 3, 4]
    await client.aclose()


MIB = 1024 * 1024
BLOB = "x" * 256 * 1024


@pytest.mark.chaos
@pytest.mark.parametrize(("queue_max", "queue_max_bytes"), [
    pytest.param(20, 64 * MIB, id="capped-by-messages"),
    pytest.param(1_000, 1 * MIB, id="capped-by-bytes"),
])
async def test_slow_client_is_closed_4429_and_others_keep_up(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession, publish: Publisher, queue_max: int,
        queue_max_bytes: int) -> None:
    """A client that stops reading is closed 4429 once its send queue reaches either cap (the
    server's record of the close: the client never reads the frame), its queue never held more
    than the caps, and a reading client on the same channel gets every event in order."""
    settings = replace(web_settings, ws_send_queue_max=queue_max,
                       ws_send_queue_max_bytes=queue_max_bytes, ws_heartbeat_s=60.0)
    server = await start_server(build_app(settings, signer))
    notifier, record = notifier_of(server), server.app[RECORD_KEY]
    token = signer.issue("staff", None, 60)
    ws_url = f"{server.make_url('/ws')}?token={token}"
    slow = await raw_ws_connect("127.0.0.1", server.port or 0, f"/ws?token={token}")
    slow.sendall(masked_frame(b'{"type": "subscribe", "channel": "stock-updated"}'))
    async with http.ws_connect(ws_url) as good:
        await subscribe(good, "stock-updated")
        await notifier.wait_for(lambda s: s.subscriptions == 2, timeout_s=5)
        for round_no in range(100):
            for i in range(5):
                await publish("stock-updated", {"n": round_no * 5 + i, "blob": BLOB}, maxlen=50)
            for i in range(5):
                assert (await next_of(good, "event"))["payload"]["n"] == round_no * 5 + i
            if notifier.stats().subscribers == 1:
                break
        await notifier.wait_for(lambda s: s.subscribers == 1, timeout_s=5)
        await record.wait_for(lambda s: s.closes_by_code.get(4429) == 1, timeout_s=5)
        await publish("stock-updated", {"n": -1})
        assert (await next_of(good, "event"))["payload"]["n"] == -1
    slow.close()
    stats = record.stats()
    assert stats.closes_by_code == {4429: 1}  # the good client's own close is not the server's
    assert stats.peak_queue_messages <= queue_max
    assert stats.peak_queue_bytes <= queue_max_bytes
    if queue_max_bytes == 64 * MIB:
        assert stats.peak_queue_messages == queue_max  # the message cap is what closed it
    else:
        assert stats.peak_queue_bytes > queue_max_bytes - len(BLOB) - 1024  # the byte cap did


@pytest.mark.chaos
async def test_dead_peer_is_dropped_by_heartbeat(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession) -> None:
    settings = replace(web_settings, ws_heartbeat_s=0.3)
    server = await start_server(build_app(settings, signer))
    notifier = notifier_of(server)
    ws_url = f"{server.make_url('/ws')}?token={signer.issue('staff', None, 60)}"
    async with http.ws_connect(ws_url, autoping=False) as silent:
        await subscribe(silent, "alerts")
        assert notifier.stats().subscribers == 1
        await notifier.wait_for(lambda s: s.subscribers == 0, timeout_s=5)
