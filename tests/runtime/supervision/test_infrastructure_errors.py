"""A server outage is not a crash: the asker gets a transient error, the actor lives on.

The errors are real: a connection refused by a port nobody listens on, and
PostgreSQL ending the session the way a restart does ("terminating connection
due to administrator command").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from runtime import db
from runtime.actor import AsyncActor
from runtime.errors import ActorCrashed, InfrastructureUnavailable, TransientJobError
from runtime.loop import LoopBridge
from runtime.service_actor import ServiceActor
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor
from tests.support import free_port

from .helpers import Events

# More outages in a row than any restart intensity allows (the default is 3 in 5 s).
OUTAGES_IN_A_ROW = 10


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    b = LoopBridge("test-infra-loop").start()
    yield b
    b.stop()


class Escalations:
    """An escalation hook that records what reached the root's top."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def __call__(self, error: BaseException) -> None:
        self.errors.append(error)


def root_over(start: Any, events: Events, escalations: Escalations) -> Supervisor:
    """A root with the default intensity (3 restarts in 5 s), as a worker's root has."""
    return Supervisor("worker-root", [ChildSpec("service", start)], on_event=events,
                      on_escalate=escalations).start()


def assert_no_supervision_happened(sup: Supervisor, ref: Any, events: Events,
                                   escalations: Escalations) -> None:
    assert escalations.errors == []
    assert [e.kind for e in events.all] == []
    assert sup.state == "running"
    (child,) = sup.snapshot()
    assert (child.alive, child.restarts, child.state) == (True, 0, "running")
    assert sup.child_ref("service") is ref  # the same incarnation all along


def test_refused_connections_in_a_row_answer_transient_and_do_not_crash(
        bridge: LoopBridge) -> None:
    dead_url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"

    async def handle(message: Any) -> Any:
        if message == "work":
            await asyncpg.connect(dead_url, timeout=5)  # ConnectionRefusedError
        return "done"

    events, escalations = Events(), Escalations()
    sup = root_over(lambda: ServiceActor.start("service", handle, bridge, 10.0), events,
                    escalations)
    try:
        ref = sup.child_ref("service")
        for _ in range(OUTAGES_IN_A_ROW):
            with pytest.raises(InfrastructureUnavailable) as caught:
                sup.ask("service", "work", timeout_s=10)
            assert isinstance(caught.value, TransientJobError)
            assert not isinstance(caught.value, ActorCrashed)
            assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        assert sup.ask("service", "ping", timeout_s=10) == "done"
        assert_no_supervision_happened(sup, ref, events, escalations)
    finally:
        sup.stop()


def test_postgres_ending_the_session_is_not_a_crash(bridge: LoopBridge,
                                                    settings: Settings) -> None:
    """What every open connection sees when PostgreSQL restarts (AdminShutdownError)."""

    async def handle(message: Any) -> Any:
        conn = await db.connect(settings.database_url or "")
        try:
            return await conn.fetchval("SELECT pg_terminate_backend(pg_backend_pid())")
        finally:
            await conn.close()

    events, escalations = Events(), Escalations()
    sup = root_over(lambda: ServiceActor.start("service", handle, bridge, 10.0), events,
                    escalations)
    try:
        ref = sup.child_ref("service")
        for _ in range(OUTAGES_IN_A_ROW):
            with pytest.raises(InfrastructureUnavailable) as caught:
                sup.ask("service", "work", timeout_s=10)
            assert isinstance(caught.value.__cause__, asyncpg.PostgresError)
        assert_no_supervision_happened(sup, ref, events, escalations)
    finally:
        sup.stop()


class LosesRedis(AsyncActor):
    """An async actor whose server resets the connection on every message."""

    async def on_receive(self, message: Any) -> Any:
        await asyncio.sleep(0)
        if message == "bug":
            raise RuntimeError("a real bug")
        raise ConnectionResetError("redis went away")


def test_async_actors_follow_the_same_rule_and_still_crash_on_a_bug(
        bridge: LoopBridge) -> None:
    events, escalations = Events(), Escalations()
    sup = Supervisor("api-root", [ChildSpec("service", lambda: LosesRedis.start(bridge))],
                     on_event=events, on_escalate=escalations, backoff_base_s=0.0).start()
    try:
        ref = sup.child_ref("service")
        for _ in range(OUTAGES_IN_A_ROW):
            with pytest.raises(InfrastructureUnavailable) as caught:
                sup.ask("service", "work", timeout_s=5)
            assert isinstance(caught.value.__cause__, ConnectionResetError)
        assert_no_supervision_happened(sup, ref, events, escalations)
        with pytest.raises(ActorCrashed):  # a bug is still a crash, and is restarted
            sup.ask("service", "bug", timeout_s=5)
        assert events.wait("restart").child == "service"
    finally:
        sup.stop()


def test_a_domain_error_is_handed_back_unchanged(bridge: LoopBridge) -> None:
    class Refused(TransientJobError):
        pass

    async def handle(message: Any) -> Any:
        raise Refused("not now")

    events, escalations = Events(), Escalations()
    sup = root_over(lambda: ServiceActor.start("service", handle, bridge, 5.0), events,
                    escalations)
    try:
        ref = sup.child_ref("service")
        with pytest.raises(Refused):
            sup.ask("service", "work", timeout_s=5)
        assert_no_supervision_happened(sup, ref, events, escalations)
    finally:
        sup.stop()
