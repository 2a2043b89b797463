"""The fulfilment actor behind the thin ``advance_fulfillment`` Dramatiq actor."""

from __future__ import annotations

import pykka
from dramatiq.brokers.redis import RedisBroker

import aiohttp

from actors.fulfillment.adapters import LocalShippingGateway, ShippingGateway
from actors.shipping.gateway import build_shipping_gateway
from actors.fulfillment.flow import advance, order_age_s
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.orders.state import READY_TO_SHIP
from runtime.broker import QUEUE_FULFILLMENT, declare_actor
from runtime.metrics import get_metrics
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor
from runtime.worker import ActorPool, Asker, Concern

# Fulfilment actors in the flow worker (one per Dramatiq worker thread).
FULFILLMENT_ACTORS = 4


def make_gateway(ctx: ProcessContext) -> ShippingGateway:
    """The carrier and warehouse over HTTP when CARRIER_URL is set, else the offline gateway.

    The HTTP gateway's session lives on the process loop; it is closed with
    the process (the loop stops after the worker).
    """
    if not ctx.settings.carrier_url:
        return LocalShippingGateway()

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    return build_shipping_gateway(ctx.settings, ctx.run(open_session()))


def concern(ctx: ProcessContext) -> Concern:
    """The fulfilment flow actor."""
    gateway = make_gateway(ctx)
    metrics = get_metrics(ctx.settings)

    async def handle(order_id: int) -> str:
        status = await advance(ctx.pool, gateway, order_id)
        if status == READY_TO_SHIP:
            metrics.order_latency.labels(status).observe(await order_age_s(ctx.pool, order_id))
        return status

    def start() -> pykka.ActorRef[ServiceActor]:
        return ServiceActor.start("fulfillment", handle, ctx.bridge, ctx.settings.actor_ask_timeout_s)

    pool = ActorPool("fulfillment", FULFILLMENT_ACTORS, start)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def advance_fulfillment(order_id: int) -> None:
            """Thin Dramatiq actor: one step of the order's fulfilment."""
            ask(pool.next_id(), int(order_id))

        declare_actor(broker, ADVANCE_FULFILLMENT, advance_fulfillment)

    return Concern("fulfillment", pool.children, declare, (QUEUE_FULFILLMENT,))
