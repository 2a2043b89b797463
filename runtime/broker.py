"""The Dramatiq broker on Redis, built by a function, and the producer's view of actors.

Nothing here runs at import time. :func:`setup_broker` builds a broker with
the runtime's middleware; :class:`JobSpec` names an actor (queue + actor name)
so a producer can send to it without importing the actor's code, which is
what lets every concern publish the messages it accepts in a small module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from runtime.errors import Busy, ExternalServiceError, OutcomeUnknown, PermanentJobError
from runtime.settings import Settings

log = logging.getLogger(__name__)

# The queues of the original system, plus the ones later concerns add.
QUEUE_EMAILS = "emails"
QUEUE_INVENTORY = "inventory"
QUEUE_FULFILLMENT = "fulfillment"
QUEUE_RECOMMENDATIONS = "recommendations"
QUEUE_SUPPORT = "support"
QUEUE_MODERATION = "moderation"
QUEUE_ANALYTICS = "analytics"
QUEUE_MAINTENANCE = "maintenance"
ALL_QUEUES = (
    QUEUE_EMAILS, QUEUE_INVENTORY, QUEUE_FULFILLMENT, QUEUE_RECOMMENDATIONS,
    QUEUE_SUPPORT, QUEUE_MODERATION, QUEUE_ANALYTICS, QUEUE_MAINTENANCE,
)

# A job that ran longer than this is killed by Dramatiq's TimeLimit (10 min).
DEFAULT_TIME_LIMIT_MS = 10 * 60 * 1000


# Errors that say "a server is away" (a restart, a failover), "an outside service is
# down or slow" (SendGrid 5xx/429, a warehouse timeout, an open circuit, an e-mail
# whose outcome is still being reconciled) or "someone else holds this work right
# now", not "this job is wrong". Other transient errors keep the job's own attempts.
_INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    Busy,
    ExternalServiceError,
    OutcomeUnknown,
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # seen when a connection breaks mid-operation
    asyncpg.exceptions.OperatorInterventionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def is_infrastructure_error(exc: BaseException) -> bool:
    """True for failures caused by an unreachable, restarting or failing server or service."""
    return isinstance(exc, _INFRASTRUCTURE_ERRORS)


def _retry_when(max_retries: int, infra_retries: int) -> Callable[[int, BaseException], bool]:
    """Retry failures up to ``max_retries``; never a permanent one.

    A job that failed because PostgreSQL or Redis was restarting, or because
    an outside service was down (a transient error), did nothing wrong, so it
    gets ``infra_retries`` tries (with the same capped exponential backoff)
    before it is given up: an outage of minutes loses no job, while a job that
    fails on its own merits still stops after its attempts.
    """

    def should_retry(retries_so_far: int, exc: BaseException) -> bool:
        if isinstance(exc, PermanentJobError):
            return False
        if is_infrastructure_error(exc):
            return retries_so_far < infra_retries
        return retries_so_far < max_retries

    return should_retry


def default_middleware(settings: Settings) -> list[Middleware]:
    """The middleware stack every ShopFlow broker gets, in order."""
    max_retries = settings.job_attempts - 1
    return [
        AgeLimit(),
        TimeLimit(time_limit=DEFAULT_TIME_LIMIT_MS),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(
            max_retries=max_retries,
            min_backoff=settings.job_backoff_ms,
            max_backoff=max(settings.job_backoff_ms * 16, 1),
            retry_when=_retry_when(max_retries, settings.job_infra_retries),
        ),
        CurrentMessage(),
    ]


def setup_broker(
    settings: Settings, extra_middleware: Iterable[Middleware] = ()
) -> RedisBroker:
    """A Redis broker for ``settings.redis_url`` with the runtime's middleware.

    It is also made Dramatiq's global broker, because Dramatiq's worker and
    message-sending code look it up there; call this once per process (tests
    call it per test).
    """
    redis_url, _ = settings.require_urls()
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=redis_url,
        namespace=f"{settings.namespace}-jobs",
        middleware=[*default_middleware(settings), *extra_middleware],
        heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
        maintenance_chance=settings.broker_maintenance_chance,
    )
    for queue in ALL_QUEUES:
        broker.declare_queue(queue)
    dramatiq.set_broker(broker)
    return broker


@dataclass(frozen=True)
class JobSpec:
    """The address of a Dramatiq actor: what a producer needs to send to it."""

    queue: str
    actor: str

    def message(self, *args: Any, **options: Any) -> dramatiq.Message[Any]:
        """A message for this actor; ``args`` must be JSON-serialisable."""
        return dramatiq.Message(
            queue_name=self.queue, actor_name=self.actor, args=tuple(args), kwargs={},
            options=options,
        )

    def send(self, broker: dramatiq.Broker, *args: Any, delay_ms: int | None = None,
             **options: Any) -> dramatiq.Message[Any]:
        """Enqueue a message for this actor on ``broker``."""
        return broker.enqueue(self.message(*args, **options), delay=delay_ms)

    def as_job(self, *args: Any, **options: Any) -> dict[str, Any]:
        """The JSON form stored in an outbox row's ``job`` column."""
        return {"queue": self.queue, "actor": self.actor, "args": list(args), "options": options}


def declare_actor(
    broker: dramatiq.Broker, spec: JobSpec, fn: Callable[..., Any], **options: Any
) -> dramatiq.Actor[Any, Any]:
    """Bind ``fn`` as the Dramatiq actor behind ``spec`` on ``broker`` (not the global one)."""
    return dramatiq.Actor(
        fn, broker=broker, actor_name=spec.actor, queue_name=spec.queue, priority=0,
        options=options,
    )


def enqueue_job(broker: dramatiq.Broker, job: dict[str, Any]) -> dramatiq.Message[Any]:
    """Enqueue a job in the JSON form of :meth:`JobSpec.as_job` (the outbox relay uses it)."""
    spec = JobSpec(queue=job["queue"], actor=job["actor"])
    options = dict(job.get("options") or {})
    delay_ms = options.pop("delay_ms", None)
    return spec.send(broker, *job.get("args", []), delay_ms=delay_ms, **options)


def queues_for(names: Sequence[str]) -> set[str]:
    """Validate queue names given on the command line."""
    unknown = set(names) - set(ALL_QUEUES)
    if unknown:
        raise ValueError(f"unknown queue(s) {sorted(unknown)}; known: {', '.join(ALL_QUEUES)}")
    return set(names)
