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
from runtime.errors import Conflict, Forbidden, NotFound


async def place_order(pool: asyncpg.Pool, data: Any,
                      for_customer: int | None = None) -> tuple[dict[str, Any], bool]:
    """Validate and create an order; returns (order, created).

    ``for_customer`` is the customer the caller acts for (``None``: a service
    or staff, which may order for anyone). An order for someone else is
    :class:`Forbidden`; an ``external_ref`` that already names another
    customer's order is a :class:`Conflict` and that order is not shown.
    """
    new = service.parse_new_order(data)
    if for_customer is not None and new.customer_id != for_customer:
        raise Forbidden("a customer may only place orders for themself")
    async with pool.acquire() as conn:
        order_id, created = await service.create_order(conn, new, RESERVE_STOCK.as_job())
        order = await service.get_order(conn, order_id)
    if for_customer is not None and order["customer_id"] != for_customer:
        raise Conflict("external_ref is already used by another order")
    return order, created


async def pay_order(pool: asyncpg.Pool, order_id: int,
                    for_customer: int | None = None) -> tuple[dict[str, Any], bool]:
    """Confirm an order's payment; returns (order, changed). Idempotent.

    With ``for_customer`` only that customer's order may be paid; anyone
    else's is :class:`NotFound`, like an order that does not exist.
    """
    jobs = [SEND_ORDER_CONFIRMATION.as_job(order_id), ADVANCE_FULFILLMENT.as_job(order_id)]
    async with pool.acquire() as conn:
        async with conn.transaction():
            row = await service.lock_order(conn, order_id)
            if for_customer is not None and row["customer_id"] != for_customer:
                raise NotFound(f"order {order_id} does not exist")
            if row["status"] == state.RESERVED:
                await hold_for_paid_order(conn, order_id)
            change, _ = await service.confirm_payment(conn, order_id, jobs)
        return await service.get_order(conn, order_id), change is not None


async def read_order(conn: asyncpg.Connection, order_id: int,
                     for_customer: int | None = None) -> dict[str, Any]:
    """The order with items and history; with ``for_customer``, only that customer's.

    Someone else's order is :class:`NotFound` with the same message as a
    missing one, so order ids cannot be probed.
    """
    order = await service.get_order(conn, order_id)
    if for_customer is not None and order["customer_id"] != for_customer:
        raise NotFound(f"order {order_id} does not exist")
    return order


__all__ = ["Conflict", "pay_order", "place_order", "read_order"]
