"""Supervision of actors inside one process (OTP principles on pykka).

A :class:`Supervisor` starts its children (pykka actors, or other
supervisors) from :class:`ChildSpec` declarations, in order, and stops them in
reverse. Callers never hold a child's ``ActorRef`` directly: they call
``supervisor.ask(child_id, message)``, which always goes to the child's
current incarnation and answers :class:`ActorUnavailable` when it is dead or
restarting, so an ``ask`` never hangs.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pykka

from runtime.errors import ActorUnavailable

log = logging.getLogger(__name__)


class Restart(enum.Enum):
    """When a child that stopped is started again."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after a crash
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which children restart when one crashes."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


@dataclass(frozen=True)
class ChildSpec:
    """How to start a child and what to do when it stops."""

    id: str
    start: Callable[[], pykka.ActorRef[Any]]
    restart: Restart = Restart.PERMANENT
    shutdown_timeout_s: float = 5.0


@dataclass(frozen=True)
class ChildSnapshot:
    """Immutable view of one child for the tree view."""

    id: str
    alive: bool
    restarts: int


class Supervisor:
    """A minimal one-for-one supervisor (the full OTP version is issue 4)."""

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        on_escalate: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._specs = list(children)
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._restarts: dict[str, int] = {spec.id: 0 for spec in self._specs}
        self._lock = threading.Lock()
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._on_escalate = on_escalate

    def start(self) -> Supervisor:
        """Start every child in declaration order."""
        for spec in self._specs:
            self._refs[spec.id] = spec.start()
        return self

    def stop(self) -> None:
        """Stop every child in reverse order."""
        for spec in reversed(self._specs):
            ref = self._refs.pop(spec.id, None)
            if ref is not None and ref.is_alive():
                ref.stop(block=True, timeout=spec.shutdown_timeout_s)

    def _current(self, child_id: str) -> pykka.ActorRef[Any]:
        with self._lock:
            ref = self._refs.get(child_id)
            if ref is not None and ref.is_alive():
                return ref
            spec = next((s for s in self._specs if s.id == child_id), None)
            if spec is None:
                raise ActorUnavailable(f"{self.name} has no child {child_id!r}")
            if ref is not None and spec.restart is not Restart.TEMPORARY:
                log.warning("restarting actor %s/%s", self.name, child_id)
                self._restarts[child_id] += 1
                self._refs[child_id] = spec.start()
                return self._refs[child_id]
            raise ActorUnavailable(f"actor {self.name}/{child_id} is not running")

    def ask(self, child_id: str, message: Any, timeout_s: float) -> Any:
        """Ask the child's current incarnation; its exception is re-raised here."""
        ref = self._current(child_id)
        try:
            return ref.ask(message, timeout=timeout_s)
        except pykka.ActorDeadError:
            raise ActorUnavailable(f"actor {self.name}/{child_id} died") from None

    def snapshot(self) -> list[ChildSnapshot]:
        """Children with liveness and restart counts."""
        return [
            ChildSnapshot(s.id, bool(self._refs.get(s.id) and self._refs[s.id].is_alive()),
                          self._restarts[s.id])
            for s in self._specs
        ]
