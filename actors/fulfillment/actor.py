"""The fulfilment actor behind the thin ``advance_fulfillment`` Dramatiq actor."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import aiohttp
import pykka
from aiohttp import web
from dramatiq.brokers.redis import RedisBroker

from actors.fulfillment.adapters import ShippingGateway
from actors.fulfillment.alerts import RefusalPager
from actors.fulfillment.flow import advance, order_age_s
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.orders.state import READY_TO_SHIP
from actors.shipping.gateway import build_shipping_gateway
from runtime.alerts import AlertDispatcher, Alerter
from runtime.broker import QUEUE_FULFILLMENT, declare_actor
from runtime.metrics import Metrics, get_metrics
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor, start_service_actor
from runtime.settings import Settings
from runtime.worker import ActorPool, Asker, Concern

log = logging.getLogger(__name__)

# Fulfilment actors in the flow worker (one per Dramatiq worker thread).
FULFILLMENT_ACTORS = 4
# How long opening the gateway's resources (session, simulators) may take.
OPEN_TIMEOUT_S = 30.0


@dataclass
class ShippingResources:
    """What the HTTP gateway lives on: its session and the simulators this process serves."""

    session: aiohttp.ClientSession
    simulators: list[web.AppRunner] = field(default_factory=list)

    async def close(self) -> None:
        """Close the session, then stop the simulators (reverse order of opening)."""
        await self.session.close()
        for runner in reversed(self.simulators):
            await runner.cleanup()


async def open_shipping(settings: Settings) -> ShippingResources:
    """The session and, without CARRIER_URL / WAREHOUSE_URL, the simulators to talk to.

    Like the stock-sync daemon with the warehouse: a simulator is started on
    its fixed port, or the one already listening there is used.
    """
    from ops.simulators.carrier import create_carrier_app
    from ops.simulators.embedded import SIMULATOR_SEED, embedded_warehouse_app, start_or_reuse

    simulators: list[web.AppRunner] = []
    try:
        if settings.carrier_url is None:
            runner = await start_or_reuse("carrier", create_carrier_app(seed=SIMULATOR_SEED),
                                          settings.carrier_sim_port)
            simulators += [runner] if runner else []
        if settings.warehouse_url is None:  # packing requests go to the warehouse
            runner = await start_or_reuse("warehouse", embedded_warehouse_app(settings),
                                          settings.warehouse_sim_port)
            simulators += [runner] if runner else []
    except BaseException:
        for started in reversed(simulators):
            await started.cleanup()
        raise
    return ShippingResources(aiohttp.ClientSession(), simulators)


def make_gateway(ctx: ProcessContext) -> ShippingGateway:
    """The carrier and the warehouse over HTTP: the real services, or their simulators.

    The session and any simulator live on the process loop and are closed
    when the context stops (:meth:`ProcessContext.on_stop`).
    """
    resources = ctx.run(open_shipping(ctx.settings), OPEN_TIMEOUT_S)
    ctx.on_stop(resources.close)
    gateway = build_shipping_gateway(ctx.settings, resources.session)
    log.info("shipping over HTTP: carrier %s, packing %s", gateway.carrier_url,
             gateway.warehouse_url)
    return gateway


def make_refusal_pager(ctx: ProcessContext, metrics: Metrics) -> RefusalPager:
    """Pages on-call when the carrier or the warehouse refuses the flow's requests.

    Notifications run on the process loop through a dispatcher; the ones in
    flight when the process stops are waited for (``ProcessContext.on_stop``).
    """
    pager = RefusalPager(Alerter(ctx.settings, ctx.redis, metrics), AlertDispatcher(ctx.bridge))
    ctx.on_stop(pager.aclose)
    return pager


def concern(ctx: ProcessContext) -> Concern:
    """The fulfilment flow actor."""
    gateway = make_gateway(ctx)
    metrics = get_metrics(ctx.settings)
    pager = make_refusal_pager(ctx, metrics)

    async def handle(order_id: int) -> str:
        async def observe_latency() -> None:
            age_s = await order_age_s(ctx.pool, order_id)
            metrics.order_latency.labels(READY_TO_SHIP).observe(age_s)

        return await advance(ctx.pool, gateway, order_id, pager, on_ready_to_ship=observe_latency)

    def start() -> pykka.ActorRef[ServiceActor]:
        return start_service_actor(ctx, "fulfillment", handle)

    pool = ActorPool("fulfillment", FULFILLMENT_ACTORS, start)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def advance_fulfillment(order_id: int) -> None:
            """Thin Dramatiq actor: one step of the order's fulfilment."""
            ask(pool.next_id(), int(order_id))

        declare_actor(broker, ADVANCE_FULFILLMENT, advance_fulfillment)

    return Concern("fulfillment", pool.children, declare, (QUEUE_FULFILLMENT,))
