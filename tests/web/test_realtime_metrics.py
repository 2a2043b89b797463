"""The WebSocket's metrics, read back from a real scrape while real clients come and go."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
from aiohttp.test_utils import TestServer

from runtime.settings import Settings
from tests.runtime.metrics_helpers import Samples, scrape, value
from tests.web.conftest import Publisher, next_of, raw_ws_connect, subscribe
from web.auth import TokenSigner

CONNECTIONS = "shopflow_websocket_connections"
SENT = "shopflow_websocket_events_sent_total"


def ws_url(server: TestServer, token: str) -> str:
    return f"{server.make_url('/ws')}?token={token}"


async def scraped_until(settings: Settings, check: Callable[[Samples], bool], what: str,
                        timeout_s: float = 10.0) -> Samples:
    """Scrape (off the loop) until ``check`` holds; fail with ``what`` after the timeout."""
    async with asyncio.timeout(timeout_s):
        while True:
            samples = await asyncio.to_thread(scrape, settings)
            if check(samples):
                return samples
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


def connections(samples: Samples) -> float | None:
    return value(samples, CONNECTIONS)


async def test_connections_gauge_follows_clients_including_abnormal_closes(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        web_settings: Settings) -> None:
    """Up per client, down for a clean close, a server refusal and a socket that just drops."""
    token = signer.issue("staff", None, 60)
    clean = await http.ws_connect(ws_url(realtime_server, token))
    refused = await http.ws_connect(ws_url(realtime_server, token))
    kept = await http.ws_connect(ws_url(realtime_server, token))
    for ws in (clean, refused, kept):
        await next_of(ws, "welcome")
    host, port = realtime_server.host, realtime_server.port
    assert port is not None
    dropped: socket.socket = await raw_ws_connect(host, port, f"/ws?token={token}")
    await scraped_until(web_settings, lambda s: connections(s) == 4, "4 connections")

    await clean.close()
    await scraped_until(web_settings, lambda s: connections(s) == 3, "clean close counted")
    await refused.send_bytes(b"binary is refused with 1003")
    await refused.receive(timeout=5)
    await scraped_until(web_settings, lambda s: connections(s) == 2, "refusal counted")
    dropped.close()  # no close frame: the server only sees the socket go
    await scraped_until(web_settings, lambda s: connections(s) == 1, "dropped socket counted")
    await kept.close()
    await scraped_until(web_settings, lambda s: connections(s) == 0, "last close counted")


async def test_unauthenticated_attempts_are_not_connections(
        realtime_server: TestServer, http: aiohttp.ClientSession, web_settings: Settings) -> None:
    async with http.ws_connect(str(realtime_server.make_url("/ws"))) as ws:
        await ws.receive(timeout=5)
        assert ws.close_code == 4401
    samples = await asyncio.to_thread(scrape, web_settings)
    assert connections(samples) in (None, 0.0)


async def test_events_sent_are_counted_per_channel_and_per_client(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher, web_settings: Settings) -> None:
    """Staff gets every event, the customer only its own order; pongs are not events."""
    staff_url = ws_url(realtime_server, signer.issue("staff", None, 60))
    customer_url = ws_url(realtime_server, signer.issue("customer", 1, 60))
    async with http.ws_connect(staff_url) as staff, http.ws_connect(customer_url) as customer:
        await subscribe(staff, "order-status-changed")
        await subscribe(staff, "stock-updated")
        await subscribe(customer, "order-status-changed")
        for order_id, customer_id in ((10, 2), (11, 1), (12, 2)):
            await publish("order-status-changed", {"order_id": order_id,
                                                   "customer_id": customer_id,
                                                   "to_status": "paid"})
        for product_id in (1, 2):
            await publish("stock-updated", {"product_id": product_id, "available": 3})
        for _ in range(5):
            await next_of(staff, "event")
        assert (await next_of(customer, "event"))["payload"]["order_id"] == 11
        await customer.send_json({"type": "ping", "ref": "p"})
        await next_of(customer, "pong")

        def counted(s: Samples) -> bool:
            return (value(s, SENT, channel="order-status-changed") == 4
                    and value(s, SENT, channel="stock-updated") == 2)

        samples = await scraped_until(web_settings, counted, "4 + 2 events counted")
        assert value(samples, SENT, channel="jobs") in (None, 0.0)
