"""What every peer adapter implements, and the pacing shared by all producers.

A peer is one job system under test. The harness needs two things from it:
a worker process (``run_worker``, executed in a subprocess started by
``python -m bench.worker <key>``) that runs :func:`bench.body.noop` with
:data:`SLOTS` concurrent slots, and a producer (``open_producer``) that sends
jobs carrying their enqueue time. Adding a job system to the comparison is
adding one :class:`Peer` subclass to :data:`bench.peers.PEERS`.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar

# Concurrency every peer gets: one worker process with this many threads/slots
# (RQ has no threads: it gets this many worker processes; see its notes).
SLOTS = 8


@dataclass(frozen=True)
class BenchEnv:
    """Where one peer's jobs and start records live (passed to its worker via the environment)."""

    redis_url: str  # the peer's own Redis database on the shared server
    results_url: str  # where the job body ships its start records
    results_key: str
    queue: str
    slots: int = SLOTS


class Producer(abc.ABC):
    """Sends no-op jobs; each carries ``time.time()`` taken just before its send call."""

    @abc.abstractmethod
    def send_many(self, count: int, rate_hz: float | None) -> float:
        """Send ``count`` jobs, paced at ``rate_hz`` if given; return the seconds it took."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


class SyncProducer(Producer):
    """A producer whose client is blocking: implement :meth:`send`."""

    @abc.abstractmethod
    def send(self, enqueued_at: float) -> None:
        """Enqueue one job with the peer's ordinary client call."""

    def send_many(self, count: int, rate_hz: float | None) -> float:
        start = time.perf_counter()
        for i in range(count):
            if rate_hz:
                _sleep_until(start + i / rate_hz)
            self.send(time.time())
        return time.perf_counter() - start

    def close(self) -> None:
        pass


class AsyncProducer(Producer):
    """A producer whose client is asyncio: implement :meth:`asend`, :meth:`aopen`, :meth:`aclose`.

    It owns a private event loop, so the harness can stay synchronous.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.aopen())

    @abc.abstractmethod
    async def aopen(self) -> None:
        """Connect (runs on the producer's loop)."""

    @abc.abstractmethod
    async def asend(self, enqueued_at: float) -> None:
        """Enqueue one job with the peer's ordinary client call."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Disconnect."""

    async def _send_many(self, count: int, rate_hz: float | None) -> float:
        start = time.perf_counter()
        for i in range(count):
            if rate_hz:
                delay_s = start + i / rate_hz - time.perf_counter()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
            await self.asend(time.time())
        return time.perf_counter() - start

    def send_many(self, count: int, rate_hz: float | None) -> float:
        return self._loop.run_until_complete(self._send_many(count, rate_hz))

    def close(self) -> None:
        self._loop.run_until_complete(self.aclose())
        self._loop.close()


def _sleep_until(deadline: float) -> None:
    delay_s = deadline - time.perf_counter()
    if delay_s > 0:
        time.sleep(delay_s)


class Peer(abc.ABC):
    """One job system under test. Subclass, fill in the two methods, add it to PEERS."""

    key: ClassVar[str]  # short name for the command line (``--only``) and the worker subprocess
    name: ClassVar[str]  # what the tables call it
    setup: ClassVar[str]  # how its worker is configured (concurrency, polling), for BENCHMARKS.md
    distributions: ClassVar[tuple[str, ...]] = ()  # PyPI distributions whose versions to report

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (the row is skipped with this note), or None."""
        return None

    @abc.abstractmethod
    def run_worker(self, env: BenchEnv) -> None:
        """Run one worker process with ``env.slots`` slots until SIGTERM (in the subprocess)."""

    @abc.abstractmethod
    def open_producer(self, env: BenchEnv) -> Producer:
        """A producer for ``env.queue`` (in the harness process)."""


AsyncMain = Callable[[], Awaitable[None]]
