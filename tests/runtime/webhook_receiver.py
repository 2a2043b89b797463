"""A real on-call webhook receiver (aiohttp) for the alert tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


class Receiver:
    """Collects POSTed JSON bodies; answers ``status`` (set it to 500 to play down).

    Set ``hold`` to an unset event to play a slow webhook: each request waits
    for it before it is answered (``arrived`` is set as soon as one comes in).
    """

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.url = ""
        self.hold: asyncio.Event | None = None
        self.arrived = asyncio.Event()
        self._arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.status < 300:
            async with self._arrived:
                self.bodies.append(body)
                self._arrived.notify_all()
        return web.json_response({"ok": self.status < 300}, status=self.status)

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Wait until ``count`` bodies arrived; returns them."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.bodies) >= count),
                                   timeout_s)
        return self.bodies


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    """Serve a :class:`Receiver` on 127.0.0.1 (a free port) for the block's duration."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()
