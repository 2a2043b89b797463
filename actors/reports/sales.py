"""The daily sales report: computed for the previous local day, stored, handed to the emailer.

A "day" is a calendar day of the shop's time zone, from its first instant to
the next day's (23 or 25 hours long on a DST change; it starts at 01:00 where
midnight was skipped). Figures, over orders *created* that day:

- ``orders_count``: every order; ``failed_orders`` / ``cancelled_orders``;
- ``completed_orders``: orders that were paid (status paid or any later step);
- ``revenue_cents``: the total of the completed orders;
- ``average_basket_cents``: revenue / completed orders, rounded half up;
- ``top_products``: best sellers among completed orders, by units.

Storing is an upsert, so recomputing a day replaces its figures. Handing
the report to the emailer happens once per day: the row's
``handed_off_at`` is set in the same transaction as the outbox row that
carries the ``send_daily_report(report_date_iso)`` job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from actors.emailer.messages import SEND_DAILY_REPORT
from actors.orders import state
from runtime import outbox
from runtime.scheduling.triggers import require_aware, start_of_local_day, zone_named

log = logging.getLogger(__name__)

# How many best sellers the report lists.
DEFAULT_TOP_PRODUCTS = 5
CHANNEL_JOBS = "jobs"
EVENT_REPORT_READY = "report.daily_sales_ready"


def sold_statuses() -> list[str]:
    """Paid and every status reachable from paid, except failure: what counts as a sale."""
    seen = {state.PAID}
    frontier = [state.PAID]
    while frontier:
        for nxt in state.TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return sorted(seen - {state.FAILED, state.CANCELLED})


def previous_local_day(now: datetime, zone_name: str) -> date:
    """Yesterday in ``zone_name`` as seen at ``now``."""
    return require_aware(now).astimezone(zone_named(zone_name)).date() - timedelta(days=1)


def local_day_bounds(day: date, zone_name: str) -> tuple[datetime, datetime]:
    """[start, end) of the local calendar ``day`` as UTC instants."""
    zone = zone_named(zone_name)
    return start_of_local_day(day, zone), start_of_local_day(day + timedelta(days=1), zone)


@dataclass(frozen=True)
class SalesReport:
    """One day's figures (see the module docstring for what each means)."""

    report_date: date
    timezone: str
    period_start: datetime
    period_end: datetime
    orders_count: int
    completed_orders: int
    revenue_cents: int
    average_basket_cents: int
    failed_orders: int
    cancelled_orders: int
    top_products: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """JSON-ready form (ISO dates), for the e-mail and the API."""
        return {
            "report_date": self.report_date.isoformat(), "timezone": self.timezone,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "orders_count": self.orders_count, "completed_orders": self.completed_orders,
            "revenue_cents": self.revenue_cents,
            "average_basket_cents": self.average_basket_cents,
            "failed_orders": self.failed_orders, "cancelled_orders": self.cancelled_orders,
            "top_products": self.top_products,
        }


_TOTALS = """
SELECT count(*) AS orders_count,
       count(*) FILTER (WHERE status = ANY($3::text[])) AS completed,
       coalesce(sum(total_cents) FILTER (WHERE status = ANY($3::text[])), 0) AS revenue,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled
  FROM orders
 WHERE created_at >= $1 AND created_at < $2
"""

_TOP_PRODUCTS = """
SELECT oi.product_id, p.sku, p.name, sum(oi.quantity)::bigint AS units,
       sum(oi.quantity::bigint * oi.unit_price_cents) AS revenue_cents
  FROM orders o
  JOIN order_items oi ON oi.order_id = o.id
  JOIN products p ON p.id = oi.product_id
 WHERE o.created_at >= $1 AND o.created_at < $2 AND o.status = ANY($3::text[])
 GROUP BY oi.product_id, p.sku, p.name
 ORDER BY units DESC, revenue_cents DESC, oi.product_id
 LIMIT $4
"""

_UPSERT = """
INSERT INTO daily_sales_reports (
    report_date, timezone, period_start, period_end, orders_count, completed_orders,
    revenue_cents, average_basket_cents, failed_orders, cancelled_orders, top_products,
    computed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (report_date) DO UPDATE SET
    timezone = EXCLUDED.timezone, period_start = EXCLUDED.period_start,
    period_end = EXCLUDED.period_end, orders_count = EXCLUDED.orders_count,
    completed_orders = EXCLUDED.completed_orders, revenue_cents = EXCLUDED.revenue_cents,
    average_basket_cents = EXCLUDED.average_basket_cents,
    failed_orders = EXCLUDED.failed_orders, cancelled_orders = EXCLUDED.cancelled_orders,
    top_products = EXCLUDED.top_products, computed_at = EXCLUDED.computed_at
"""


async def compute_sales_report(
    conn: asyncpg.Connection, day: date, zone_name: str, top_n: int = DEFAULT_TOP_PRODUCTS
) -> SalesReport:
    """The figures of the local ``day`` in ``zone_name`` (reads only)."""
    start, end = local_day_bounds(day, zone_name)
    sold = sold_statuses()
    totals = await conn.fetchrow(_TOTALS, start, end, sold)
    top = await conn.fetch(_TOP_PRODUCTS, start, end, sold, top_n)
    completed, revenue = int(totals["completed"]), int(totals["revenue"])
    average = (revenue * 2 + completed) // (2 * completed) if completed else 0
    return SalesReport(
        report_date=day, timezone=zone_name, period_start=start, period_end=end,
        orders_count=int(totals["orders_count"]), completed_orders=completed,
        revenue_cents=revenue, average_basket_cents=average,
        failed_orders=int(totals["failed"]), cancelled_orders=int(totals["cancelled"]),
        top_products=[
            {"product_id": r["product_id"], "sku": r["sku"], "name": r["name"],
             "units": int(r["units"]), "revenue_cents": int(r["revenue_cents"])}
            for r in top
        ],
    )


async def store_report(conn: asyncpg.Connection, report: SalesReport, now: datetime) -> None:
    """Insert or replace the stored figures of ``report.report_date``."""
    await conn.execute(
        _UPSERT, report.report_date, report.timezone, report.period_start, report.period_end,
        report.orders_count, report.completed_orders, report.revenue_cents,
        report.average_basket_cents, report.failed_orders, report.cancelled_orders,
        report.top_products, now,
    )


async def _hand_off(conn: asyncpg.Connection, day: date, now: datetime) -> bool:
    """Queue the e-mail job for ``day`` through the outbox, unless it was already queued."""
    claimed = await conn.fetchval(
        """UPDATE daily_sales_reports SET handed_off_at = $2
            WHERE report_date = $1 AND handed_off_at IS NULL RETURNING report_date""",
        day, now,
    )
    if claimed is None:
        return False
    iso = day.isoformat()
    await outbox.emit(conn, CHANNEL_JOBS, EVENT_REPORT_READY, {"report_date": iso},
                      job=SEND_DAILY_REPORT.as_job(iso))
    return True


async def build_daily_sales_report(
    pool: asyncpg.Pool, now: datetime, zone_name: str, hand_off: bool = False,
    top_n: int = DEFAULT_TOP_PRODUCTS,
) -> SalesReport:
    """Compute and store the report of the day before ``now`` (local); optionally hand it off.

    One transaction, so a stored report and its hand-off commit together.
    """
    day = previous_local_day(now, zone_name)
    async with pool.acquire() as conn, conn.transaction():
        report = await compute_sales_report(conn, day, zone_name, top_n)
        await store_report(conn, report, now)
        handed = await _hand_off(conn, day, now) if hand_off else False
    log.info("daily sales report for %s: %d order(s), revenue %d cents%s", day.isoformat(),
             report.orders_count, report.revenue_cents, ", e-mail queued" if handed else "",
             extra={"report_date": day.isoformat(), "orders": report.orders_count,
                    "revenue_cents": report.revenue_cents})
    return report


async def send_daily_report(pool: asyncpg.Pool, now: datetime, zone_name: str) -> bool:
    """The morning e-mail: hand yesterday's report to the emailer, once.

    Computes the report first if the earlier job did not (it failed, or the
    scheduler was down), so the team always gets its e-mail. Returns whether
    this call queued the e-mail.
    """
    day = previous_local_day(now, zone_name)
    async with pool.acquire() as conn, conn.transaction():
        exists = await conn.fetchval(
            "SELECT 1 FROM daily_sales_reports WHERE report_date = $1 FOR UPDATE", day
        )
        if not exists:
            await store_report(conn, await compute_sales_report(conn, day, zone_name), now)
        handed = await _hand_off(conn, day, now)
    log.info("daily report for %s %s", day.isoformat(),
             "handed to the emailer" if handed else "was already handed to the emailer",
             extra={"report_date": day.isoformat()})
    return handed


async def load_report(conn: asyncpg.Connection, day: date) -> dict[str, Any] | None:
    """A stored report as JSON-ready data (for the emailer and the API), or ``None``."""
    row = await conn.fetchrow("SELECT * FROM daily_sales_reports WHERE report_date = $1", day)
    if row is None:
        return None
    out = dict(row)
    for key, value in out.items():
        if isinstance(value, (date, datetime)):
            out[key] = value.isoformat()
    return out
