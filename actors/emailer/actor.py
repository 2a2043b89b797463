"""The emailer: a pykka actor behind the thin e-mail Dramatiq actors."""

from __future__ import annotations

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.emailer.emails import DeliveryOutcome, send_order_confirmation
from actors.emailer.messages import SEND_ORDER_CONFIRMATION
from actors.emailer.transports import EmailTransport, OutboxTransport
from runtime.broker import QUEUE_EMAILS, declare_actor
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor
from runtime.settings import Settings
from runtime.worker import ActorPool, Asker, Concern

# Emailer actors per e-mail worker process (one per Dramatiq worker thread).
EMAILER_ACTORS = 4


def make_transport(settings: Settings) -> EmailTransport:
    """The outbox transport (``.eml`` files) unless a provider is configured."""
    return OutboxTransport(settings.mail_dir)


def concern(ctx: ProcessContext) -> Concern:
    """One emailer actor per worker thread of the e-mail worker."""
    transport = make_transport(ctx.settings)
    zone = ctx.settings.zone

    async def handle(message: tuple[str, int]) -> DeliveryOutcome:
        kind, order_id = message
        if kind == "order_confirmation":
            return await send_order_confirmation(ctx.pool, transport, order_id, zone)
        raise ValueError(f"emailer does not know e-mail kind {kind!r}")

    def start() -> pykka.ActorRef[ServiceActor]:
        return ServiceActor.start("emailer", handle, ctx.bridge, ctx.settings.actor_ask_timeout_s)

    pool = ActorPool("emailer", EMAILER_ACTORS, start)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def send_order_confirmation_job(order_id: int) -> None:
            """Thin Dramatiq actor: the confirmation e-mail of a paid order."""
            ask(pool.next_id(), ("order_confirmation", int(order_id)))

        # critical: a confirmation that fails for good pages on-call (as the original did).
        declare_actor(broker, SEND_ORDER_CONFIRMATION, send_order_confirmation_job, critical=True)

    return Concern("emailer", pool.children, declare, (QUEUE_EMAILS,))
