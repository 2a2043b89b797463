"""The scheduler process: its instance is a supervised actor under a published root.

Real Redis; the crashing instances are real schedulers whose ``run`` breaks
(a bug inside the loop), since the real one rides out Redis outages itself.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

import redis

from actors.housekeeping.command import (
    CHILD_ID,
    PROCESS_NAME,
    run_scheduler,
    supervise_scheduler,
)
from actors.housekeeping.schedules import shop_schedules
from runtime.root import EXIT_ESCALATED
from runtime.scheduling import Scheduler, SchedulerStore, connect_redis
from runtime.settings import Settings
from runtime.supervision import Supervisor
from runtime.tree import TREE_REPORTER_CHILD, process_key
from tests.support import next_supervision_event, published_root

WAIT_S = 30.0


async def test_the_scheduler_runs_under_a_published_root_and_stops_cleanly(
        settings: Settings) -> None:
    stop = asyncio.Event()
    started: asyncio.Queue[Supervisor] = asyncio.Queue()
    task = asyncio.create_task(run_scheduler(settings, stop, ready=started.put_nowait))
    try:
        root = await asyncio.wait_for(started.get(), WAIT_S)
        assert root.name == f"{PROCESS_NAME}-root"
        published = await asyncio.to_thread(published_root, settings, PROCESS_NAME, None, WAIT_S)
        assert [(c["id"], c["state"], c["restarts"]) for c in published["children"]] == [
            (CHILD_ID, "running", 0), (TREE_REPORTER_CHILD, "running", 0)]
        store = SchedulerStore(connect_redis(settings.redis_url or ""), settings.namespace)
        async with asyncio.timeout(WAIT_S):  # the supervised instance really schedules
            while (await store.lease()).holder is None:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        code = await asyncio.wait_for(task, WAIT_S)
    assert code == 0
    lease = await store.lease()  # the stopping actor gave its lease up: expired at once
    assert lease.expires_at is not None and lease.expires_at < datetime.now(UTC)
    await store.redis.aclose()
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        assert not client.exists(process_key(settings.namespace, PROCESS_NAME, os.getpid()))
    finally:
        client.close()


class BrokenScheduler(Scheduler):
    """A scheduler whose loop breaks on its first ``crashes`` runs."""

    def __init__(self, settings: Settings, crashes: int) -> None:
        store = SchedulerStore(connect_redis(settings.redis_url or ""), settings.namespace)

        async def send(message: Any) -> None:
            return None

        super().__init__(store, send, shop_schedules(settings))
        self.crashes = crashes
        self.runs = 0
        self.running_again = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"scheduler bug #{self.runs}")
        self.running_again.set()
        await super().run(stop)


async def test_a_crashed_scheduler_is_restarted_with_an_event(settings: Settings) -> None:
    scheduler = BrokenScheduler(settings, crashes=1)
    stop = asyncio.Event()
    task = asyncio.create_task(supervise_scheduler(settings, scheduler, stop))
    try:
        restart = await asyncio.to_thread(next_supervision_event, settings, "restart", CHILD_ID,
                                          "supervision", WAIT_S)
        assert "scheduler bug #1" in restart["reason"]
        assert restart["process"] == PROCESS_NAME
        await asyncio.wait_for(scheduler.running_again.wait(), WAIT_S)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, WAIT_S) == 0
        await scheduler.store.redis.aclose()


async def test_a_scheduler_that_keeps_crashing_ends_the_process_with_70(
        settings: Settings) -> None:
    scheduler = BrokenScheduler(settings, crashes=1_000)
    try:
        code = await asyncio.wait_for(
            supervise_scheduler(settings, scheduler, asyncio.Event()), WAIT_S)
    finally:
        await scheduler.store.redis.aclose()
    assert code == EXIT_ESCALATED
    alert = await asyncio.to_thread(next_supervision_event, settings, "escalation", None,
                                    "alerts", WAIT_S)
    assert alert["supervisor"] == f"{PROCESS_NAME}-root"
