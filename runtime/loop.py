"""The event-loop bridge: one asyncio loop per process, reached from threads.

Dramatiq worker threads and pykka actor threads must not start loops of their
own (asyncpg pools and aiohttp sessions belong to one loop). They submit
coroutines here and block on the result with a timeout.

A process whose loop runs in its own thread (a worker) starts a bridge that
owns the loop; a process whose main thread already runs a loop (aiohttp's
``run_app``, ``asyncio.run``) adopts that loop with :meth:`LoopBridge.adopt`,
so its async actors and its threads share the one loop too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from runtime.errors import TransientJobError

T = TypeVar("T")


class LoopBridge:
    """Owns a loop running in a daemon thread; ``run`` executes a coroutine on it."""

    def __init__(self, name: str = "shopflow-loop") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._adopted = False

    @classmethod
    def adopt(cls, name: str = "shopflow-loop") -> LoopBridge:
        """A bridge to the loop running in the calling thread (call it on that loop).

        The bridge does not own the loop: :meth:`stop` only forgets it, and the
        loop's owner (``asyncio.run``, aiohttp) keeps running and closing it.
        """
        bridge = cls(name)
        bridge._loop = asyncio.get_running_loop()
        bridge._thread = threading.current_thread()
        bridge._adopted = True
        bridge._ready.set()
        return bridge

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("LoopBridge is not started")
        return self._loop

    def start(self) -> LoopBridge:
        """Start the loop thread and wait until the loop runs (no-op once started or adopted)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 60.0) -> T:
        """Run ``coro`` on the loop from another thread and return its result.

        Raises the coroutine's own exception; on timeout cancels it and raises
        :class:`TransientJobError`, so a job caught in it is retried.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopBridge.run called from the loop thread itself")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            future.cancel()
            raise TransientJobError(f"async call timed out after {timeout_s}s") from None

    def stop(self) -> None:
        """Stop the loop and join its thread (call after closing what lives on it)."""
        if self._loop is None or self._thread is None:
            return
        if self._adopted:
            self._thread = None
            self._loop = None
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._loop = None
