"""What one runtime process owns: its loop, database pool, Redis client and broker.

Built by :meth:`ProcessContext.start` after the process has its settings,
closed by :meth:`ProcessContext.stop` in reverse order. Threads (Dramatiq
workers, pykka actors) use ``ctx.run(coro)`` to reach the pool and Redis on
the process's one event loop. A concern that opens a resource of its own on
that loop (an HTTP session, a simulator) hands its closer to
:meth:`ProcessContext.on_stop`, so it is closed with the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
# How long stop() may take by default: closers, then the broker, Redis and the pool.
DEFAULT_STOP_TIMEOUT_S = 60.0
# The closers handed to on_stop get this share of stop()'s time; the connections the rest.
CLOSERS_SHARE = 0.5
# However late it is, Redis and the pool get at least this long to close.
MIN_CLOSE_S = 0.5


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

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Run the closers handed to :meth:`on_stop`, close the broker, Redis and the pool,
        then the loop, all within about ``timeout_s``.

        Never raises: a process on its way out must still exit, and exit 0 after
        a graceful stop. A closer that fails or overruns its share is logged and
        the rest still close; a pool whose connections are still held (a job
        that ignored the stop) is terminated after its share, with an error
        line, instead of being waited for.
        """
        deadline = time.monotonic() + timeout_s
        try:
            self.bridge.run(self._closers.aclose(), timeout_s * CLOSERS_SHARE)
        except Exception:
            log.exception("a resource of this process failed to close in time")
        try:
            self.broker.close()
        except Exception:
            log.exception("the broker failed to close")
        close_s = max(deadline - time.monotonic(), MIN_CLOSE_S)
        try:
            self.bridge.run(self._close_connections(close_s), close_s + MIN_CLOSE_S)
        except Exception:
            log.exception("Redis or the database pool failed to close")
        self.bridge.stop()

    async def _close_connections(self, timeout_s: float) -> None:
        """Close Redis, then the pool; terminate the pool if it cannot close in time."""
        await self.redis.aclose()
        try:
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except TimeoutError:
            log.error("the database pool did not close within %.1fs (a connection is still "
                      "in use); terminating its connections", timeout_s)
            self.pool.terminate()
