"""What one runtime process owns: its loop, database pool, Redis client and broker.

Built by :meth:`ProcessContext.start` after the process has its settings,
closed by :meth:`ProcessContext.stop` in reverse order. Threads (Dramatiq
workers, pykka actors) use ``ctx.run(coro)`` to reach the pool and Redis on
the process's one event loop. A concern that opens a resource of its own on
that loop (an HTTP session, a simulator) hands its closer to
:meth:`ProcessContext.on_stop`, so it is closed with the process.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis

from runtime import db
from runtime.broker import setup_broker
from runtime.jobs.broker import JobBroker
from runtime.loop import LoopBridge
from runtime.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long the closers handed to on_stop may take, all together.
CLOSERS_TIMEOUT_S = 30.0


@dataclass
class ProcessContext:
    """The shared resources of one process; pass it to the concerns that need them."""

    settings: Settings
    bridge: LoopBridge
    pool: asyncpg.Pool
    redis: aioredis.Redis
    broker: JobBroker
    _closers: AsyncExitStack = field(default_factory=AsyncExitStack, repr=False)

    @classmethod
    def start(cls, settings: Settings, pool_size: int = 10) -> ProcessContext:
        """Open everything; the settings must carry both URLs."""
        redis_url, database_url = settings.require_urls()
        bridge = LoopBridge().start()

        async def open_async() -> tuple[asyncpg.Pool, aioredis.Redis]:
            pool = await db.create_pool(database_url, min_size=1, max_size=pool_size)
            client = aioredis.Redis.from_url(redis_url)
            return pool, client

        pool, client = bridge.run(open_async())
        broker = setup_broker(settings)
        return cls(settings, bridge, pool, client, broker)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run a coroutine on the process loop from a thread."""
        return self.bridge.run(coro, timeout_s or self.settings.actor_ask_timeout_s)

    def on_stop(self, close: Callable[[], Awaitable[None]]) -> None:
        """Run ``close()`` on the process loop when the context stops (last added, first run).

        Call it from any thread; the closers run before the broker, Redis and
        the pool are closed, so they may still use them.
        """
        self._closers.push_async_callback(close)

    def stop(self) -> None:
        """Run the closers handed to :meth:`on_stop`, close the broker, Redis and the pool,
        then the loop. A closer that fails is logged; the rest still close."""
        try:
            self.bridge.run(self._closers.aclose(), CLOSERS_TIMEOUT_S)
        except Exception:
            log.exception("a resource of this process failed to close")
        self.broker.close()

        async def close_async() -> None:
            await self.redis.aclose()
            await self.pool.close()

        self.bridge.run(close_async(), 30)
        self.bridge.stop()
