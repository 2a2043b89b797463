"""The housekeeping actor behind the thin maintenance Dramatiq actors.

Three scheduled jobs on the ``maintenance`` queue; each thin Dramatiq actor
asks the ``housekeeping`` pykka actor (one mailbox, so the jobs of one
worker process never run two at a time) and keeps the outcome as the run's
result for ``shopflow schedules``.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Protocol

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.housekeeping.carts import delete_expired_carts
from actors.housekeeping.heartbeat import beat
from actors.housekeeping.messages import (
    CLEAN_EXPIRED_CARTS,
    CRON_HEARTBEAT,
    RELEASE_EXPIRED_RESERVATIONS,
)
from actors.housekeeping.metering import PrometheusMeter
from actors.housekeeping.reservations import release_expired_reservations
from runtime.broker import QUEUE_MAINTENANCE, declare_actor
from runtime.metrics import get_metrics
from runtime.process import ProcessContext
from runtime.scheduling.middleware import (
    RunObserver,
    ensure_scheduled_run_middleware,
    record_run_result,
)
from runtime.service_actor import ServiceActor
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern

CARTS, RESERVATIONS, HEARTBEAT = "carts", "reservations", "heartbeat"


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


def concern(ctx: ProcessContext, meter: HousekeepingMeter | None = None,
            observer: RunObserver | None = None) -> Concern:
    """The housekeeping concern of the flow worker (queue ``maintenance``).

    ``meter`` receives the cleanup counts; ``observer`` every scheduled run's
    outcome and duration (it is given to the scheduler middleware if this
    concern is the one that adds it). Both default to the process's
    Prometheus metrics.
    """
    settings = ctx.settings
    if meter is None or observer is None:
        prometheus = PrometheusMeter(get_metrics(settings))
        meter = meter or prometheus
        observer = observer or prometheus

    async def handle(message: tuple[str, datetime]) -> Any:
        """Runs on the process loop, called from the housekeeping actor's thread."""
        kind, now = message
        if kind == CARTS:
            carts = await delete_expired_carts(ctx.pool, now, settings.cart_max_age_s)
            meter.carts_deleted(carts.carts)
            return asdict(carts)
        if kind == RESERVATIONS:
            released = await release_expired_reservations(
                ctx.pool, now, settings.reservation_release_batch)
            meter.reservations_released(released.reservations)
            return asdict(released)
        if kind == HEARTBEAT:
            return await beat(ctx.redis, settings.namespace, now, settings.cron_heartbeat_ttl_s)
        raise ValueError(f"housekeeping does not know job {kind!r}")

    def start() -> pykka.ActorRef[ServiceActor]:
        return ServiceActor.start("housekeeping", handle, ctx.bridge,
                                  settings.actor_ask_timeout_s)

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

        declare_actor(broker, CLEAN_EXPIRED_CARTS, clean_expired_carts)
        declare_actor(broker, RELEASE_EXPIRED_RESERVATIONS, release_expired_reservations_job)
        declare_actor(broker, CRON_HEARTBEAT, cron_heartbeat)

    return Concern("housekeeping", [ChildSpec("housekeeping", start)], declare,
                   (QUEUE_MAINTENANCE,))
