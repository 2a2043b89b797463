"""The circuit breaker's state machine, with a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest

from runtime.circuit import BreakerState, CircuitBreaker
from runtime.errors import CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_half_opens_after_timeout() -> None:
    clock = Clock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker("svc", failure_threshold=3, reset_timeout_s=10, clock=clock,
                             on_change=lambda name, old, new: changes.append((old, new)))
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.retry_after_s == pytest.approx(10)
    clock.now = 10
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one trial call at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert changes == [(BreakerState.CLOSED, BreakerState.OPEN),
                       (BreakerState.OPEN, BreakerState.HALF_OPEN),
                       (BreakerState.HALF_OPEN, BreakerState.CLOSED)]


def test_failed_trial_reopens_for_a_full_timeout() -> None:
    clock = Clock()
    breaker = CircuitBreaker("svc", failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.before_call()
    breaker.record_failure()
    clock.now = 5
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 9
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot().times_opened == 2


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=2)
    for ok in (False, True, False, True):
        breaker.before_call()
        breaker.record_success() if ok else breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


async def test_call_counts_only_failures_the_predicate_accepts() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1)

    async def bad_request() -> None:
        raise ValueError("our fault")

    with pytest.raises(ValueError):
        await breaker.call(bad_request, is_failure=lambda exc: not isinstance(exc, ValueError))
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(ValueError):
        await breaker.call(bad_request)
    assert breaker.state is BreakerState.OPEN


def _half_open(failure_threshold: int = 1) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    breaker = CircuitBreaker("svc", failure_threshold=failure_threshold, reset_timeout_s=5, clock=clock)
    breaker.before_call()
    breaker.record_failure()
    clock.now = 5
    assert breaker.state is BreakerState.HALF_OPEN
    return breaker, clock


async def test_a_cancelled_trial_frees_its_slot_without_closing_the_breaker() -> None:
    breaker, _ = _half_open()
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    trial = asyncio.create_task(breaker.call(hangs))
    await asyncio.wait_for(started.wait(), 5)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    # no evidence either way: still half-open, and the next caller gets the trial
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()
    breaker.record_failure()
    assert breaker.snapshot().state is BreakerState.OPEN


async def test_callers_during_a_trial_wait_for_it_then_go_ahead_after_a_success() -> None:
    breaker, _ = _half_open()
    release = asyncio.Event()
    ran: list[str] = []

    async def trial_call() -> str:
        await release.wait()
        ran.append("trial")
        return "trial"

    async def later_call() -> str:
        ran.append("later")
        return "later"

    trial = asyncio.create_task(breaker.call(trial_call))
    await asyncio.sleep(0)  # the trial is admitted and waiting on the service
    waiting = [asyncio.create_task(breaker.call(later_call)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in waiting) and ran == []  # they wait, they do not fail
    release.set()
    assert await asyncio.wait_for(asyncio.gather(trial, *waiting), 5) == ["trial"] + ["later"] * 3
    assert ran[0] == "trial" and breaker.state is BreakerState.CLOSED


async def test_callers_during_a_trial_fail_fast_after_it_fails() -> None:
    breaker, _ = _half_open()
    release = asyncio.Event()

    async def trial_call() -> None:
        await release.wait()
        raise ConnectionError("still down")

    async def never() -> None:
        raise AssertionError("must not run while the service is down")

    trial = asyncio.create_task(breaker.call(trial_call))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(breaker.call(never)) for _ in range(2)]
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(ConnectionError):
        await trial
    for task in waiting:
        with pytest.raises(CircuitOpen):
            await asyncio.wait_for(task, 5)
    assert breaker.state is BreakerState.OPEN
