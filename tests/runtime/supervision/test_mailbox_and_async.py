"""Bounded mailboxes (both overflow policies), asks to dead actors, async actors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.actor import AsyncActor, MailboxConfig
from runtime.errors import ActorCrashed, ActorUnavailable, AskTimeout, MailboxFull
from runtime.loop import LoopBridge
from runtime.mailbox import Overflow
from runtime.supervision import ChildSpec, Restart, Supervisor

from .helpers import Events, Journal, Worker


def gated_supervisor(journal: Journal, gate: threading.Event, config: MailboxConfig,
                     restart: Restart = Restart.PERMANENT) -> Supervisor:
    return Supervisor("root", [ChildSpec(
        "w", lambda: Worker.start("w", journal, gate=gate, mailbox=config), restart=restart,
    )], backoff_base_s=0.0).start()


def hold_the_actor(sup: Supervisor, journal: Journal) -> Any:
    held = sup.child_ref("w").ask("wait-gate", block=False)
    journal.wait_for(lambda items: ("holding", "w") in items)
    return held


def test_fail_fast_mailbox_refuses_at_once_and_shows_its_depth() -> None:
    journal, gate = Journal(), threading.Event()
    sup = gated_supervisor(journal, gate, MailboxConfig(2, Overflow.FAIL_FAST))
    try:
        held = hold_the_actor(sup, journal)
        sup.tell("w", "ping")
        sup.tell("w", "ping")
        assert sup.snapshot()[0].mailbox_depth == 2
        assert sup.snapshot()[0].mailbox_size == 2
        with pytest.raises(MailboxFull, match="policy fail"):
            sup.tell("w", "ping")
        gate.set()
        assert held.get(timeout=2) == "released"
        assert sup.ask("w", "ping", timeout_s=2) == "pong from w"
    finally:
        gate.set()
        sup.stop()


def test_block_mailbox_waits_for_room_then_gives_up_with_mailbox_full() -> None:
    journal, gate = Journal(), threading.Event()
    sup = gated_supervisor(journal, gate, MailboxConfig(1, Overflow.BLOCK, put_timeout_s=0.05))
    try:
        held = hold_the_actor(sup, journal)
        sup.tell("w", "ping")
        with pytest.raises(MailboxFull, match="waited 0.05s"):
            sup.tell("w", "ping")
        # A blocked sender gets in as soon as the actor makes room.
        entered = threading.Event()
        blocked_config = sup.child_ref("w").actor_inbox
        blocked_config.put_timeout_s = 5.0

        def sender() -> None:
            sup.tell("w", "ping")
            entered.set()

        thread = threading.Thread(target=sender)
        thread.start()
        assert not entered.is_set()
        gate.set()
        assert entered.wait(5)
        thread.join(5)
        assert held.get(timeout=2) == "released"
    finally:
        gate.set()
        sup.stop()


def test_stop_gets_through_a_full_mailbox() -> None:
    journal, gate = Journal(), threading.Event()
    sup = gated_supervisor(journal, gate, MailboxConfig(1, Overflow.FAIL_FAST))
    hold_the_actor(sup, journal)
    sup.tell("w", "ping")
    stopper = threading.Thread(target=sup.stop)
    stopper.start()
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert journal.items[-1] == ("stop", "w")


def test_ask_to_a_dead_actor_answers_unavailable_at_once() -> None:
    journal = Journal()
    events = Events()
    sup = Supervisor("root", [ChildSpec("w", lambda: Worker.start("w", journal),
                                        restart=Restart.TEMPORARY)], on_event=events).start()
    try:
        ref = sup.child_ref("w")
        sup.tell("w", "crash")
        events.wait("child_exit")
        with pytest.raises(ActorUnavailable):
            sup.ask("w", "ping", timeout_s=60)
        with pytest.raises(Exception) as dead:  # an old ref, too, fails at once
            ref.ask("ping", timeout=60)
        assert type(dead.value).__name__ == "ActorDeadError"
    finally:
        sup.stop()


def test_a_stuck_actor_answers_ask_timeout() -> None:
    journal, gate = Journal(), threading.Event()
    sup = gated_supervisor(journal, gate, MailboxConfig(5))
    try:
        hold_the_actor(sup, journal)
        with pytest.raises(AskTimeout):
            sup.ask("w", "ping", timeout_s=0.05)
    finally:
        gate.set()
        sup.stop()


class Notifier(AsyncActor):
    """An async concern: runs on the bridge's loop, awaits in its handler."""

    def __init__(self, bridge: LoopBridge, journal: Journal) -> None:
        super().__init__(bridge, mailbox=MailboxConfig(10))
        self.journal = journal

    async def on_start(self) -> None:
        self.journal.add(("start", threading.current_thread().name))

    async def on_stop(self) -> None:
        self.journal.add(("stop", "notifier"))

    async def on_receive(self, message: Any) -> Any:
        await asyncio.sleep(0)  # a real await point on the loop
        if message == "crash":
            raise RuntimeError("notifier crashed")
        return (message, threading.current_thread().name)


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    b = LoopBridge("test-loop").start()
    yield b
    b.stop()


def test_async_actor_runs_on_the_loop_and_is_supervised(bridge: LoopBridge) -> None:
    journal, events = Journal(), Events()
    sup = Supervisor("api", [ChildSpec("notifier", lambda: Notifier.start(bridge, journal))],
                     backoff_base_s=0.0, on_event=events).start()
    try:
        assert journal.items == [("start", "test-loop")]
        assert sup.ask("notifier", "hi", timeout_s=2) == ("hi", "test-loop")
        with pytest.raises(ActorCrashed):
            sup.ask("notifier", "crash", timeout_s=2)
        assert events.wait("restart").child == "notifier"
        assert sup.wait_running("notifier", 5)
        assert bridge.run(sup.ask_async("notifier", "from-loop", timeout_s=2)) == (
            "from-loop", "test-loop")
        assert sup.snapshot()[0].mailbox_depth == 0
    finally:
        sup.stop()
    assert journal.items[-1] == ("stop", "notifier")


def test_an_ask_rides_out_a_restart_within_its_timeout_but_never_hangs() -> None:
    journal, events = Journal(), Events()
    sup = Supervisor("root", [ChildSpec("w", lambda: Worker.start("w", journal))],
                     backoff_base_s=0.05, on_event=events).start()
    try:
        sup.tell("w", "crash")
        assert sup.ask("w", "ping", timeout_s=5) == "pong from w"  # the new incarnation
        assert sup.snapshot()[0].restarts == 1
        assert events.wait("restart").restarts == 1  # taken, so the next wait is the second's
        sup.tell("w", "crash")  # second restart in a row waits 0.1 s
        assert events.wait("restart").restarts == 2  # the child is down, its restart pending
        with pytest.raises(ActorUnavailable, match="did not come back in time"):
            sup.ask("w", "ping", timeout_s=0.01)
    finally:
        sup.stop()
