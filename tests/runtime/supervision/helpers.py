"""Test actors and waiting helpers for the supervision tests (no sleeps: conditions)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from runtime.actor import MailboxConfig, SupervisedActor
from runtime.supervision import SupervisionEvent

WAIT_S = 5.0


class Journal:
    """An append-only list of what happened, with a wait-for-condition."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[Any]], bool], timeout_s: float = WAIT_S) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.items), timeout_s):
                raise AssertionError(f"condition not met; journal: {self.items}")
            return list(self.items)

    def count(self, item: Any) -> int:
        with self._cond:
            return self.items.count(item)


class Events:
    """Collects supervision events; ``wait(kind)`` returns the next one of that kind."""

    def __init__(self) -> None:
        self.all: list[SupervisionEvent] = []
        self._queue: queue.Queue[SupervisionEvent] = queue.Queue()

    def __call__(self, event: SupervisionEvent) -> None:
        self.all.append(event)
        self._queue.put(event)

    def wait(self, kind: str, timeout_s: float = WAIT_S) -> SupervisionEvent:
        while True:
            event = self._queue.get(timeout=timeout_s)
            if event.kind == kind:
                return event


class Worker(SupervisedActor):
    """Journals its life; 'crash' crashes it, 'ping' answers, 'stop-self' exits normally.

    An exception (any BaseException) sent as the message is raised by the handler.
    """

    def __init__(self, name: str, journal: Journal, fail_start: bool = False,
                 gate: threading.Event | None = None,
                 mailbox: MailboxConfig | None = None) -> None:
        super().__init__(mailbox=mailbox)
        self.name = name
        self.journal = journal
        self.fail_start = fail_start
        self.gate = gate

    def on_start(self) -> None:
        if self.fail_start:
            self.journal.add(("start_failed", self.name))
            raise RuntimeError(f"{self.name} cannot start")
        self.journal.add(("start", self.name))

    def on_stop(self) -> None:
        self.journal.add(("stop", self.name))

    def on_receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError(f"{self.name} crashed")
        if message == "stop-self":
            self.stop()
            return None
        if message == "wait-gate":
            assert self.gate is not None
            self.journal.add(("holding", self.name))
            self.gate.wait(WAIT_S)
            return "released"
        if message == "fail-self":
            self.fail("gave up on purpose")
        if isinstance(message, BaseException):
            raise message
        return f"pong from {self.name}"
