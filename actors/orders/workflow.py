"""The order flow as the outside world starts it: place an order, check out a cart,
confirm its payment.

This is where the concerns meet: placing an order queues the inventory
concern's reservation; checking out a cart places its order and cancels the
cart's reminder; confirming payment holds the stock for good and queues the
confirmation e-mail and the fulfilment flow, all in the same transaction as
the status change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from actors.carts import carts
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


class CartOrderPlacer:
    """Orders placed from carts: the :class:`actors.carts.carts.CartOrders` of this shop."""

    async def place(self, conn: asyncpg.Connection, customer_id: int,
                    lines: Sequence[tuple[int, int]], external_ref: str) -> int:
        """Validate the cart's lines as any order request and create the order.

        The cart is open (locked by the caller), so an order that already has
        its ``external_ref`` was not placed by this checkout: refuse it rather
        than hand over someone else's order.
        """
        new = service.parse_new_order({
            "customer_id": customer_id, "external_ref": external_ref,
            "items": [{"product_id": p, "quantity": q} for p, q in lines]})
        order_id, created = await service.create_order(conn, new, RESERVE_STOCK.as_job())
        if not created:
            raise Conflict(f"an order with external_ref {external_ref!r} exists already")
        return order_id

    async def find(self, conn: asyncpg.Connection, external_ref: str) -> int | None:
        """The order placed with ``external_ref``, if any."""
        found = await conn.fetchval("SELECT id FROM orders WHERE external_ref = $1", external_ref)
        return None if found is None else int(found)


async def checkout_cart(pool: asyncpg.Pool, cart_id: int,
                        may_own: carts.MayOwn) -> tuple[dict[str, Any], bool]:
    """Place the order of an open cart and cancel its reminder; returns (order, created).

    Idempotent: checking out a cart that already is returns its order.
    """
    async with pool.acquire() as conn:
        order_id, created = await carts.check_out(conn, cart_id, may_own, CartOrderPlacer())
        return await service.get_order(conn, order_id), created


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


__all__ = ["CartOrderPlacer", "Conflict", "checkout_cart", "pay_order", "place_order",
           "read_order"]
