"""A message held by a crashing actor is redelivered (real Dramatiq worker, real Redis)."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from runtime.actor import SupervisedActor
from runtime.broker import QUEUE_INVENTORY, JobSpec, declare_actor, setup_broker
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor

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
            raise ConnectionResetError("lost the database while holding the message")
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
