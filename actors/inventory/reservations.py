"""Stock reservation rules.

Invariant (also a CHECK constraint): ``0 <= reserved_quantity <= quantity``.
Reserving is one transaction over all of an order's lines: all are reserved
or none. It is idempotent per order: the order row is locked and only a
``pending`` order is reserved, so a retried or redelivered message reserves
nothing twice (the unique (order_id, product_id) key is the backstop).
Inventory rows are locked in product-id order so concurrent orders never
deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from actors.inventory.messages import CHANNEL_STOCK, EVENT_STOCK_UPDATED
from actors.orders import service as orders
from actors.orders import state
from runtime import outbox


@dataclass(frozen=True)
class ReservationOutcome:
    """What happened to one order's reservation request."""

    order_id: int
    status: str  # the order's status afterwards
    reserved: bool  # stock is held for the order (now or from an earlier run)
    changed: bool  # this call changed anything
    reason: str | None = None


def _shortage_reason(short: list[tuple[int, int, int]]) -> str:
    parts = [f"product {pid} (wanted {want}, available {have})" for pid, want, have in short]
    return "insufficient stock: " + "; ".join(parts)


async def _emit_stock(conn: asyncpg.Connection, rows: list[asyncpg.Record], correlation_id: Any) -> None:
    for r in rows:
        await outbox.emit(
            conn, CHANNEL_STOCK, EVENT_STOCK_UPDATED,
            {"product_id": r["product_id"], "quantity": r["quantity"],
             "reserved_quantity": r["reserved_quantity"]},
            correlation_id=correlation_id,
        )


async def reserve_for_order(
    conn: asyncpg.Connection, order_id: int, ttl_s: int
) -> ReservationOutcome:
    """Reserve all of a pending order's lines, or fail the order with the reason."""
    async with conn.transaction():
        order = await orders.lock_order(conn, order_id)
        if order["status"] != state.PENDING:
            held = order["status"] not in (state.FAILED, state.CANCELLED)
            return ReservationOutcome(order_id, order["status"], held, changed=False)
        lines = await conn.fetch(
            "SELECT product_id, quantity FROM order_items WHERE order_id = $1 ORDER BY product_id",
            order_id,
        )
        wanted = {r["product_id"]: r["quantity"] for r in lines}
        stock = await conn.fetch(
            """SELECT product_id, quantity - reserved_quantity AS available FROM inventory
               WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE""",
            list(wanted),
        )
        available = {r["product_id"]: r["available"] for r in stock}
        short = [(pid, q, available.get(pid, 0)) for pid, q in wanted.items() if available.get(pid, 0) < q]
        if short:
            reason = _shortage_reason(short)
            await orders.transition(conn, order_id, state.FAILED, reason)
            return ReservationOutcome(order_id, state.FAILED, False, True, reason)
        pids, qtys = list(wanted), list(wanted.values())
        updated = await conn.fetch(
            """UPDATE inventory i SET reserved_quantity = i.reserved_quantity + u.q, updated_at = now()
               FROM unnest($1::bigint[], $2::int[]) AS u(pid, q)
               WHERE i.product_id = u.pid
               RETURNING i.product_id, i.quantity, i.reserved_quantity""",
            pids, qtys,
        )
        await conn.execute(
            """INSERT INTO inventory_reservations (order_id, product_id, quantity, expires_at)
               SELECT $1, u.pid, u.q, now() + $4::interval FROM unnest($2::bigint[], $3::int[]) AS u(pid, q)
               ON CONFLICT (order_id, product_id) DO NOTHING""",
            order_id, pids, qtys, timedelta(seconds=ttl_s),
        )
        await _emit_stock(conn, updated, order["correlation_id"])
        await orders.transition(conn, order_id, state.RESERVED)
        return ReservationOutcome(order_id, state.RESERVED, True, True)


async def hold_for_paid_order(conn: asyncpg.Connection, order_id: int) -> None:
    """A paid order's reservations no longer expire (inside the payment transaction)."""
    await conn.execute(
        "UPDATE inventory_reservations SET expires_at = 'infinity' WHERE order_id = $1", order_id
    )


async def allocate_for_order(conn: asyncpg.Connection, order_id: int, correlation_id: Any) -> int:
    """Turn an order's reservations into shipped-out stock, in the caller's transaction.

    Deletes the reservations, takes their quantities off both ``quantity``
    and ``reserved_quantity`` and records them in ``inventory_allocations``,
    so a later failure knows exactly what to give back
    (:func:`release_order_stock`). Returns the number of lines allocated; 0
    means they were already allocated (a retry), which is fine.
    """
    updated = await conn.fetch(
        """WITH gone AS (
               DELETE FROM inventory_reservations WHERE order_id = $1
               RETURNING product_id, quantity
           ), kept AS (
               INSERT INTO inventory_allocations (order_id, product_id, quantity)
               SELECT $1, product_id, quantity FROM gone
               ON CONFLICT (order_id, product_id) DO NOTHING
           )
           UPDATE inventory i
              SET quantity = i.quantity - g.quantity,
                  reserved_quantity = i.reserved_quantity - g.quantity,
                  updated_at = now()
             FROM gone g
            WHERE i.product_id = g.product_id
        RETURNING i.product_id, i.quantity, i.reserved_quantity""",
        order_id,
    )
    await _emit_stock(conn, updated, correlation_id)
    return len(updated)


# $1 order id. One statement: free the order's reservations (reserved_quantity
# back) and give its unreleased allocations back (quantity back), summed per
# product and applied under row locks taken in product order, like every other
# stock change, so it never deadlocks with them.
_RELEASE_ORDER_STOCK = """
WITH held AS (
    DELETE FROM inventory_reservations WHERE order_id = $1
    RETURNING product_id, quantity
), allocated AS (
    UPDATE inventory_allocations SET released_at = now()
     WHERE order_id = $1 AND released_at IS NULL
    RETURNING product_id, quantity
), per_product AS (
    SELECT product_id, sum(reserved)::integer AS reserved, sum(allocated)::integer AS allocated
      FROM (SELECT product_id, quantity AS reserved, 0 AS allocated FROM held
            UNION ALL
            SELECT product_id, 0, quantity FROM allocated) AS lines
     GROUP BY product_id
), locked AS (
    SELECT product_id FROM inventory
     WHERE product_id IN (SELECT product_id FROM per_product)
     ORDER BY product_id
       FOR UPDATE
)
UPDATE inventory i
   SET quantity = i.quantity + p.allocated,
       reserved_quantity = GREATEST(i.reserved_quantity - p.reserved, 0),
       updated_at = now()
  FROM per_product p JOIN locked l USING (product_id)
 WHERE i.product_id = p.product_id
RETURNING i.product_id, i.quantity, i.reserved_quantity
"""


async def release_order_stock(conn: asyncpg.Connection, order_id: int,
                              correlation_id: Any) -> int:
    """Give back every unit an order that will not ship holds, in the caller's transaction.

    Its reservations are deleted and leave ``reserved_quantity``; what its
    allocation took off ``quantity`` goes back on, and the allocation rows
    are marked released. Each product touched gets a ``stock-updated``
    outbox event. Quantities only grow and reservations only shrink, so
    ``0 <= reserved_quantity <= quantity`` holds. Idempotent: a second call
    finds nothing left to give back and changes nothing. Returns the number
    of products touched.
    """
    updated = await conn.fetch(_RELEASE_ORDER_STOCK, order_id)
    await _emit_stock(conn, updated, correlation_id)
    return len(updated)
