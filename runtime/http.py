"""Calling HTTP services outside the process: timeouts, retries with backoff, a breaker.

Every adapter to an external service (warehouse, carrier, packing, ...)
builds on the same three pieces:

- :func:`client_timeout`: separate connect and read timeouts, so a service
  that accepts the connection and then hangs fails within ``read_s``.
- :func:`raise_for_status`: one translation of HTTP answers into the error
  hierarchy: 408/425/429/5xx are :class:`ExternalServiceError` (transient,
  with the ``Retry-After`` hint), other 4xx :class:`ExternalRequestRejected`
  (permanent).
- :func:`call_with_retries`: runs one attempt at a time through a
  :class:`CircuitBreaker`, retrying transient failures with capped
  exponential backoff and jitter, never past a deadline.

A retried request must be safe to repeat: callers send an idempotency key
with every request that changes something on the other side.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from runtime.circuit import CircuitBreaker
from runtime.errors import CircuitOpen, ExternalRequestRejected, ExternalServiceError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses that mean "try again later" rather than "your request is wrong".
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# A Retry-After longer than this is not waited for inside one call; the job
# or the next poll picks it up instead.
MAX_HONOURED_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one logical call is attempted."""

    attempts: int = 3
    base_backoff_s: float = 0.5
    max_backoff_s: float = 4.0
    # Full jitter fraction: the wait is drawn from [delay*(1-jitter), delay].
    jitter: float = 0.5

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.max_backoff_s, self.base_backoff_s * (2 ** (attempt - 1)))
        spread = delay * self.jitter
        jittered: float = delay - (rng or random).uniform(0, spread)
        return jittered


def client_timeout(connect_s: float, read_s: float, total_s: float | None = None) -> aiohttp.ClientTimeout:
    """A timeout that bounds connecting and each read separately (and the whole call if given)."""
    return aiohttp.ClientTimeout(total=total_s, sock_connect=connect_s, connect=connect_s,
                                 sock_read=read_s)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` header in seconds (the delta-seconds form), or None."""
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def raise_for_status(service: str, status: int, headers: Mapping[str, str], body: str = "") -> None:
    """Translate a non-2xx answer into the error hierarchy; return quietly on 2xx."""
    if 200 <= status < 300:
        return
    detail = body[:200]
    if status in TRANSIENT_STATUSES or status >= 500:
        raise ExternalServiceError(f"{service} answered {status}: {detail}", status=status,
                                   retry_after_s=retry_after_s(headers))
    raise ExternalRequestRejected(f"{service} rejected the request with {status}: {detail}",
                                  status=status)


def counts_against_breaker(exc: BaseException) -> bool:
    """Transient failures say the service is unwell; a rejected request says we are wrong."""
    return isinstance(exc, ExternalServiceError) and not isinstance(exc, CircuitOpen)


def translate_transport_error(service: str, exc: BaseException) -> ExternalServiceError:
    """A timeout or connection problem as an :class:`ExternalServiceError`."""
    if isinstance(exc, asyncio.TimeoutError):
        return ExternalServiceError(f"{service} did not answer in time")
    return ExternalServiceError(f"{service} unreachable: {type(exc).__name__}: {exc}")


async def call_with_retries(
    service: str,
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    breaker: CircuitBreaker | None = None,
    deadline_s: float | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[int, ExternalServiceError], None] | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, fails permanently, or attempts/deadline run out.

    ``attempt`` raises :class:`ExternalServiceError` for transient failures
    (aiohttp timeouts and connection errors are translated here) and
    :class:`ExternalRequestRejected` for permanent ones, which are never
    retried. An open breaker fails the call at once, without retrying: the
    breaker already knows the service is down. ``deadline_s`` is a relative
    budget: no backoff is started that would end after it.
    """
    started = clock()
    last: ExternalServiceError | None = None
    for number in range(1, policy.attempts + 1):
        try:
            return await _one_attempt(service, attempt, breaker)
        except CircuitOpen:
            raise
        except ExternalServiceError as exc:
            last = exc
        if number == policy.attempts:
            break
        wait_s = policy.backoff_s(number)
        if last.retry_after_s is not None:
            wait_s = max(wait_s, min(last.retry_after_s, MAX_HONOURED_RETRY_AFTER_S))
        if deadline_s is not None and clock() - started + wait_s >= deadline_s:
            break
        if on_retry is not None:
            on_retry(number, last)
        log.info("%s attempt %d failed (%s); retrying in %.2fs", service, number, last, wait_s,
                 extra={"service": service, "attempt": number})
        await sleep(wait_s)
    assert last is not None
    raise last


async def _one_attempt(service: str, attempt: Callable[[], Awaitable[T]],
                       breaker: CircuitBreaker | None) -> T:
    async def translated() -> T:
        try:
            return await attempt()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise translate_transport_error(service, exc) from exc

    if breaker is None:
        return await translated()
    return await breaker.call(translated, is_failure=counts_against_breaker)
