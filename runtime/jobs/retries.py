"""Whether and when a failed attempt runs again.

A job gets its own ``attempts`` (message option, actor option, or the
setting) with exponential or fixed backoff and jitter. A failure that only
says "a server or service is away" (PostgreSQL or Redis restarting, SendGrid
answering 503, a warehouse timeout, an open circuit) gets the larger outage
budget instead, so an outage of minutes loses no job, while a job that fails
on its own merits still stops after its attempts. A permanent error is never
retried. A service's own hint (``Retry-After``) is honoured when it asks for
longer than the backoff.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import redis

from runtime.errors import (
    Busy,
    ExternalServiceError,
    InfrastructureUnavailable,
    OutcomeUnknown,
    PermanentJobError,
)
from runtime.jobs.options import RetryPolicy

# The longest Retry-After we wait for before retrying (a service asking for more is down).
MAX_HONOURED_RETRY_AFTER_S = 3_600.0

# Errors that say "a server is away" (a restart, a failover), "an outside service is
# down or slow" (5xx/429, a timeout, an open circuit, an e-mail whose outcome is still
# being reconciled) or "someone else holds this work right now", not "this job is wrong".
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    Busy,
    InfrastructureUnavailable,  # an actor's handler met one of the errors below
    ExternalServiceError,
    OutcomeUnknown,
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # seen when a connection breaks mid-operation
    asyncpg.exceptions.OperatorInterventionError,  # e.g. the server shutting down
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the chain of exceptions it was raised *from* (a few levels deep).

    Only ``__cause__`` (``raise X from Y``, or a wrapper that sets it, as the
    actors' crash rule does): an error merely raised while another was being
    handled (``__context__``: a bug in an ``except ConnectionError`` block, say)
    is its own failure, not that one.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help (the error itself, not one it was raised from)."""
    return isinstance(exc, PermanentJobError)


def is_infrastructure_error(exc: BaseException) -> bool:
    """True for failures caused by an unreachable, restarting or failing server or service.

    Follows ``__cause__``: an actor crash or a wrapper raised *from* a
    connection error is still an outage, not the job's fault.
    """
    return any(isinstance(e, INFRASTRUCTURE_ERRORS) for e in causes(exc))


def retry_after_ms(exc: BaseException) -> int | None:
    """A service's own hint of when to come back, from the error or what it was raised from."""
    for e in causes(exc):
        hint = getattr(e, "retry_after_s", None)
        if isinstance(hint, int | float) and hint > 0:
            return int(min(hint, MAX_HONOURED_RETRY_AFTER_S) * 1000)
    return None


def retry_delay_ms(policy: RetryPolicy, infra_retries: int, retries_so_far: int,
                   exc: BaseException, unit_random: float = 0.5) -> int | None:
    """The delay before the next attempt, or None if the job has failed for good."""
    if is_permanent(exc):
        return None
    budget = max(infra_retries, policy.attempts - 1) if is_infrastructure_error(exc) \
        else policy.attempts - 1
    if retries_so_far >= budget:
        return None
    delay = policy.delay_ms(retries_so_far, unit_random)
    hint = retry_after_ms(exc)
    return max(delay, hint) if hint is not None else delay
