"""ServiceActor: an outage goes back to the asker as InfrastructureUnavailable; a bug crashes it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import redis

from runtime.errors import ActorCrashed, InfrastructureUnavailable
from runtime.jobs.retries import is_infrastructure_error
from runtime.loop import LoopBridge
from runtime.service_actor import ServiceActor
from runtime.supervision import ChildSpec, SupervisionEvent, Supervisor

OUTAGES: list[BaseException] = [
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    redis.exceptions.ConnectionError("Connection refused"),
]


async def _handler(message: Any) -> Any:
    if isinstance(message, BaseException):
        raise message
    return f"done {message}"


@pytest.fixture
def served() -> Iterator[tuple[Supervisor, list[SupervisionEvent]]]:
    bridge = LoopBridge().start()
    events: list[SupervisionEvent] = []
    sup = Supervisor("root", [ChildSpec("svc", lambda: ServiceActor.start("svc", _handler, bridge, 5.0))],
                     on_event=events.append, max_restarts=1, max_seconds=60.0, backoff_base_s=0.0)
    sup.start()
    yield sup, events
    sup.stop()
    bridge.stop()


def test_an_outage_goes_back_to_the_asker_and_the_actor_lives_on(
        served: tuple[Supervisor, list[SupervisionEvent]]) -> None:
    """A PostgreSQL restart fails every job in flight: none of them may restart the actor."""
    sup, events = served
    for outage in OUTAGES * 3:  # far more than the supervisor's intensity allows
        assert is_infrastructure_error(outage)
        with pytest.raises(InfrastructureUnavailable) as info:
            sup.ask("svc", outage, timeout_s=5)
        assert isinstance(info.value.__cause__, type(outage))
        assert is_infrastructure_error(info.value)  # retried under the outage budget
    assert sup.ask("svc", 1, timeout_s=5) == "done 1"
    assert [e for e in events if e.kind == "restart"] == []


def test_a_bug_still_crashes_it_and_it_is_restarted(
        served: tuple[Supervisor, list[SupervisionEvent]]) -> None:
    sup, events = served
    with pytest.raises(ActorCrashed) as info:
        sup.ask("svc", KeyError("bug"), timeout_s=5)
    assert isinstance(info.value.__cause__, KeyError)
    assert sup.wait_running("svc", 5.0)
    assert sup.ask("svc", 2, timeout_s=5) == "done 2"
    assert [e.kind for e in events if e.kind == "restart"] == ["restart"]
