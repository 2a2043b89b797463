"""The housekeeping actor behind the thin maintenance Dramatiq actors.

Four scheduled jobs on the ``maintenance`` queue; each thin Dramatiq actor
asks the ``housekeeping`` pykka actor (one mailbox, so the jobs of one
worker process never run two at a time) and keeps the outcome as the run's
result for ``shopflow schedules``.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Protocol

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.emailer.messages import SEND_ORDER_CONFIRMATION
from actors.emailer.sendgrid_transport import make_sendgrid_transport
from actors.housekeeping.carts import delete_expired_carts
from actors.housekeeping.email_outcomes import (
    OutcomeReconciler,
    Resend,
    reconcile_email_outcomes,
)
from actors.housekeeping.heartbeat import beat
from actors.housekeeping.messages import (
    CLEAN_EXPIRED_CARTS,
    CRON_HEARTBEAT,
    RECONCILE_EMAIL_OUTCOMES,
    RELEASE_EXPIRED_RESERVATIONS,
)
from actors.housekeeping.metering import PrometheusMeter
from actors.housekeeping.reservations import ReleaseOutcome, release_expired_reservations
from runtime.broker import QUEUE_MAINTENANCE, declare_actor
from runtime.jobs.broker import JobBroker
from runtime.jobs.context import checkpoint
from runtime.metrics import get_metrics
from runtime.process import ProcessContext
from runtime.scheduling.middleware import (
    RunObserver,
    ensure_scheduled_run_middleware,
    record_run_result,
)
from runtime.service_actor import ServiceActor, start_service_actor
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern

CARTS, RESERVATIONS, HEARTBEAT, EMAILS = "carts", "reservations", "heartbeat", "emails"


def _now() -> datetime:
    return datetime.now(UTC)


class HousekeepingMeter(Protocol):
    """Where the counts of each cleanup go (Prometheus counters, when metrics are wired)."""

    def carts_deleted(self, count: int) -> None:
        """Called on the process loop after each cart cleanup."""
        ...

    def reservations_released(self, count: int) -> None:
        """Called on the process loop after each reservation release."""
        ...


def confirmation_resender(broker: JobBroker) -> Resend:
    """Enqueues an order's confirmation job under ``job_id``; True unless it was a duplicate.

    The send is a blocking Redis call: it runs in a thread, never on the loop.
    """

    async def resend(order_id: int, job_id: str) -> bool:
        sent = await asyncio.to_thread(SEND_ORDER_CONFIRMATION.send, broker, order_id,
                                       job_id=job_id)
        return not sent.duplicate

    return resend


def concern(ctx: ProcessContext, meter: HousekeepingMeter | None = None,
            observer: RunObserver | None = None,
            reconciler: OutcomeReconciler | None = None) -> Concern:
    """The housekeeping concern of the flow worker (queue ``maintenance``).

    ``meter`` receives the cleanup counts; ``observer`` every scheduled run's
    outcome and duration (it is given to the scheduler middleware if this
    concern is the one that adds it). Both default to the process's
    Prometheus metrics. ``reconciler`` settles SendGrid sends in doubt; by
    default the SendGrid transport when SENDGRID_API_KEY is set, else none
    (the e-mail outcomes job then has nothing to do).
    """
    settings = ctx.settings
    if meter is None or observer is None:
        prometheus = PrometheusMeter(get_metrics(settings))
        meter = meter or prometheus
        observer = observer or prometheus
    if reconciler is None:
        reconciler = make_sendgrid_transport(settings, ctx.pool)
    resend = confirmation_resender(ctx.broker)

    async def release_checkpoint(so_far: ReleaseOutcome) -> None:
        """Between two release batches: the job's progress, and a stop if it was cancelled."""
        await checkpoint({"reservations_released": so_far.reservations})

    async def handle(message: tuple[str, datetime]) -> Any:
        """Runs on the process loop, called from the housekeeping actor's thread."""
        kind, now = message
        if kind == CARTS:
            carts = await delete_expired_carts(ctx.pool, now, settings.cart_max_age_s)
            meter.carts_deleted(carts.carts)
            return asdict(carts)
        if kind == RESERVATIONS:
            released = await release_expired_reservations(
                ctx.pool, now, settings.reservation_release_batch, release_checkpoint)
            meter.reservations_released(released.reservations)
            return asdict(released)
        if kind == HEARTBEAT:
            return await beat(ctx.redis, settings.namespace, now, settings.cron_heartbeat_ttl_s)
        if kind == EMAILS:
            if reconciler is None:
                return {"skipped": "SENDGRID_API_KEY is not set"}
            return asdict(await reconcile_email_outcomes(
                ctx.pool, reconciler, resend, settings.sendgrid_reconcile_grace_s))
        raise ValueError(f"housekeeping does not know job {kind!r}")

    def start() -> pykka.ActorRef[ServiceActor]:
        return start_service_actor(ctx, "housekeeping", handle)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        redis_url, _ = ctx.settings.require_urls()
        ensure_scheduled_run_middleware(broker, redis_url, ctx.settings.namespace, observer)

        def clean_expired_carts() -> None:
            """Thin Dramatiq actor: delete expired anonymous carts."""
            record_run_result(ask("housekeeping", (CARTS, _now())))

        def release_expired_reservations_job() -> None:
            """Thin Dramatiq actor: release expired stock reservations."""
            record_run_result(ask("housekeeping", (RESERVATIONS, _now())))

        def cron_heartbeat() -> None:
            """Thin Dramatiq actor: refresh the cron heartbeat key."""
            record_run_result(ask("housekeeping", (HEARTBEAT, _now())))

        def reconcile_email_outcomes_job() -> None:
            """Thin Dramatiq actor: settle SendGrid sends in doubt, re-send lost confirmations."""
            record_run_result(ask("housekeeping", (EMAILS, _now())))

        declare_actor(broker, CLEAN_EXPIRED_CARTS, clean_expired_carts)
        declare_actor(broker, RELEASE_EXPIRED_RESERVATIONS, release_expired_reservations_job)
        declare_actor(broker, CRON_HEARTBEAT, cron_heartbeat)
        declare_actor(broker, RECONCILE_EMAIL_OUTCOMES, reconcile_email_outcomes_job)

    return Concern("housekeeping", [ChildSpec("housekeeping", start)], declare,
                   (QUEUE_MAINTENANCE,))
