"""The retry helper: what is retried, how long it waits, what it never retries."""

from __future__ import annotations

import pytest

from runtime.circuit import CircuitBreaker
from runtime.errors import CircuitOpen, ExternalRequestRejected, ExternalServiceError
from runtime.http import RetryPolicy, call_with_retries, raise_for_status


class Script:
    """An attempt that fails with the given errors, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_transient_errors_are_retried_with_backoff_and_retry_after() -> None:
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    script = Script(ExternalServiceError("503", status=503),
                    ExternalServiceError("429", status=429, retry_after_s=2.0))
    policy = RetryPolicy(attempts=3, base_backoff_s=0.1, max_backoff_s=1.0, jitter=0.0)
    assert await call_with_retries("svc", script, policy, sleep=sleep) == "ok"
    assert script.calls == 3 and waits == [0.1, 2.0]


async def test_permanent_errors_are_not_retried() -> None:
    script = Script(ExternalRequestRejected("400", status=400))
    with pytest.raises(ExternalRequestRejected):
        await call_with_retries("svc", script, RetryPolicy(attempts=5))
    assert script.calls == 1


async def test_gives_up_after_the_attempts_and_respects_the_deadline() -> None:
    async def sleep(s: float) -> None:
        pass

    script = Script(*[ExternalServiceError("x") for _ in range(5)])
    with pytest.raises(ExternalServiceError):
        await call_with_retries("svc", script, RetryPolicy(attempts=3, jitter=0), sleep=sleep)
    assert script.calls == 3

    script = Script(*[ExternalServiceError("x") for _ in range(5)])
    with pytest.raises(ExternalServiceError):
        await call_with_retries("svc", script, RetryPolicy(attempts=5, base_backoff_s=1, jitter=0),
                                deadline_s=0.5, sleep=sleep)
    assert script.calls == 1


async def test_open_breaker_is_not_retried() -> None:
    breaker = CircuitBreaker("svc", failure_threshold=1)
    breaker.before_call()
    breaker.record_failure()
    script = Script()
    with pytest.raises(CircuitOpen):
        await call_with_retries("svc", script, RetryPolicy(attempts=3), breaker)
    assert script.calls == 0


def test_status_translation() -> None:
    raise_for_status("svc", 201, {})
    for status in (408, 429, 500, 503):
        with pytest.raises(ExternalServiceError):
            raise_for_status("svc", status, {})
    for status in (400, 401, 404, 422):
        with pytest.raises(ExternalRequestRejected):
            raise_for_status("svc", status, {})
