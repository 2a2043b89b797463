"""Expired stock reservations, released in ONE atomic statement.

One SQL statement (a chain of data-modifying CTEs) does all of it, so a
reservation is either released with everything that follows from it, or
none of it happened:

1. delete the expired reservations (``FOR UPDATE SKIP LOCKED``: a second
   run at the same time takes other rows or none, never the same ones);
2. give their quantities back to ``inventory.reserved_quantity``, summed per
   product and floored at zero (a concurrent run's update to the same row is
   re-read by PostgreSQL before this one applies, so the sums add up);
3. cancel each affected order that is still ``reserved`` or ``pending``
   (re-checked under the row lock, so two runs cancel an order once), with
   its ``order_status_history`` row and an ``order-status-changed`` outbox row;
4. write a ``stock-updated`` outbox row per product touched.

The outbox relay is woken with the same NOTIFY ``runtime.outbox.emit`` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from actors.inventory.messages import CHANNEL_STOCK, EVENT_STOCK_UPDATED
from actors.orders import state
from actors.orders.messages import CHANNEL_ORDER_STATUS, EVENT_STATUS_CHANGED
from runtime.errors import TransientJobError
from runtime.outbox import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

CANCEL_REASON = "stock reservation expired"
# Reservations released per statement (one transaction each); the job loops until done.
DEFAULT_RELEASE_BATCH = 5_000
# A deadlock with a concurrent order change is retried this many times in place.
_DEADLOCK_RETRIES = 3

# $1 now, $2 batch size, $3 statuses that may be cancelled, $4 reason,
# $5/$6 order channel/event type, $7/$8 stock channel/event type.
_RELEASE_EXPIRED = """
WITH expired AS (
    DELETE FROM inventory_reservations
     WHERE id IN (SELECT id FROM inventory_reservations
                   WHERE expires_at <= $1
                   ORDER BY id
                   LIMIT $2
                     FOR UPDATE SKIP LOCKED)
    RETURNING order_id, product_id, quantity
), per_product AS (
    SELECT product_id, sum(quantity)::integer AS quantity FROM expired GROUP BY product_id
), locked_stock AS (
    -- lock inventory rows in product order, so concurrent runs never deadlock on them
    SELECT product_id FROM inventory
     WHERE product_id IN (SELECT product_id FROM per_product)
     ORDER BY product_id
       FOR UPDATE
), stock AS (
    UPDATE inventory i
       SET reserved_quantity = GREATEST(i.reserved_quantity - p.quantity, 0), updated_at = $1
      FROM per_product p JOIN locked_stock l USING (product_id)
     WHERE i.product_id = p.product_id
    RETURNING i.product_id, i.quantity, i.reserved_quantity
), candidates AS (
    SELECT o.id, o.status FROM orders o
     WHERE o.id IN (SELECT order_id FROM expired) AND o.status = ANY($3::text[])
     ORDER BY o.id
       FOR UPDATE
), cancelled AS (
    UPDATE orders o
       SET status = 'cancelled', status_reason = $4, updated_at = $1
      FROM candidates c
     WHERE o.id = c.id
    RETURNING o.id, o.customer_id, c.status AS from_status, o.correlation_id
), history AS (
    INSERT INTO order_status_history (order_id, from_status, to_status, reason, at)
    SELECT id, from_status, 'cancelled', $4, $1 FROM cancelled
    RETURNING order_id
), order_events AS (
    INSERT INTO outbox (channel, event_type, payload, correlation_id, created_at)
    SELECT $5, $6,
           jsonb_build_object('order_id', id, 'customer_id', customer_id,
                              'from_status', from_status, 'to_status', 'cancelled',
                              'reason', $4::text),
           correlation_id, $1
      FROM cancelled
    RETURNING id
), stock_events AS (
    INSERT INTO outbox (channel, event_type, payload, created_at)
    SELECT $7, $8,
           jsonb_build_object('product_id', product_id, 'quantity', quantity,
                              'reserved_quantity', reserved_quantity),
           $1
      FROM stock
    RETURNING id
)
SELECT (SELECT count(*) FROM expired) AS reservations,
       (SELECT coalesce(sum(quantity), 0) FROM expired) AS units,
       (SELECT count(*) FROM stock) AS products,
       (SELECT count(*) FROM cancelled) AS orders_cancelled,
       (SELECT count(*) FROM history) + (SELECT count(*) FROM order_events)
         + (SELECT count(*) FROM stock_events) AS rows_written
"""


@dataclass(frozen=True)
class ReleaseOutcome:
    """What one release run did, summed over its batches."""

    reservations: int = 0
    units: int = 0
    products: int = 0
    orders_cancelled: int = 0

    def __add__(self, other: ReleaseOutcome) -> ReleaseOutcome:
        return ReleaseOutcome(self.reservations + other.reservations, self.units + other.units,
                              self.products + other.products,
                              self.orders_cancelled + other.orders_cancelled)


async def _release_batch(conn: asyncpg.Connection, now: datetime, batch: int) -> ReleaseOutcome:
    cancellable = sorted(state.allowed_from(state.CANCELLED) & {state.RESERVED, state.PENDING})
    async with conn.transaction():
        row = await conn.fetchrow(
            _RELEASE_EXPIRED, now, batch, cancellable, CANCEL_REASON,
            CHANNEL_ORDER_STATUS, EVENT_STATUS_CHANGED, CHANNEL_STOCK, EVENT_STOCK_UPDATED,
        )
        if row["reservations"]:
            await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return ReleaseOutcome(int(row["reservations"]), int(row["units"]), int(row["products"]),
                          int(row["orders_cancelled"]))


async def release_expired_reservations(
    pool: asyncpg.Pool, now: datetime, batch: int = DEFAULT_RELEASE_BATCH,
    between_batches: Callable[[ReleaseOutcome], Awaitable[None]] | None = None,
) -> ReleaseOutcome:
    """Release every reservation expired at ``now``, ``batch`` per atomic statement.

    Safe to run concurrently with itself and with order changes. A deadlock
    with an order transaction (PostgreSQL aborts one side) is retried here a
    few times, then raised as :class:`TransientJobError` so the job retries.
    ``between_batches(total so far)`` is awaited after each full batch, before
    the next: the job reports its progress there and may stop (an exception
    ends the run; the batches already released stay released).
    """
    total = ReleaseOutcome()
    async with pool.acquire() as conn:
        while True:
            outcome = await _with_deadlock_retry(conn, now, batch)
            total = total + outcome
            if outcome.reservations < batch:
                break
            if between_batches is not None:
                await between_batches(total)
    log.info("released %d expired reservation(s) (%d unit(s) over %d product(s)); "
             "cancelled %d order(s)", total.reservations, total.units, total.products,
             total.orders_cancelled,
             extra={"reservations_released": total.reservations, "units_released": total.units,
                    "orders_cancelled": total.orders_cancelled})
    return total


async def _with_deadlock_retry(conn: asyncpg.Connection, now: datetime,
                               batch: int) -> ReleaseOutcome:
    for attempt in range(1, _DEADLOCK_RETRIES + 1):
        try:
            return await _release_batch(conn, now, batch)
        except asyncpg.DeadlockDetectedError as exc:
            log.warning("reservation release hit a deadlock (attempt %d): %s", attempt, exc)
            last = exc
    raise TransientJobError(f"reservation release deadlocked {_DEADLOCK_RETRIES} times") from last
