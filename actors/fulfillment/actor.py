"""The fulfilment actor behind the thin ``advance_fulfillment`` Dramatiq actor."""

from __future__ import annotations

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.fulfillment.adapters import LocalShippingGateway, ShippingGateway
from actors.fulfillment.flow import advance
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from runtime.broker import QUEUE_FULFILLMENT, declare_actor
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern


def make_gateway(ctx: ProcessContext) -> ShippingGateway:
    """The offline gateway; HTTP gateways plug in here when configured."""
    return LocalShippingGateway()


def concern(ctx: ProcessContext) -> Concern:
    """The fulfilment flow actor."""
    gateway = make_gateway(ctx)

    async def handle(order_id: int) -> str:
        return await advance(ctx.pool, gateway, order_id)

    def start() -> pykka.ActorRef[ServiceActor]:
        return ServiceActor.start("fulfillment", handle, ctx.bridge, ctx.settings.actor_ask_timeout_s)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def advance_fulfillment(order_id: int) -> None:
            """Thin Dramatiq actor: one step of the order's fulfilment."""
            ask("fulfillment", int(order_id))

        declare_actor(broker, ADVANCE_FULFILLMENT, advance_fulfillment)

    return Concern("fulfillment", [ChildSpec("fulfillment", start)], declare, (QUEUE_FULFILLMENT,))
