"""Expired anonymous carts: deleted with their items in one statement."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

# Both deletes in one statement: the carts, and their items explicitly (so they are
# counted; the ON DELETE CASCADE would find nothing left). A cart touched after the
# cut-off, even while this runs, is re-checked by PostgreSQL and kept.
_DELETE_EXPIRED = """
WITH gone AS (
    DELETE FROM carts
     WHERE customer_id IS NULL AND updated_at < $1
    RETURNING id
), items AS (
    DELETE FROM cart_items WHERE cart_id IN (SELECT id FROM gone)
    RETURNING quantity
)
SELECT (SELECT count(*) FROM gone) AS carts, (SELECT count(*) FROM items) AS items
"""


@dataclass(frozen=True)
class CartCleanup:
    """How many anonymous carts (and their item lines) were deleted."""

    carts: int
    items: int


async def delete_expired_carts(pool: asyncpg.Pool, now: datetime, max_age_s: int) -> CartCleanup:
    """Delete anonymous carts not updated for ``max_age_s`` before ``now``; log the counts."""
    cutoff = now - timedelta(seconds=max_age_s)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(_DELETE_EXPIRED, cutoff)
    result = CartCleanup(carts=int(row["carts"]), items=int(row["items"]))
    log.info("deleted %d expired anonymous cart(s) with %d item line(s)", result.carts,
             result.items, extra={"carts_deleted": result.carts, "cart_items_deleted": result.items,
                                  "cutoff": cutoff.isoformat()})
    return result
