"""The Dramatiq broker on Redis, built by a function, and the producer's view of actors.

Nothing here runs at import time. :func:`setup_broker` builds a broker with
the runtime's middleware; :class:`JobSpec` names an actor (queue + actor name)
so a producer can send to it without importing the actor's code, which is
what lets every concern publish the messages it accepts in a small module.

The broker keeps a **job ledger** in Redis (:class:`LedgerBroker`): per
queue, how many jobs were sent, how many messages were enqueued again (a
retry, a delayed job falling due), acknowledged and rejected. Each count is
written by the same Redis script call as the broker command it counts,
so a process killed at any moment cannot make the ledger disagree with what
Redis holds. A job ends once: ``ended = acked + rejected - enqueued again``,
and once the queues are idle ``sent == ended`` for every queue, or a job was
lost (fewer ends) or ran to its end twice (more). :func:`read_ledger` reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis, q_name
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
# Message option set at a job's first enqueue (epoch ms). Later enqueues of the same job
# (each retry, a delayed job falling due) carry it: the ledger counts them as "again".
FIRST_SENT_OPTION = "first_sent_ms"


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


def ledger_key(broker_namespace: str) -> str:
    """The Redis hash ``<queue>:<count>`` -> n of the job ledger (next to Dramatiq's keys)."""
    return f"{broker_namespace}:__ledger__"


@dataclass(frozen=True)
class LedgerRow:
    """One queue's ledger: counts since the Redis data was created."""

    queue: str
    sent: int = 0
    again: int = 0  # the same job enqueued again: a retry, or a delayed job falling due
    acked: int = 0
    rejected: int = 0  # failed for good: to the dead-letter queue

    @property
    def ended(self) -> int:
        """Jobs that ended: completed, skipped or failed for good, each once."""
        return self.acked + self.rejected - self.again

    @property
    def open(self) -> int:
        """Jobs waiting, delayed or running now (after the fact: lost ones too)."""
        return self.sent - self.ended


def read_ledger(client: redis.Redis, broker_namespace: str) -> dict[str, LedgerRow]:
    """Every queue's :class:`LedgerRow` (queues that never saw a job are left out)."""
    counts: dict[str, dict[str, int]] = {}
    for raw_field, raw_value in client.hgetall(ledger_key(broker_namespace)).items():
        text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        queue, _, name = text.rpartition(":")
        counts.setdefault(queue, {})[name] = int(raw_value)
    return {queue: LedgerRow(queue, **values) for queue, values in sorted(counts.items())}


# Appended to Dramatiq's dispatch script for the commands the ledger counts: KEYS[2] is
# the ledger hash, the last argument the count to add one to (enqueue, ack and nack read
# only their first one or two arguments and never return early, so it runs after their
# writes, in the same script call). ARGV is read, not changed (Redis 7 may protect it).
_LEDGER_EPILOGUE = b"""
-- ShopFlow job ledger (runtime/broker.py LedgerBroker)
redis.call("hincrby", KEYS[2], ARGV[#ARGV], 1)
"""


class LedgerBroker(RedisBroker):
    """Dramatiq's Redis broker, keeping the job ledger (module doc) with every command.

    ``enqueue`` runs on the sending thread (a producer, or a worker retrying
    or handing over a due message); ``do_ack``/``do_nack`` on consumer threads.
    Each counted command is one script call, as in Dramatiq: its own script
    with the count added (it relies on dramatiq 2.2.1's ``dispatch.lua``
    arguments and on its enqueue/ack/nack branches not returning early).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._ledger_key = ledger_key(self.namespace)
        raw = self.scripts["dispatch"].script
        source = raw.encode() if isinstance(raw, str) else bytes(raw)
        self._counted_dispatch = self.client.register_script(source + _LEDGER_EPILOGUE)
        self._sending = threading.local()

    def enqueue(self, message: dramatiq.Message[Any], *,
                delay: int | None = None) -> dramatiq.Message[Any]:
        """Enqueue; a message without :data:`FIRST_SENT_OPTION` is a new job and gets it."""
        first = FIRST_SENT_OPTION not in message.options
        if first:
            message = message.copy(options={FIRST_SENT_OPTION: int(time.time() * 1000)})
        self._sending.count = "sent" if first else "again"
        try:
            return super().enqueue(message, delay=delay)
        finally:
            self._sending.count = "again"

    def do_enqueue(self, queue_name: str, message_id: str, message_data: bytes) -> None:
        self._counted(queue_name, "enqueue", getattr(self._sending, "count", "again"),
                      message_id, message_data)

    def do_ack(self, queue_name: str, message_id: str) -> None:
        self._counted(queue_name, "ack", "acked", message_id)

    def do_nack(self, queue_name: str, message_id: str) -> None:
        self._counted(queue_name, "nack", "rejected", message_id)

    def _counted(self, queue_name: str, command: str, count: str, *args: Any) -> None:
        """Dramatiq's ``command`` and the ledger count, in one script call.

        The arguments are those ``RedisBroker._dispatch`` passes (dramatiq 2.2.1).
        """
        self._counted_dispatch(keys=[self.namespace, self._ledger_key], args=[
            command, current_millis(), queue_name, self.broker_id, self.heartbeat_timeout,
            self.dead_message_ttl, self._should_do_maintenance(command),
            self._max_unpack_size(),  # type: ignore[no-untyped-call]
            *args, f"{q_name(queue_name)}:{count}",
        ])


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
    """A Redis broker for ``settings.redis_url`` with the runtime's middleware and job ledger.

    It is also made Dramatiq's global broker, because Dramatiq's worker and
    message-sending code look it up there; call this once per process (tests
    call it per test).
    """
    redis_url, _ = settings.require_urls()
    broker = LedgerBroker(
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
