"""A message held by a crashing actor is redelivered (real Dramatiq worker, real Redis).

And a message whose actor met a server outage is retried too, without a crash:
many outages in a row do not make the worker's root give up.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from runtime.actor import SupervisedActor
from runtime.broker import QUEUE_INVENTORY, JobSpec, declare_actor, setup_broker
from runtime.errors import InfrastructureUnavailable
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor
from tests.support import free_port

from .helpers import Events

THIN = JobSpec(QUEUE_INVENTORY, "test_supervision_thin")


class CrashesOnce(SupervisedActor):
    """Crashes the first time it handles a message (state shared across incarnations)."""

    def __init__(self, handled: list[Any], done: threading.Event) -> None:
        super().__init__()
        self.handled = handled
        self.done = done

    def on_receive(self, message: Any) -> Any:
        self.handled.append(message)
        if len(self.handled) == 1:
            # A bug, not an outage (a connection error is not a crash: see below).
            raise RuntimeError("a bug while holding the message")
        self.done.set()
        return "reserved"


def test_message_held_by_a_crashing_actor_is_retried_and_succeeds_once(
        settings: Settings) -> None:
    handled: list[Any] = []
    retries_seen: list[int] = []
    results: list[Any] = []
    done, events = threading.Event(), Events()
    sup = Supervisor("inventory-worker", [
        ChildSpec("reserver", lambda: CrashesOnce.start(handled, done)),
    ], backoff_base_s=0.0, on_event=events).start()

    def thin(order_id: int) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None
        retries_seen.append(message.options.get("retries", 0))
        results.append(sup.ask("reserver", order_id, timeout_s=5.0))

    broker = setup_broker(settings)
    declare_actor(broker, THIN, thin)
    worker = dramatiq.Worker(broker, queues={QUEUE_INVENTORY}, worker_threads=1,
                             worker_timeout=100)
    worker.start()
    try:
        THIN.send(broker, 42)
        assert done.wait(20)
        assert events.wait("restart").child == "reserver"
        broker.join(QUEUE_INVENTORY, timeout=20_000)
        worker.join()
    finally:
        worker.stop()
        broker.close()
        sup.stop()
    assert handled == [42, 42]
    assert retries_seen == [0, 1]
    assert results == ["reserved"]


class DatabaseAwayFirst(SupervisedActor):
    """The first attempt of every message finds PostgreSQL away (a real refused connect)."""

    def __init__(self, attempts: dict[int, int], done: threading.Event, total: int) -> None:
        super().__init__()
        self.attempts = attempts
        self.done = done
        self.total = total
        self.dead_port = free_port()

    def on_receive(self, message: Any) -> Any:
        self.attempts[message] = self.attempts.get(message, 0) + 1
        if self.attempts[message] == 1:
            socket.create_connection(("127.0.0.1", self.dead_port), timeout=5)
        if len([n for n in self.attempts.values() if n >= 2]) == self.total:
            self.done.set()
        return "reserved"


def test_an_outage_on_many_messages_retries_them_without_crashing_the_worker(
        settings: Settings) -> None:
    """10 outages in a row would be 10 crashes, past the root's 3 in 5 s: exit 70 before."""
    total = 10
    attempts: dict[int, int] = {}
    answers: list[Any] = []
    transient: list[BaseException] = []
    escalated: list[BaseException] = []
    done, events = threading.Event(), Events()
    sup = Supervisor("inventory-worker-root", [
        ChildSpec("reserver", lambda: DatabaseAwayFirst.start(attempts, done, total)),
    ], on_event=events, on_escalate=escalated.append).start()

    def thin(order_id: int) -> None:
        try:
            answers.append(sup.ask("reserver", order_id, timeout_s=5.0))
        except InfrastructureUnavailable as exc:
            transient.append(exc)
            raise

    broker = setup_broker(settings)
    declare_actor(broker, THIN, thin)
    worker = dramatiq.Worker(broker, queues={QUEUE_INVENTORY}, worker_threads=1,
                             worker_timeout=100)
    worker.start()
    try:
        for order_id in range(total):
            THIN.send(broker, order_id)
        assert done.wait(60)
        broker.join(QUEUE_INVENTORY, timeout=30_000)
        worker.join()
    finally:
        worker.stop()
        broker.close()
        sup.stop()
    assert attempts == {order_id: 2 for order_id in range(total)}
    assert answers == ["reserved"] * total
    assert len(transient) == total
    assert all(isinstance(e.__cause__, ConnectionRefusedError) for e in transient)
    assert escalated == []
    assert [e.kind for e in events.all] == []
