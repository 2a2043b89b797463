"""Cart changes as plain functions over a connection.

Every change to a cart (an item set or removed, the cart abandoned or checked
out) commits together with its announcement: a ``cart.changed`` outbox event
on the ``carts`` channel carrying the ``CART_CHANGED`` job, which
(re)schedules or cancels the cart's reminder (``actors/carts/reminders.py``).
A rollback announces nothing; a committed change is always announced.

Checking out turns the cart into an order through the collaborator the caller
passes (:class:`CartOrders`, implemented by the orders workflow), and in the
same transaction marks the cart ``checked_out`` and cancels its reminder, so
an order placed from a cart can never be followed by that cart's reminder.

Ownership is the caller's rule, passed in as ``may_own(customer_id)``: a cart
the caller may not see is "not found" (ids leak nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import asyncpg

from actors.carts.messages import CART_CHANGED, CARTS_CHANNEL, EVENT_CART_CHANGED
from actors.carts.reminders import cancel_reminder
from runtime.errors import Conflict, NotFound
from runtime.outbox import emit

OPEN, CHECKED_OUT, ABANDONED = "open", "checked_out", "abandoned"
CART_COLUMNS = "id, customer_id, status, created_at, updated_at"
_ITEMS_SQL = """
    SELECT ci.product_id, p.name, ci.quantity, p.price_cents AS unit_price_cents,
           ci.quantity::bigint * p.price_cents AS line_total_cents
      FROM cart_items ci JOIN products p ON p.id = ci.product_id
     WHERE ci.cart_id = $1 ORDER BY ci.product_id"""

# "May the caller act on a cart owned by this customer (None: an anonymous cart)?"
MayOwn = Callable[[Any], bool]


class CartOrders(Protocol):
    """How a checkout becomes an order (the orders workflow implements it)."""

    async def place(self, conn: asyncpg.Connection, customer_id: int,
                    lines: Sequence[tuple[int, int]], external_ref: str) -> int:
        """Create the order for ``lines`` ((product_id, quantity)) in the caller's transaction."""

    async def find(self, conn: asyncpg.Connection, external_ref: str) -> int | None:
        """The id of the order placed with ``external_ref``, if there is one."""


def checkout_ref(cart_id: int) -> str:
    """The order ``external_ref`` of a cart's checkout: one order per cart, ever."""
    return f"cart:{cart_id}"


async def cart_view(conn: asyncpg.Connection, cart: asyncpg.Record) -> dict[str, Any]:
    """A cart with its items and total, as JSON-ready data."""
    items = [dict(r) for r in await conn.fetch(_ITEMS_SQL, cart["id"])]
    return {**dict(cart), "items": items,
            "total_cents": sum(i["line_total_cents"] for i in items)}


async def load_cart(conn: asyncpg.Connection, cart_id: int, may_own: MayOwn,
                    lock: bool = False) -> asyncpg.Record:
    """The cart row (locked for the caller's transaction with ``lock``); NotFound if not visible."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {CART_COLUMNS} FROM carts WHERE id = $1" + (" FOR UPDATE" if lock else ""),
        cart_id)
    if row is None or not may_own(row["customer_id"]):
        raise NotFound(f"no cart {cart_id}")
    return row


async def list_carts(conn: asyncpg.Connection, customer_id: int,
                     limit: int) -> list[dict[str, Any]]:
    """A customer's carts, newest first."""
    rows = await conn.fetch(
        f"SELECT {CART_COLUMNS} FROM carts WHERE customer_id = $1 ORDER BY id DESC LIMIT $2",
        customer_id, limit)
    return [await cart_view(conn, r) for r in rows]


async def create_cart(conn: asyncpg.Connection, customer_id: int) -> dict[str, Any]:
    """Open an empty cart (nothing to remind about yet, so nothing is announced)."""
    row = await conn.fetchrow(
        f"INSERT INTO carts (customer_id) VALUES ($1) RETURNING {CART_COLUMNS}", customer_id)
    return await cart_view(conn, row)


async def set_item(conn: asyncpg.Connection, cart_id: int, product_id: int, quantity: int,
                   may_own: MayOwn) -> dict[str, Any]:
    """Set a product's quantity in an open cart (adds it if absent); one transaction."""
    async with conn.transaction():
        await _open_cart(conn, cart_id, may_own)
        if await conn.fetchval("SELECT 1 FROM products WHERE id = $1", product_id) is None:
            raise NotFound(f"no product {product_id}")
        await conn.execute(
            "INSERT INTO cart_items (cart_id, product_id, quantity) VALUES ($1, $2, $3) "
            "ON CONFLICT (cart_id, product_id) DO UPDATE SET quantity = EXCLUDED.quantity",
            cart_id, product_id, quantity)
        return await cart_view(conn, await _changed(conn, cart_id, "item_set"))


async def remove_item(conn: asyncpg.Connection, cart_id: int, product_id: int,
                      may_own: MayOwn) -> dict[str, Any]:
    """Remove a product from an open cart (an absent one is a no-op, still a change)."""
    async with conn.transaction():
        await _open_cart(conn, cart_id, may_own)
        await conn.execute("DELETE FROM cart_items WHERE cart_id = $1 AND product_id = $2",
                           cart_id, product_id)
        return await cart_view(conn, await _changed(conn, cart_id, "item_removed"))


async def abandon(conn: asyncpg.Connection, cart_id: int, may_own: MayOwn) -> None:
    """Abandon a cart (idempotent); a checked-out cart cannot be abandoned."""
    async with conn.transaction():
        cart = await load_cart(conn, cart_id, may_own, lock=True)
        if cart["status"] == CHECKED_OUT:
            raise Conflict(f"cart {cart_id} is checked out")
        if cart["status"] == ABANDONED:
            return
        await conn.execute("UPDATE carts SET status = 'abandoned' WHERE id = $1", cart_id)
        await _changed(conn, cart_id, ABANDONED)


async def check_out(conn: asyncpg.Connection, cart_id: int, may_own: MayOwn,
                    orders: CartOrders) -> tuple[int, bool]:
    """Turn an open cart into an order; return ``(order_id, created)``.

    One transaction: the order (through ``orders``), the cart marked
    ``checked_out``, its reminder cancelled, the change announced. Checking
    out a cart that already is returns its order and changes nothing (a
    retried request places no second order).
    """
    async with conn.transaction():
        cart = await load_cart(conn, cart_id, may_own, lock=True)
        ref = checkout_ref(cart_id)
        if cart["status"] == CHECKED_OUT:
            existing = await orders.find(conn, ref)
            if existing is None:
                raise Conflict(f"cart {cart_id} was checked out without an order")
            return existing, False
        if cart["status"] != OPEN:
            raise Conflict(f"cart {cart_id} is {cart['status']}")
        if cart["customer_id"] is None:
            raise Conflict(f"cart {cart_id} has no customer; it cannot check out")
        lines = [(r["product_id"], r["quantity"]) for r in await conn.fetch(
            "SELECT product_id, quantity FROM cart_items WHERE cart_id = $1 ORDER BY product_id",
            cart_id)]
        if not lines:
            raise Conflict(f"cart {cart_id} is empty")
        order_id = await orders.place(conn, cart["customer_id"], lines, ref)
        await conn.execute("UPDATE carts SET status = 'checked_out' WHERE id = $1", cart_id)
        await cancel_reminder(conn, cart_id, CHECKED_OUT)
        await _changed(conn, cart_id, CHECKED_OUT, order_id=order_id)
        return order_id, True


async def _open_cart(conn: asyncpg.Connection, cart_id: int, may_own: MayOwn) -> asyncpg.Record:
    cart = await load_cart(conn, cart_id, may_own, lock=True)
    if cart["status"] != OPEN:
        raise Conflict(f"cart {cart_id} is {cart['status']}")
    return cart


async def _changed(conn: asyncpg.Connection, cart_id: int, change: str,
                   **extra: Any) -> asyncpg.Record:
    """Bump the cart's version and announce the change, in the caller's transaction."""
    row: asyncpg.Record = await conn.fetchrow(
        f"UPDATE carts SET updated_at = now() WHERE id = $1 RETURNING {CART_COLUMNS}", cart_id)
    await emit(conn, CARTS_CHANNEL, EVENT_CART_CHANGED,
               {"cart_id": cart_id, "customer_id": row["customer_id"], "change": change,
                "status": row["status"], "cart_updated_at": row["updated_at"].isoformat(),
                **extra},
               job=CART_CHANGED.as_job(cart_id))
    return row
