"""runtime/worker.py's boundary between a thin Dramatiq actor and its concern.

The asker a worker hands its concerns: domain errors that can never succeed
end the job for good, and the ask outlasts the handler's own deadline, so a
slow handler fails its job with its own timeout instead of the job being
retried while the handler still runs. Real pykka actors under a real
supervisor, their handlers on a real event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
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
from runtime.service_actor import ServiceActor
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor
from runtime.worker import ASK_MARGIN_S, StopBudget, concern_asker

# The handler's own deadline in these tests (SHOPFLOW_ACTOR_ASK_TIMEOUT_S).
HANDLER_TIMEOUT_S = 0.5


@pytest.fixture
def bridge() -> Iterator[LoopBridge]:
    started = LoopBridge().start()
    yield started
    started.stop()


async def _handle(message: Any) -> Any:
    """Raise what it is sent; 'slow' outlasts the handler deadline; anything else answers."""
    if isinstance(message, Exception):
        raise message
    if message == "slow":
        await asyncio.sleep(HANDLER_TIMEOUT_S * 20)
    return f"done {message}"


@pytest.fixture
def root(bridge: LoopBridge) -> Iterator[Supervisor]:
    sup = Supervisor("boundary-root", [ChildSpec(
        "concern", lambda: ServiceActor.start("concern", _handle, bridge, HANDLER_TIMEOUT_S))])
    sup.start()
    yield sup
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


def test_a_slow_handler_fails_with_its_own_timeout_before_the_ask_gives_up(
        root: Supervisor, settings_: Settings) -> None:
    """Two slow jobs at once: the second waits in the mailbox while the first runs, so its
    ask started well before its handler. It still gets the handler's timeout, not the
    ask's (the ask waits the handler deadline plus a margin)."""
    ask = concern_asker(root, settings_)
    errors: list[BaseException] = []

    def job() -> None:
        try:
            ask("concern", "slow")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANDLER_TIMEOUT_S * 2 + ASK_MARGIN_S + 5)
    assert len(errors) == 2
    for error in errors:
        assert isinstance(error, TransientJobError) and not isinstance(error, AskTimeout), error
        assert f"timed out after {HANDLER_TIMEOUT_S}s" in str(error)


def test_a_stop_budget_hands_out_shares_of_what_is_left() -> None:
    now = [100.0]
    budget = StopBudget(10.0, clock=lambda: now[0])
    assert budget.share_s(0.5) == 5.0
    now[0] += 6.0
    assert budget.remaining_s() == 4.0 and budget.share_s(0.5) == 2.0
    now[0] += 60.0
    assert budget.remaining_s() == 0.0
