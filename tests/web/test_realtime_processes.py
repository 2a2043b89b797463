"""Two real api processes on one Redis: any process serves any client, exactly once, in order."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from runtime.settings import Settings
from tests.web.conftest import Publisher, next_json, next_of, subscribe
from web.auth import TokenSigner

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


async def _nothing_but(ws: aiohttp.ClientWebSocketResponse, marker: str) -> None:
    """The next event is ``marker`` (published last) and nothing follows it: no duplicate of
    an earlier event was queued, before or after it (a pong answers after all queued frames)."""
    assert (await next_of(ws, "event"))["payload"]["order_id"] == marker
    await ws.send_json({"type": "ping", "ref": marker})
    assert await next_json(ws) == {"type": "pong", "ref": marker}


@pytest.fixture
def api_processes(web_settings: Settings) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    procs = []
    for _ in range(2):
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.web.realtime_process", str(port),
             web_settings.redis_url or "", web_settings.namespace,
             web_settings.token_secret or ""], cwd=ROOT)
        procs.append((port, proc))
    yield procs
    for _, proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.chaos
async def test_two_processes_then_one_killed(
        api_processes: list[tuple[int, subprocess.Popen[bytes]]], signer: TokenSigner,
        http: aiohttp.ClientSession, publish: Publisher) -> None:
    for port, _ in api_processes:
        await _wait_listening(port)
    token = signer.issue("staff", None, 120)
    urls = [f"http://127.0.0.1:{port}/ws?token={token}" for port, _ in api_processes]
    first = await http.ws_connect(urls[0])
    second = await http.ws_connect(urls[1])
    try:
        await subscribe(first, "order-status-changed")
        await subscribe(second, "order-status-changed")
        for n in range(30):
            await publish("order-status-changed", {"order_id": n, "customer_id": 1})
        seen_first = [await next_of(first, "event") for _ in range(30)]
        seen_second = [(await next_of(second, "event"))["payload"]["order_id"]
                       for _ in range(30)]
        assert [e["payload"]["order_id"] for e in seen_first] == list(range(30))
        assert seen_second == list(range(30))
        await publish("order-status-changed", {"order_id": "marker", "customer_id": 1})
        for ws in (first, second):
            await _nothing_but(ws, "marker")

        # Process 1 dies (SIGKILL); its client resumes on process 2 and misses nothing.
        os.kill(api_processes[0][1].pid, signal.SIGKILL)
        api_processes[0][1].wait()
        for n in range(30, 40):
            await publish("order-status-changed", {"order_id": n, "customer_id": 1})
        async with http.ws_connect(urls[1]) as moved:
            await subscribe(moved, "order-status-changed", since=seen_first[-1]["id"])
            resumed = [(await next_of(moved, "event"))["payload"]["order_id"]
                       for _ in range(11)]
            assert resumed == ["marker", *range(30, 40)]
            live = [(await next_of(second, "event"))["payload"]["order_id"] for _ in range(10)]
            assert live == list(range(30, 40))
            await publish("order-status-changed", {"order_id": "end", "customer_id": 1})
            for ws in (moved, second):
                await _nothing_but(ws, "end")
    finally:
        await second.close()
        await first.close()
