"""Real `shopflow scheduler` processes: SIGKILL the leader, then SIGTERM the next one; the
remaining standby carries on and every one-second slot is sent exactly once."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from runtime.broker import QUEUE_MAINTENANCE, JobSpec
from runtime.scheduling import (
    IntervalTrigger,
    OverlapPolicy,
    Schedule,
    SchedulerStore,
    add_repeatable,
    connect_redis,
)
from runtime.settings import Settings
from tests.runtime.scheduling.helpers import slots_sent

# Every slot must be sent, however late: on a loaded machine the first leader may start,
# or a standby take over, more than the default 60 s misfire grace after a slot, and the
# default misfire policy would then fold those slots into one catch-up run (a gap here,
# though no slot was lost to a crash). An hour's grace makes every late slot run.
TICKS = Schedule("tick-1s", IntervalTrigger(1), JobSpec(QUEUE_MAINTENANCE, "tick"),
                 overlap=OverlapPolicy.ALLOW, misfire_grace_s=3600)


@pytest.fixture
def spawn(settings: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start(settings: Settings, procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "SHOPFLOW_SCHEDULER_TICK_S": "0.1",
           "SHOPFLOW_SCHEDULER_LEASE_S": "2.0",
           "SHOPFLOW_SCHEDULER_RESEND_AFTER_S": "3.0", "SHOPFLOW_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "scheduler"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    return proc


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    """Poll a Redis-side condition until it holds (the processes give no other signal)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.chaos
async def test_sigkill_and_sigterm_of_leaders_lose_and_double_no_slot(
    settings: Settings, spawn: list[subprocess.Popen[bytes]]
) -> None:
    redis: aioredis.Redis = connect_redis(settings.redis_url or "")
    store = SchedulerStore(redis, settings.namespace)
    try:
        await add_repeatable(redis, settings.namespace, TICKS, datetime.now(UTC))
        procs = {p.pid: p for p in (start(settings, spawn) for _ in range(3))}

        async def sent_count() -> int:
            return len(slots_sent(settings, QUEUE_MAINTENANCE))

        async def leader_pid() -> int | None:
            lease = await store.lease()
            if not lease.holder or not lease.expires_at or lease.expires_at < datetime.now(UTC):
                return None
            return int(lease.holder.split(":")[1])

        async def has_leader() -> bool:
            return await leader_pid() is not None

        async def current_leader(exclude: set[int]) -> int:
            """The live leader not in ``exclude`` (waits: a starved leader's lease may lapse)."""
            await wait_for(lambda: _new_leader(leader_pid, exclude))
            pid = await leader_pid()
            return pid if pid is not None else await current_leader(exclude)

        await wait_for(lambda: _at_least(sent_count, 3))
        first = await current_leader(set())
        assert first in procs
        procs[first].send_signal(signal.SIGKILL)
        procs[first].wait(10)
        before = await sent_count()
        await wait_for(lambda: _new_leader(leader_pid, {first}))
        await wait_for(lambda: _at_least(sent_count, before + 2))

        second = await current_leader({first})
        procs[second].send_signal(signal.SIGTERM)
        assert procs[second].wait(30) == 0  # clean exit; lease given up
        before = await sent_count()
        await wait_for(lambda: _new_leader(leader_pid, {first, second}))
        await wait_for(lambda: _at_least(sent_count, before + 2))
        survivor = await current_leader({first, second})

        async def gap_free() -> bool:
            """A slot claimed by a killed leader just before its send is re-sent after 3 s."""
            return not _gaps(_ticks(settings))

        await wait_for(gap_free)
        procs[survivor].send_signal(signal.SIGTERM)
        assert procs[survivor].wait(30) == 0
        await wait_for(lambda: _no_leader(has_leader))
        assert {p.poll() for p in procs.values()} == {0, -signal.SIGKILL}
    finally:
        await redis.aclose()

    sent = slots_sent(settings, QUEUE_MAINTENANCE)
    assert all(count == 1 for count in sent.values()), sent
    ticks = _ticks(settings)
    assert not _gaps(ticks), _gaps(ticks)
    assert len(ticks) >= 7


def _ticks(settings: Settings) -> list[datetime]:
    sent = slots_sent(settings, QUEUE_MAINTENANCE)
    return sorted(datetime.fromisoformat(slot) for name, slot in sent if name == "tick-1s")


def _gaps(ticks: list[datetime]) -> list[tuple[datetime, datetime]]:
    return [(a, b) for a, b in itertools.pairwise(ticks) if (b - a).total_seconds() != 1]


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def _new_leader(leader_pid: Callable[[], Awaitable[int | None]], old: set[int]) -> bool:
    pid = await leader_pid()
    return pid is not None and pid not in old


async def _no_leader(has_leader: Callable[[], Awaitable[bool]]) -> bool:
    return not await has_leader()
