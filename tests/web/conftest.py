"""Fixtures for the web tests: a minimal app with the web face, real servers, real clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from actors.notifier.streams import append_event
from runtime.settings import Settings
from web.auth import SIGNER_KEY, TokenSigner
from web.realtime import NOTIFIER_KEY, setup_realtime

TEST_SECRET = b"test-secret-for-web-tests-only-0123456789"


@pytest.fixture
def web_settings(settings: Settings) -> Settings:
    """Test settings with a fixed secret, short heartbeats and quick XREAD blocks."""
    return replace(settings, token_secret=TEST_SECRET.decode(), notifier_block_ms=200,
                   ws_heartbeat_s=5.0)


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(TEST_SECRET)


def build_app(settings: Settings, signer: TokenSigner | None = None) -> web.Application:
    """The minimal app the web tests serve (create_app will call the same setup_* functions)."""
    app = web.Application()
    if signer is not None:
        app[SIGNER_KEY] = signer
    setup_realtime(app, settings)
    return app


def build_full_app(settings: Settings, signer: TokenSigner | None = None,
                   with_stubs: bool = True) -> web.Application:
    """The app with the whole web face; stubs stand in for other concerns' seams."""
    from tests.web import stubs
    from web import seams
    from web.api_extra import setup_api
    from web.dashboard import setup_dashboard

    app = build_app(settings, signer)
    setup_api(app, settings)
    setup_dashboard(app)
    if with_stubs:
        app[seams.JOBS_ADMIN] = stubs.StubJobsAdmin()
        app[seams.SCHEDULES] = stubs.StubSchedules()
        app[seams.SUPERVISION] = stubs.StubSupervision()
        app[seams.RECOMMENDER] = stubs.StubRecommender()
        app[seams.SUPPORT_DESK] = stubs.StubSupportDesk()
        app[seams.REVIEW_MODERATION] = stubs.StubModeration()
    return app


SEED_SQL = """
INSERT INTO customers (id, name, email) VALUES (1, 'Ana', 'ana@example.com'),
                                              (2, 'Bruno', 'bruno@example.com');
INSERT INTO products (id, sku, name, price_cents) VALUES (1, 'CD-1', 'Album One', 1990),
                                                        (2, 'CD-2', 'Album Two', 2500),
                                                        (3, 'CD-3', 'Album Three', 999);
INSERT INTO inventory (product_id, quantity, external_id, synced_at)
     VALUES (1, 10, 'W-1', now()), (2, 5, 'W-2', NULL), (3, 0, NULL, NULL);
"""


async def seed(settings: Settings) -> None:
    """Two customers and three products."""
    from runtime import db

    conn = await db.connect(settings.database_url or "")
    try:
        await conn.execute(SEED_SQL)
    finally:
        await conn.close()


ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    """Start apps on 127.0.0.1 (real sockets); all are closed at the end of the test."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def realtime_server(web_settings: Settings, signer: TokenSigner,
                          start_server: ServerFactory) -> TestServer:
    return await start_server(build_app(web_settings, signer))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def redis(web_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(web_settings.redis_url or "", decode_responses=True)
    yield client
    await client.aclose()


class Publisher:
    """Writes events the way the outbox relay does."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace

    async def __call__(self, channel: str, payload: dict[str, Any], event_type: str = "test",
                       maxlen: int | None = None, correlation_id: str = "") -> str:
        return await append_event(self.redis, self.namespace, channel, event_type, payload,
                                  correlation_id=correlation_id, maxlen=maxlen)


@pytest.fixture
def publish(redis: aioredis.Redis, web_settings: Settings) -> Publisher:
    return Publisher(redis, web_settings.namespace)


async def next_json(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> dict[str, Any]:
    """The next text frame as JSON (fails the test on close or timeout)."""
    msg = await ws.receive(timeout=timeout_s)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected text, got {msg.type} {msg.data!r}"
    data: dict[str, Any] = msg.json()
    return data


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str,
                  timeout_s: float = 5.0) -> dict[str, Any]:
    """The next message of type ``kind``, skipping others."""
    async with asyncio.timeout(timeout_s):
        while True:
            data = await next_json(ws, timeout_s)
            if data["type"] == kind:
                return data


async def subscribe(ws: aiohttp.ClientWebSocketResponse, channel: str,
                    **extra: Any) -> dict[str, Any]:
    await ws.send_json({"type": "subscribe", "channel": channel, **extra})
    return await next_of(ws, "subscribed")


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> int | None:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(timeout_s):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return ws.close_code


def notifier_of(server: TestServer):  # type: ignore[no-untyped-def]
    return server.app[NOTIFIER_KEY]


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client→server WebSocket frame (FIN set, masked as RFC 6455 requires)."""
    import os
    import struct

    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


async def raw_ws_connect(host: str, port: int, path: str, rcvbuf_bytes: int = 4096) -> Any:
    """A hand-made WebSocket client on a tiny receive buffer that reads only the handshake.

    It exists to be a client that stops reading: aiohttp's own client keeps
    draining the socket, and loopback buffers are large, so it would take
    hundreds of megabytes before the server noticed.
    """
    import base64
    import os
    import socket as socket_mod

    loop = asyncio.get_running_loop()
    sock = socket_mod.socket()
    sock.setsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_RCVBUF, rcvbuf_bytes)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    await loop.sock_sendall(sock, request.encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += await loop.sock_recv(sock, 1)
    assert received.startswith(b"HTTP/1.1 101"), received
    return sock
