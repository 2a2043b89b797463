"""runtime/worker.py's boundary between a thin Dramatiq actor and its concern.

The asker a worker hands its concerns: domain errors that can never succeed
end the job for good, and the ask never gives up on a handler that still
runs (so the job is never retried beside its first run): the ask outlasts
the handler's own deadline, a handler that started late (its message waited
behind others) is cut at its ask's deadline, and a message whose ask gave up
while it waited is not run at all. Real pykka actors (both kinds) under a real
supervisor, their handlers on a real event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from runtime.errors import (
    AskTimeout,
    Conflict,
    InvalidTransition,
    NotFound,
    PermanentJobError,
    TransientJobError,
    ValidationError,
)
from runtime.loop import LoopBridge
from runtime.service_actor import AsyncServiceActor, ServiceActor
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor
from runtime.worker import StopBudget, concern_asker

# The handler's own deadline in these tests (SHOPFLOW_ACTOR_ASK_TIMEOUT_S)...
HANDLER_TIMEOUT_S = 2.5
# ...and how much longer the asker waits (ASK_MARGIN_S in production): less than a slow
# handler's run, so a message queued behind one would outlive its ask unless its handler
# were bounded by the ask's deadline. The handler is cut a tenth of the ask's time before
# its deadline (runtime.jobs.context.ANSWER_MARGIN_SHARE), 0.4 s here: with 1.6 s asks
# that was 0.16 s, which a loaded 2-core machine took to carry the answer back.
ASKER_MARGIN_S = 1.5
# How long a held handler waits to be let go (the test fails long before).
HOLD_S = 30.0


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    started = LoopBridge().start()
    yield started
    started.stop()


@dataclass
class Concern:
    """The concern's handler: what it was sent and began, and a gate for held messages."""

    began: list[Any] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    let_go: threading.Event = field(default_factory=threading.Event)

    async def handle(self, message: Any) -> Any:
        """Raise what it is sent; 'slow...' outlasts the handler deadline; 'hold' waits to be
        let go; anything else answers."""
        with self.changed:
            self.began.append(message)
            self.changed.notify_all()
        if isinstance(message, Exception):
            raise message
        if str(message).startswith("slow"):
            await asyncio.sleep(HANDLER_TIMEOUT_S * 20)
        if message == "hold":
            await asyncio.to_thread(self.let_go.wait, HOLD_S)
        return f"done {message}"

    def wait_began(self, message: Any, timeout_s: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: message in self.began, timeout_s), self.began


@pytest.fixture
def concern() -> Concern:
    return Concern()


@pytest.fixture(params=[ServiceActor, AsyncServiceActor], ids=["thread", "async"])
def root(request: pytest.FixtureRequest, bridge: LoopBridge,
         concern: Concern) -> Iterator[Supervisor]:
    kind = request.param
    sup = Supervisor("boundary-root", [ChildSpec(
        "concern", lambda: kind.start("concern", concern.handle, bridge, HANDLER_TIMEOUT_S))])
    sup.start()
    yield sup
    concern.let_go.set()
    sup.stop()


@pytest.fixture
def settings_() -> Settings:
    return replace(Settings.from_env({}), actor_ask_timeout_s=HANDLER_TIMEOUT_S)


@pytest.mark.parametrize("error", [NotFound("no order 9"), ValidationError("bad", "x"),
                                   InvalidTransition("paid -> pending")],
                         ids=["NotFound", "ValidationError", "InvalidTransition"])
def test_hopeless_domain_errors_become_permanent_job_errors(
        root: Supervisor, settings_: Settings, error: Exception) -> None:
    ask = concern_asker(root, settings_)
    with pytest.raises(PermanentJobError) as info:
        ask("concern", error)
    assert info.value.__cause__ is error and str(error) in str(info.value)
    assert ask("concern", "ping") == "done ping"  # the concern lives on


def test_other_errors_reach_the_retries_as_they_are(root: Supervisor,
                                                    settings_: Settings) -> None:
    ask = concern_asker(root, settings_)
    busy = Conflict("someone else holds it")  # a conflict may pass: retried
    with pytest.raises(Conflict) as info:
        ask("concern", busy)
    assert info.value is busy


def test_a_handler_started_late_is_cut_before_its_ask_gives_up(
        root: Supervisor, settings_: Settings, concern: Concern) -> None:
    """Two slow jobs at once: the second waits in the mailbox while the first runs its whole
    handler deadline, so it is taken when less than a deadline of its ask is left. Its
    handler is cut at what is left (less the answer's margin): the ask gets the handler's
    error, never gives up on a handler that still runs."""
    ask = concern_asker(root, settings_, margin_s=ASKER_MARGIN_S)
    errors: dict[str, BaseException] = {}

    def job(message: str) -> None:
        try:
            ask("concern", message)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[message] = exc

    first = threading.Thread(target=job, args=("slow-first",))
    second = threading.Thread(target=job, args=("slow-second",))
    first.start()
    concern.wait_began("slow-first")
    second.start()
    for thread in (first, second):
        thread.join(HANDLER_TIMEOUT_S * 2 + ASKER_MARGIN_S + 10)
    assert concern.began == ["slow-first", "slow-second"]
    assert set(errors) == {"slow-first", "slow-second"}
    for message, error in errors.items():
        assert isinstance(error, TransientJobError) and not isinstance(error, AskTimeout), \
            f"{message}: {error!r}"


def test_a_message_that_waited_past_its_asks_deadline_is_never_run(
        root: Supervisor, settings_: Settings, concern: Concern) -> None:
    """The concern is held by a message that ignores the deadlines (its asker waits long);
    an ask queued behind it gives up; when the concern gets to that message it answers it
    with AskTimeout without running it, and goes on with the next."""
    answers: list[Any] = []
    holder = threading.Thread(target=lambda: answers.append(root.ask("concern", "hold", HOLD_S)))
    holder.start()
    concern.wait_began("hold")
    with pytest.raises(AskTimeout):
        root.ask("concern", "late", HANDLER_TIMEOUT_S / 4)
    concern.let_go.set()
    holder.join(HOLD_S)
    assert answers == ["done hold"]
    assert root.ask("concern", "ping", HANDLER_TIMEOUT_S) == "done ping"
    assert concern.began == ["hold", "ping"], "the message whose asker gave up was run"


def test_a_stop_budget_hands_out_shares_of_what_is_left() -> None:
    now = [100.0]
    budget = StopBudget(10.0, clock=lambda: now[0])
    assert budget.share_s(0.5) == 5.0
    now[0] += 6.0
    assert budget.remaining_s() == 4.0 and budget.share_s(0.5) == 2.0
    now[0] += 60.0
    assert budget.remaining_s() == 0.0
