"""Order services: create an order, move its status, confirm its payment, read it.

Every function takes the connection it works on; callers own the transaction
boundaries except where a function says it opens one. Each status change
writes its history row and its outbox event in the caller's transaction, so
a change and its consequences commit together or not at all.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from actors.orders import state
from actors.orders.messages import CHANNEL_ORDER_STATUS, EVENT_STATUS_CHANGED
from runtime import outbox
from runtime.errors import Conflict, NotFound, ValidationError
from runtime.fields import reject_unknown_fields
from runtime.text import storable_text

# An order carries at most this many distinct products (a guard against abuse).
MAX_ORDER_LINES = 100
# No single line may ask for more than this many units.
MAX_LINE_QUANTITY = 10_000
MAX_EXTERNAL_REF_LEN = 100
# The fields of an order request; any other is refused (runtime.fields).
ORDER_FIELDS = ("customer_id", "items", "external_ref")
# No order may total more than this (R$ 100 million): a sanity bound far above any real
# basket, and above integer's range, which is why orders.total_cents is bigint (0013).
MAX_ORDER_TOTAL_CENTS = 10_000_000_000


@dataclass(frozen=True)
class OrderLine:
    product_id: int
    quantity: int


@dataclass(frozen=True)
class NewOrder:
    """A validated order request."""

    customer_id: int
    lines: tuple[OrderLine, ...]
    external_ref: str | None = None


@dataclass(frozen=True)
class StatusChange:
    """One committed (or about to be committed) status move."""

    order_id: int
    customer_id: int
    from_status: str
    to_status: str
    reason: str | None
    correlation_id: uuid.UUID


def _positive_int(value: Any, field: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field} must be an integer", field)
    if value <= 0:
        raise ValidationError(f"{field} must be positive, got {value}", field)
    if value > maximum:
        raise ValidationError(f"{field} must be at most {maximum}, got {value}", field)
    return value


def parse_new_order(data: Any) -> NewOrder:
    """Validate an order request (already-decoded JSON); raise ValidationError with the field."""
    if not isinstance(data, dict):
        raise ValidationError("the body must be a JSON object")
    reject_unknown_fields(data, ORDER_FIELDS)
    if "customer_id" not in data:
        raise ValidationError("customer_id is required", "customer_id")
    customer_id = _positive_int(data["customer_id"], "customer_id", 2**62)
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise ValidationError("items must be a non-empty list", "items")
    if len(items) > MAX_ORDER_LINES:
        raise ValidationError(f"at most {MAX_ORDER_LINES} items per order", "items")
    lines: list[OrderLine] = []
    seen: set[int] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"product_id", "quantity"}:
            raise ValidationError(
                f"items[{i}] must be an object with exactly product_id and quantity", f"items[{i}]"
            )
        pid = _positive_int(item["product_id"], f"items[{i}].product_id", 2**62)
        qty = _positive_int(item["quantity"], f"items[{i}].quantity", MAX_LINE_QUANTITY)
        if pid in seen:
            raise ValidationError(f"product {pid} appears twice; send one line per product",
                                  f"items[{i}].product_id")
        seen.add(pid)
        lines.append(OrderLine(pid, qty))
    ref = data.get("external_ref")
    if ref is not None:  # the client's key for the order: kept exactly as sent
        ref = storable_text(ref, "external_ref", MAX_EXTERNAL_REF_LEN, strip=False)
    return NewOrder(customer_id, tuple(lines), ref)


async def create_order(
    conn: asyncpg.Connection, order: NewOrder, reserve_job: dict[str, Any]
) -> tuple[int, bool]:
    """Create the order and queue its stock reservation, in one transaction.

    Returns ``(order_id, created)``. With an ``external_ref`` that already
    exists the existing order is returned and nothing changes (a retried
    request creates no second order). ``reserve_job`` is the outbox job that
    reserves the order's stock (built by the caller, which knows the inventory
    concern's address; ``order_id`` is appended to its args).
    """
    async with conn.transaction():
        if order.external_ref is not None:
            existing = await conn.fetchval(
                "SELECT id FROM orders WHERE external_ref = $1", order.external_ref
            )
            if existing is not None:
                return int(existing), False
        if not await conn.fetchval("SELECT 1 FROM customers WHERE id = $1", order.customer_id):
            raise ValidationError(f"unknown customer {order.customer_id}", "customer_id")
        ids = [line.product_id for line in order.lines]
        prices = dict(await conn.fetch("SELECT id, price_cents FROM products WHERE id = ANY($1)", ids))
        missing = sorted(set(ids) - set(prices))
        if missing:
            raise ValidationError(f"unknown product(s): {', '.join(map(str, missing))}", "items")
        total = sum(prices[line.product_id] * line.quantity for line in order.lines)
        if total > MAX_ORDER_TOTAL_CENTS:
            raise ValidationError(f"the order totals {total} cents; at most "
                                  f"{MAX_ORDER_TOTAL_CENTS} cents per order", "items")
        row = await conn.fetchrow(
            """INSERT INTO orders (customer_id, total_cents, external_ref)
               VALUES ($1, $2, $3)
               ON CONFLICT (external_ref) DO NOTHING
               RETURNING id, correlation_id""",
            order.customer_id, total, order.external_ref,
        )
        if row is None:  # a concurrent request with the same external_ref won
            existing = await conn.fetchval("SELECT id FROM orders WHERE external_ref = $1",
                                           order.external_ref)
            return int(existing), False
        order_id = int(row["id"])
        await conn.executemany(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) VALUES ($1, $2, $3, $4)",
            [(order_id, line.product_id, line.quantity, prices[line.product_id]) for line in order.lines],
        )
        await conn.execute(
            "INSERT INTO order_status_history (order_id, from_status, to_status) VALUES ($1, NULL, $2)",
            order_id, state.PENDING,
        )
        job = {**reserve_job, "args": [*reserve_job.get("args", []), order_id]}
        await outbox.emit(
            conn, CHANNEL_ORDER_STATUS, EVENT_STATUS_CHANGED,
            _event_payload(order_id, order.customer_id, None, state.PENDING, None),
            job=job, correlation_id=row["correlation_id"],
        )
        return order_id, True


def _event_payload(order_id: int, customer_id: int, from_status: str | None,
                   to_status: str, reason: str | None) -> dict[str, Any]:
    return {"order_id": order_id, "customer_id": customer_id, "from_status": from_status,
            "to_status": to_status, "reason": reason}


async def lock_order(conn: asyncpg.Connection, order_id: int) -> asyncpg.Record:
    """The order row, locked for the caller's transaction; NotFound if absent."""
    row = await conn.fetchrow(
        "SELECT id, customer_id, status, correlation_id FROM orders WHERE id = $1 FOR UPDATE", order_id
    )
    if row is None:
        raise NotFound(f"order {order_id} does not exist")
    return row


async def transition(
    conn: asyncpg.Connection,
    order_id: int,
    to_status: str,
    reason: str | None = None,
    jobs: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
) -> StatusChange:
    """Move an order to ``to_status`` if the state machine allows it from where it is.

    Must run inside the caller's transaction: locks the order, checks the
    move, updates it, writes the history row and the outbox event (with the
    first of ``jobs`` riding on it and any others as extra outbox rows).
    Raises :class:`InvalidTransition` if the move is not allowed.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("transition must run inside a transaction")
    row = await lock_order(conn, order_id)
    state.check(row["status"], to_status)
    await conn.execute(
        "UPDATE orders SET status = $2, status_reason = $3, updated_at = now() WHERE id = $1",
        order_id, to_status, reason,
    )
    await conn.execute(
        "INSERT INTO order_status_history (order_id, from_status, to_status, reason) VALUES ($1, $2, $3, $4)",
        order_id, row["status"], to_status, reason,
    )
    change = StatusChange(order_id, row["customer_id"], row["status"], to_status, reason,
                          row["correlation_id"])
    payload = _event_payload(order_id, change.customer_id, change.from_status, to_status, reason)
    first_job = jobs[0] if jobs else None
    await outbox.emit(conn, CHANNEL_ORDER_STATUS, EVENT_STATUS_CHANGED, payload,
                      job=first_job, correlation_id=change.correlation_id)
    for job in jobs[1:]:
        await outbox.emit(conn, CHANNEL_ORDER_STATUS, "order.job", {"order_id": order_id},
                          job=job, correlation_id=change.correlation_id)
    return change


async def confirm_payment(
    conn: asyncpg.Connection, order_id: int, jobs: list[dict[str, Any]]
) -> tuple[StatusChange | None, str]:
    """Mark a reserved order paid and queue what follows (e-mail, fulfilment).

    Idempotent: confirming an order that is already paid or further along
    returns ``(None, status)`` and changes nothing. Confirming an order that
    is not yet reserved, or failed, is a :class:`Conflict`.
    """
    async with conn.transaction():
        row = await lock_order(conn, order_id)
        status = row["status"]
        if status not in (state.PENDING, state.RESERVED, state.FAILED, state.CANCELLED):
            return None, status
        if status != state.RESERVED:
            raise Conflict(f"order {order_id} is {status}; payment can be confirmed once it is reserved")
        change = await transition(conn, order_id, state.PAID, jobs=jobs)
        return change, state.PAID


async def get_order(conn: asyncpg.Connection, order_id: int) -> dict[str, Any]:
    """The order with its items and status history, as plain JSON-ready data."""
    row = await conn.fetchrow(
        """SELECT id, customer_id, status, status_reason, total_cents, external_ref,
                  correlation_id, created_at, updated_at FROM orders WHERE id = $1""",
        order_id,
    )
    if row is None:
        raise NotFound(f"order {order_id} does not exist")
    items = await conn.fetch(
        "SELECT product_id, quantity, unit_price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id",
        order_id,
    )
    history = await conn.fetch(
        "SELECT from_status, to_status, reason, at FROM order_status_history WHERE order_id = $1 ORDER BY id",
        order_id,
    )
    return {
        **{k: _jsonable(v) for k, v in dict(row).items()},
        "items": [dict(i) for i in items],
        "history": [{k: _jsonable(v) for k, v in dict(h).items()} for h in history],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
