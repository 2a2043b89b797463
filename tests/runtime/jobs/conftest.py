"""Fixtures for the job layer: a job broker and an in-process worker on the test's Redis."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import dramatiq
import pytest
import redis.asyncio as aioredis

from runtime.broker import ALL_QUEUES, setup_broker
from runtime.jobs.broker import JobBroker
from runtime.jobs.hooks import JobEvent
from runtime.jobs.store import JobStore
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

from .procs import Workers


@dataclass
class Seen:
    """Job events of one broker's hooks, waited on by kind and job id."""

    events: list[JobEvent] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, event: JobEvent) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait(self, kind: str, job_id: str | None = None, count: int = 1,
             timeout_s: float = 20) -> list[JobEvent]:
        """Block until ``count`` events of ``kind`` (for ``job_id``) happened; return them."""
        def matching() -> list[JobEvent]:
            return [e for e in self.events
                    if e.kind == kind and (job_id is None or e.job_id == job_id)]
        with self.changed:
            ok = self.changed.wait_for(lambda: len(matching()) >= count, timeout_s)
            found = matching()
        assert ok, f"timed out waiting for {count} {kind} event(s) of {job_id}: saw {found}"
        return found

    def kinds(self, job_id: str) -> list[str]:
        with self.changed:
            return [e.kind for e in self.events if e.job_id == job_id]


@pytest.fixture
def broker(settings: Settings) -> Iterator[JobBroker]:
    """A job broker on the test's namespace (also Dramatiq's global broker)."""
    b = setup_broker(settings)
    yield b
    b.close()


@pytest.fixture
def seen(broker: JobBroker) -> Seen:
    """Every job event of ``broker``'s process."""
    events = Seen()
    broker.hooks.subscribe(None, events)
    return events


@pytest.fixture
def running(broker: JobBroker) -> Callable[..., object]:
    """``with running(queues, threads):`` runs a worker on ``broker`` for the block."""
    @contextmanager
    def run(queues: set[str], threads: int = 2) -> Iterator[dramatiq.Worker]:
        worker = make_worker(broker, queues, threads)
        worker.start()
        try:
            yield worker
        finally:
            worker.stop(timeout=10_000)
    return run


@pytest.fixture
async def store(settings: Settings, broker: JobBroker) -> AsyncIterator[JobStore]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    yield JobStore(client, broker.keys, ALL_QUEUES, broker.config.bounds)
    await client.aclose()


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Short heartbeats and sweeps, so a dead worker is noticed in about two seconds."""
    return replace(settings, broker_heartbeat_timeout_ms=1_500, job_sweep_interval_s=0.25,
                   job_poison_deaths=3)


@pytest.fixture
def workers(fast: Settings) -> Iterator[Workers]:
    w = Workers(fast)
    yield w
    w.stop_all()
