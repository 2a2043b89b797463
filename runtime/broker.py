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

import dramatiq
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from runtime.errors import ValidationError
from runtime.jobs.broker import JobBroker, JobConfig, QueueBounds, Submitted
from runtime.jobs.middleware import JobsMiddleware
from runtime.jobs.options import RetryPolicy, check_options, delay_of
from runtime.jobs.script import events_stream
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


def job_config(settings: Settings) -> JobConfig:
    """The job layer's configuration, from settings."""
    base_ms = settings.job_backoff_ms
    return JobConfig(
        retry=RetryPolicy(attempts=settings.job_attempts, backoff_ms=base_ms,
                          backoff_max_ms=max(base_ms * 16, 1)),
        infra_retries=settings.job_infra_retries,
        keep_completed=settings.job_keep_completed,
        keep_failed=settings.job_keep_failed,
        dedup_s=settings.job_dedup_s,
        bounds=QueueBounds(default_max=settings.queue_max_length,
                           per_queue={q: int(n) for q, n in settings.queue_max_lengths},
                           policy=settings.queue_full_policy,
                           timeout_s=settings.queue_full_timeout_s),
        poison_deaths=settings.job_poison_deaths,
        heartbeat_timeout_ms=settings.broker_heartbeat_timeout_ms,
        sweep_interval_s=settings.job_sweep_interval_s,
        limit_wait_ms=settings.job_limit_wait_ms,
        idle_timeout_ms=settings.worker_idle_timeout_ms,
    )


def default_middleware() -> list[Middleware]:
    """The middleware stack every ShopFlow broker gets, in order.

    Dramatiq's ``Retries`` is replaced by :class:`JobsMiddleware` (attempts,
    backoff with jitter, the outage budget, limits, cancellation, records).
    """
    return [
        AgeLimit(),
        TimeLimit(time_limit=DEFAULT_TIME_LIMIT_MS),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        JobsMiddleware(),
        CurrentMessage(),
    ]


def setup_broker(
    settings: Settings, extra_middleware: Iterable[Middleware] = ()
) -> JobBroker:
    """A job broker for ``settings.redis_url`` with the runtime's middleware.

    It is also made Dramatiq's global broker, because Dramatiq's worker and
    message-sending code look it up there; call this once per process (tests
    call it per test).
    """
    redis_url, _ = settings.require_urls()
    broker = JobBroker(
        url=redis_url,
        namespace=f"{settings.namespace}-jobs",
        events_key=events_stream(settings.namespace),
        config=job_config(settings),
        middleware=[*default_middleware(), *extra_middleware],
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
        """A message for this actor; ``args`` must be JSON-serialisable.

        ``options`` are job options (runtime.jobs.options); an unknown name
        or a bad value raises ValidationError here, before anything is sent.
        """
        return dramatiq.Message(
            queue_name=self.queue, actor_name=self.actor, args=tuple(args), kwargs={},
            options=check_options(options),
        )

    def send(self, broker: dramatiq.Broker, *args: Any, block: bool | None = None,
             **options: Any) -> Submitted:
        """Enqueue a job for this actor on ``broker``; ``delay_ms`` delays it.

        With a ``job_id`` already waiting, running or recently completed this
        is a no-op that returns the existing job (``duplicate=True``).
        """
        message = self.message(*args, **options)
        delay_ms = delay_of(options)
        if isinstance(broker, JobBroker):
            return broker.submit(message, delay_ms=delay_ms, block=block)
        sent = broker.enqueue(message, delay=delay_ms)
        return Submitted(str(sent.options.get("job_id", sent.message_id)), "waiting", False, sent)

    def as_job(self, *args: Any, **options: Any) -> dict[str, Any]:
        """The JSON form stored in an outbox row's ``job`` column (options checked now)."""
        check_options(options)
        return {"queue": self.queue, "actor": self.actor, "args": list(args), "options": options}


def declare_actor(
    broker: dramatiq.Broker, spec: JobSpec, fn: Callable[..., Any], **options: Any
) -> dramatiq.Actor[Any, Any]:
    """Bind ``fn`` as the Dramatiq actor behind ``spec`` on ``broker`` (not the global one)."""
    return dramatiq.Actor(
        fn, broker=broker, actor_name=spec.actor, queue_name=spec.queue, priority=0,
        options=options,
    )


def enqueue_job(broker: dramatiq.Broker, job: dict[str, Any], job_id: str | None = None,
                block: bool | None = None, dedup_s: int | None = None) -> Submitted:
    """Enqueue a job in the JSON form of :meth:`JobSpec.as_job` (the outbox relay uses it).

    ``job_id`` (and its ``dedup_s``) are used when the job names none: the
    relay passes one derived from the outbox row, so a row published twice
    enqueues its job once.
    """
    if not (isinstance(job, dict) and isinstance(job.get("queue"), str)
            and isinstance(job.get("actor"), str) and isinstance(job.get("args", []), list)
            and isinstance(job.get("options") or {}, dict)):
        raise ValidationError(f"not a job (queue, actor, args, options): {job!r:.200}")
    spec = JobSpec(queue=job["queue"], actor=job["actor"])
    options = dict(job.get("options") or {})
    if job_id is not None and "job_id" not in options:
        options["job_id"] = job_id
        if dedup_s is not None:
            options.setdefault("dedup_s", dedup_s)
    return spec.send(broker, *job.get("args", []), block=block, **options)


def queues_for(names: Sequence[str]) -> set[str]:
    """Validate queue names given on the command line."""
    unknown = set(names) - set(ALL_QUEUES)
    if unknown:
        raise ValueError(f"unknown queue(s) {sorted(unknown)}; known: {', '.join(ALL_QUEUES)}")
    return set(names)
