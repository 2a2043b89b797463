"""The emailer: a pykka actor behind the thin e-mail Dramatiq actors."""

from __future__ import annotations

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.emailer.emails import DeliveryOutcome, send_daily_report, send_order_confirmation
from actors.emailer.messages import SEND_DAILY_REPORT, SEND_ORDER_CONFIRMATION
from actors.emailer.sendgrid_transport import make_sendgrid_transport
from actors.emailer.transports import EmailTransport, OutboxTransport
from runtime.broker import QUEUE_EMAILS, declare_actor
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor, start_service_actor
from runtime.settings import Settings
from runtime.worker import ActorPool, Asker, Concern

# Emailer actors per e-mail worker process (one per Dramatiq worker thread).
EMAILER_ACTORS = 4


def make_transport(settings: Settings) -> EmailTransport:
    """The outbox transport (``.eml`` files): the default without a provider."""
    return OutboxTransport(settings.mail_dir)


def make_process_transport(ctx: ProcessContext) -> EmailTransport:
    """SendGrid when SENDGRID_API_KEY is set, else the outbox transport."""
    return make_sendgrid_transport(ctx.settings, ctx.pool) or make_transport(ctx.settings)


def concern(ctx: ProcessContext) -> Concern:
    """One emailer actor per worker thread of the e-mail worker."""
    transport = make_process_transport(ctx)
    zone = ctx.settings.zone

    async def handle(message: tuple[str, int | str]) -> DeliveryOutcome:
        kind, order_id = message
        if kind == "order_confirmation":
            return await send_order_confirmation(ctx.pool, transport, int(order_id), zone)
        if kind == "daily_report":
            return await send_daily_report(ctx.pool, transport, str(order_id))
        raise ValueError(f"emailer does not know e-mail kind {kind!r}")

    def start() -> pykka.ActorRef[ServiceActor]:
        return start_service_actor(ctx, "emailer", handle)

    pool = ActorPool("emailer", EMAILER_ACTORS, start)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def send_order_confirmation_job(order_id: int) -> None:
            """Thin Dramatiq actor: the confirmation e-mail of a paid order."""
            ask(pool.next_id(), ("order_confirmation", int(order_id)))

        # critical: a confirmation that fails for good pages on-call (as the original did).
        declare_actor(broker, SEND_ORDER_CONFIRMATION, send_order_confirmation_job, critical=True)

        def send_daily_report_job(report_date_iso: str) -> None:
            """Thin Dramatiq actor: the daily sales report to the team."""
            ask(pool.next_id(), ("daily_report", str(report_date_iso)))

        declare_actor(broker, SEND_DAILY_REPORT, send_daily_report_job)

    return Concern("emailer", pool.children, declare, (QUEUE_EMAILS,))
