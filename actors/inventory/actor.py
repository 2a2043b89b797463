"""The stock reserver: a pool of pykka actors behind the thin ``reserve_stock`` Dramatiq actor."""

from __future__ import annotations

import itertools
import threading

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.inventory.messages import RESERVE_STOCK
from actors.inventory.reservations import ReservationOutcome, reserve_for_order
from runtime.broker import QUEUE_INVENTORY, declare_actor
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern


def concern(ctx: ProcessContext) -> Concern:
    """The stock reserver pool, sized by ``inventory_concurrency``."""
    size = ctx.settings.inventory_concurrency
    ttl_s = ctx.settings.reservation_ttl_s

    async def handle(order_id: int) -> ReservationOutcome:
        async with ctx.pool.acquire() as conn:
            return await reserve_for_order(conn, order_id, ttl_s)

    def start_one() -> pykka.ActorRef[ServiceActor]:
        return ServiceActor.start("stock-reserver", handle, ctx.bridge, ctx.settings.actor_ask_timeout_s)

    children = [ChildSpec(f"stock-reserver-{i}", start_one) for i in range(size)]

    def declare(broker: RedisBroker, ask: Asker) -> None:
        turn = itertools.count()
        lock = threading.Lock()

        def reserve_stock(order_id: int) -> None:
            """Thin Dramatiq actor: hand the order to the next reserver and wait."""
            with lock:
                slot = next(turn) % size
            ask(f"stock-reserver-{slot}", int(order_id))

        declare_actor(broker, RESERVE_STOCK, reserve_stock)

    return Concern("inventory", children, declare, (QUEUE_INVENTORY,))
