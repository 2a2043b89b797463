"""The order flow as the outside world starts it: place an order, confirm its payment.

This is where the concerns meet: placing an order queues the inventory
concern's reservation; confirming payment holds the stock for good and
queues the confirmation e-mail and the fulfilment flow, all in the same
transaction as the status change.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from actors.emailer.messages import SEND_ORDER_CONFIRMATION
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.inventory.messages import RESERVE_STOCK
from actors.inventory.reservations import hold_for_paid_order
from actors.orders import service, state
from runtime.errors import Conflict


async def place_order(pool: asyncpg.Pool, data: Any) -> tuple[dict[str, Any], bool]:
    """Validate and create an order; returns (order, created)."""
    new = service.parse_new_order(data)
    async with pool.acquire() as conn:
        order_id, created = await service.create_order(conn, new, RESERVE_STOCK.as_job())
        return await service.get_order(conn, order_id), created


async def pay_order(pool: asyncpg.Pool, order_id: int) -> tuple[dict[str, Any], bool]:
    """Confirm an order's payment; returns (order, changed). Idempotent."""
    jobs = [SEND_ORDER_CONFIRMATION.as_job(order_id), ADVANCE_FULFILLMENT.as_job(order_id)]
    async with pool.acquire() as conn:
        async with conn.transaction():
            row = await service.lock_order(conn, order_id)
            if row["status"] == state.RESERVED:
                await hold_for_paid_order(conn, order_id)
            change, _ = await service.confirm_payment(conn, order_id, jobs)
        return await service.get_order(conn, order_id), change is not None


__all__ = ["Conflict", "pay_order", "place_order"]
