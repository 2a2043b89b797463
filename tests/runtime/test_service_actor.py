"""ServiceActor: an outage goes back to the asker as InfrastructureUnavailable; a bug crashes it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import redis

from runtime.errors import (
    ActorCrashed,
    AskTimeout,
    InfrastructureUnavailable,
    MailboxFull,
    ShopflowError,
)
from runtime.jobs.context import JobContext, current_job, job_scope
from runtime.jobs.retries import is_infrastructure_error
from runtime.jobs.script import JobKeys, JobScript
from runtime.loop import LoopBridge
from runtime.mailbox import Mailbox, Overflow
from runtime.service_actor import AsyncServiceActor, ServiceActor, start_service_actor
from runtime.settings import Settings
from runtime.supervision import ChildSpec, SupervisionEvent, Supervisor

OUTAGES: list[BaseException] = [
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    redis.exceptions.ConnectionError("Connection refused"),
]


# What the handler saw as the current job, by message (str messages only).
_JOBS_SEEN: dict[str, JobContext | None] = {}


async def _handler(message: Any) -> Any:
    if isinstance(message, BaseException):
        raise message
    if message == "forever":
        await asyncio.Event().wait()
    if isinstance(message, str):
        _JOBS_SEEN[message] = current_job()
    return f"done {message}"


@pytest.fixture(params=[ServiceActor, AsyncServiceActor], ids=["thread", "async"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Supervisor, list[SupervisionEvent]]]:
    """The same contract for the thread actor and the async one on the loop."""
    kind = request.param
    bridge = LoopBridge().start()
    events: list[SupervisionEvent] = []
    sup = Supervisor("root", [ChildSpec("svc", lambda: kind.start("svc", _handler, bridge, 5.0))],
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


def test_an_async_service_actor_runs_on_the_loop_with_no_thread_of_its_own() -> None:
    bridge = LoopBridge().start()
    seen: list[threading.Thread] = []

    async def where(message: Any) -> Any:
        seen.append(threading.current_thread())
        await asyncio.sleep(0)
        return message

    before = set(threading.enumerate())
    ref = AsyncServiceActor.start("async", where, bridge, 5.0)
    try:
        assert ref.ask("a", timeout=5) == "a"  # asked from this (non-loop) thread, as Dramatiq does
        assert set(threading.enumerate()) == before, "an async actor must not start a thread"
        assert seen == [bridge._thread]
    finally:
        ref.stop()
        bridge.stop()


def test_an_async_service_actor_fails_a_slow_ask_after_its_timeout() -> None:
    bridge = LoopBridge().start()

    async def slow(message: Any) -> Any:
        await asyncio.sleep(30)

    ref = AsyncServiceActor.start("slow", slow, bridge, 0.2)
    try:
        started = time.monotonic()
        with pytest.raises(InfrastructureUnavailable) as info:  # retried by the job layer
            ref.ask("x", timeout=5)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert time.monotonic() - started < 4
    finally:
        ref.stop()
        bridge.stop()


def test_the_agents_are_async_actors(settings: Settings) -> None:
    """The HTTP-calling agents park no thread while they wait on the model."""
    from actors.agents.jobs import concern
    from runtime.process import ProcessContext

    ctx = ProcessContext.start(settings)
    try:
        for child in concern(ctx).children:
            assert child.start is not None
            ref = child.start()
            try:
                assert issubclass(ref.actor_class, AsyncServiceActor), child.id
            finally:
                ref.stop()
    finally:
        ctx.stop()


def _settings_from_env(settings: Settings, **env: str) -> Settings:
    """``settings`` as a process reads them when its environment also has ``env``."""
    return Settings.from_env({**settings.to_env(), **env})


def test_production_actors_get_their_mailbox_from_settings(settings: Settings) -> None:
    """Every worker kind's actors are built with SHOPFLOW_MAILBOX_* (not the class default)."""
    from actors.process import WORKER_KINDS, factory_for
    from runtime.process import ProcessContext

    configured = _settings_from_env(settings, SHOPFLOW_MAILBOX_SIZE="7",
                                    SHOPFLOW_MAILBOX_OVERFLOW="fail")
    ctx = ProcessContext.start(configured)
    try:
        seen: list[str] = []
        for kind in WORKER_KINDS.values():
            for concern in factory_for(kind)(ctx):
                for child in concern.children:
                    assert child.start is not None
                    ref = child.start()
                    try:
                        box = ref.actor_inbox
                        assert isinstance(box, Mailbox)
                        assert (box.max_size, box.overflow) == (7, Overflow.FAIL_FAST), child.id
                    finally:
                        ref.stop()
                    seen.append(child.id)
        assert "stock-reserver-0" in seen or "stock-reserver" in seen, seen
    finally:
        ctx.stop()


def test_a_production_built_service_actor_refuses_at_once_when_full(settings: Settings) -> None:
    """SHOPFLOW_MAILBOX_SIZE=7, overflow fail: the 8th waiting message is refused, no wait."""
    from runtime.process import ProcessContext

    configured = _settings_from_env(settings, SHOPFLOW_MAILBOX_SIZE="7",
                                    SHOPFLOW_MAILBOX_OVERFLOW="fail",
                                    SHOPFLOW_MAILBOX_PUT_TIMEOUT_S="30")
    ctx = ProcessContext.start(configured)
    holding, release = threading.Event(), asyncio.Event()

    async def hold(message: Any) -> Any:
        holding.set()
        await release.wait()
        return message

    ref = start_service_actor(ctx, "held", hold)
    try:
        first = ref.ask("held", block=False)  # taken off the mailbox and handled: it blocks
        assert holding.wait(5), "the actor never started handling"
        waiting = [ref.ask(i, block=False) for i in range(7)]  # exactly fills the bound
        assert ref.actor_inbox.depth == 7
        started = time.monotonic()
        with pytest.raises(MailboxFull, match="policy fail"):
            ref.ask("one too many", block=False)
        assert time.monotonic() - started < 1.0  # refused at once, not after the 30 s put timeout
        ctx.bridge.loop.call_soon_threadsafe(release.set)
        assert first.get(timeout=5) == "held"
        assert [w.get(timeout=5) for w in waiting] == list(range(7))
    finally:
        ctx.bridge.loop.call_soon_threadsafe(release.set)
        ref.stop()
        ctx.stop()


def _a_job(deadline_s: float | None) -> JobContext:
    """A job context as the job middleware builds it (its client never connects here)."""
    client = redis.Redis(host="127.0.0.1", port=1)
    keys = JobKeys("test-jobs", "test-jobs:events")
    return JobContext("job-7", "analytics", "a_thin_actor", 1, 3, client, keys,
                      JobScript(client, keys), deadline_s=deadline_s)


def test_a_supervised_service_actor_handles_an_ask_with_the_askers_job_current(
        served: tuple[Supervisor, list[SupervisionEvent]]) -> None:
    """Supervisor.ask carries the job; the handler (on the loop) sees it, the next ask not."""
    sup, _events = served
    job = _a_job(None)
    with job_scope(job):
        assert sup.ask("svc", "with", timeout_s=5) == "done with"
    assert sup.ask("svc", "without", timeout_s=5) == "done without"
    assert _JOBS_SEEN == {"with": job, "without": None}


def test_a_service_actor_stops_a_handler_at_the_jobs_time_limit(
        served: tuple[Supervisor, list[SupervisionEvent]]) -> None:
    """The actor's own timeout is 5 s, the ask's 3 s; the job's time is up in 0.2 s."""
    sup, _events = served
    with job_scope(_a_job(time.monotonic() + 0.2)), pytest.raises(ShopflowError) as info:
        sup.ask("svc", "forever", timeout_s=3)
    assert not isinstance(info.value, AskTimeout), "the handler outlived its job"
