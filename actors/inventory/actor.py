"""The stock reserver: a pool of pykka actors behind the thin ``reserve_stock`` Dramatiq actor."""

from __future__ import annotations

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.inventory.messages import RESERVE_STOCK
from actors.inventory.reservations import ReservationOutcome, reserve_for_order
from runtime.broker import QUEUE_INVENTORY, declare_actor
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor, start_service_actor
from runtime.worker import ActorPool, Asker, Concern


def concern(ctx: ProcessContext) -> Concern:
    """The stock reserver pool, sized by ``inventory_concurrency``."""
    ttl_s = ctx.settings.reservation_ttl_s

    async def handle(order_id: int) -> ReservationOutcome:
        async with ctx.pool.acquire() as conn:
            return await reserve_for_order(conn, order_id, ttl_s)

    def start() -> pykka.ActorRef[ServiceActor]:
        return start_service_actor(ctx, "stock-reserver", handle)

    pool = ActorPool("stock-reserver", ctx.settings.inventory_concurrency, start)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def reserve_stock(order_id: int) -> None:
            """Thin Dramatiq actor: hand the order to the next reserver and wait."""
            ask(pool.next_id(), int(order_id))

        declare_actor(broker, RESERVE_STOCK, reserve_stock)

    return Concern("inventory", pool.children, declare, (QUEUE_INVENTORY,))
