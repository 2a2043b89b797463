"""TaskActor: a long-running coroutine as a supervised actor, on an owned or adopted loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.actor import TaskActor
from runtime.loop import LoopBridge
from runtime.supervision import ChildSpec, Restart, Supervisor

from .helpers import Events, Journal


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    b = LoopBridge("test-task-loop").start()
    yield b
    b.stop()


class Body:
    """A coroutine factory that journals each run; ``ends`` says how run n ends."""

    def __init__(self, journal: Journal, ends: dict[int, str]) -> None:
        self.journal = journal
        self.ends = ends
        self.runs = 0
        self.stop = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        run = self.runs
        self.journal.add(("run", run))
        end = self.ends.get(run)
        if end == "raise":
            raise RuntimeError(f"body broke on run {run}")
        if end == "return":
            return
        try:
            await self.stop.wait()
            self.journal.add(("ended by request", run))
        except asyncio.CancelledError:
            self.journal.add(("cancelled", run))
            raise


def supervised(bridge: LoopBridge, body: Body, events: Events, graceful: bool,
               restart: Restart = Restart.PERMANENT) -> Supervisor:
    def start() -> Any:
        body.stop = asyncio.Event()
        stop = body.stop.set if graceful else None
        return TaskActor.start(bridge, "task", body, stop=stop)

    return Supervisor("root", [ChildSpec("task", start, restart)], backoff_base_s=0.0,
                      on_event=events).start()


@pytest.mark.parametrize(("end", "reason"), [
    ("raise", "RuntimeError: body broke on run 1"),
    ("return", "TaskEnded: task returned while it should run"),
])
def test_a_body_that_ends_on_its_own_crashes_the_actor_and_runs_again(
        bridge: LoopBridge, end: str, reason: str) -> None:
    journal, events = Journal(), Events()
    body = Body(journal, {1: end})
    sup = supervised(bridge, body, events, graceful=True)
    try:
        restart = events.wait("restart")
        assert restart.child == "task" and reason in restart.reason
        journal.wait_for(lambda items: ("run", 2) in items)
        assert sup.wait_running("task", 5)
        assert sup.snapshot()[0].restarts == 1
    finally:
        sup.stop()
    assert journal.items[-1] == ("ended by request", 2)  # a stop is not a crash


def test_a_requested_stop_ends_the_body_gracefully_or_cancels_it(bridge: LoopBridge) -> None:
    for graceful, last in ((True, ("ended by request", 1)), (False, ("cancelled", 1))):
        journal, events = Journal(), Events()
        sup = supervised(bridge, Body(journal, {}), events, graceful)
        journal.wait_for(lambda items: ("run", 1) in items)
        sup.stop()
        assert journal.items == [("run", 1), last]
        assert [e.kind for e in events.all] == []


async def test_task_actors_run_on_an_adopted_loop() -> None:
    """The api and the scheduler: the loop belongs to aiohttp / asyncio.run, not to a bridge."""
    bridge = LoopBridge.adopt("adopted")
    loop = asyncio.get_running_loop()
    seen: list[asyncio.AbstractEventLoop] = []
    finished = asyncio.Event()

    async def body() -> None:
        seen.append(asyncio.get_running_loop())
        try:
            await asyncio.Event().wait()
        finally:
            finished.set()

    root = Supervisor("adopted-root", [ChildSpec(
        "task", lambda: TaskActor.start(bridge, "task", body))])
    await asyncio.to_thread(root.start)  # on_start needs this loop: start from a thread
    try:
        assert seen == [loop]
        blocking = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="loop thread itself"):
            bridge.run(blocking)  # a blocking call from the loop would deadlock
        blocking.close()
    finally:
        await asyncio.to_thread(root.stop)
    assert finished.is_set()
    bridge.stop()  # forgets the loop; it keeps running for its owner
    assert not loop.is_closed()
