"""Replay real CDNOW orders through the running runtime, as an outside client would.

Orders are POSTed to the HTTP API in date order with time compressed
(``day_s`` seconds of replay per day of data), with a staff token as the
shop's checkout service would send (the orders endpoints refuse calls
without one). The driver follows the order-status-changed stream: when an order is reserved it confirms the
payment (as the checkout would); it waits until every order has an outcome
(ready_to_ship, or failed with a reason), then prints a summary measured from
the database. Re-running the replay is safe: orders carry their CDNOW line as
``external_ref``, so the API returns the existing order instead of a new one;
the summary then tells those orders apart (created before this run) and
measures throughput and latency on the orders this run created only.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from tqdm import tqdm

from actors.demo.catalog import CdnowOrder, basket, generate_products
from actors.orders import state
from actors.orders.messages import CHANNEL_ORDER_STATUS, EVENT_STATUS_CHANGED
from runtime.outbox import stream_key

# Orders in flight to the API at once.
HTTP_CONCURRENCY = 16
# How often the driver re-reads order states from PostgreSQL as a safety net.
RECONCILE_EVERY_S = 1.0
# How long the driver keeps retrying a call while the api or Redis is away.
RETRY_WINDOW_S = 90.0
DONE = frozenset({state.READY_TO_SHIP, state.FAILED, state.CANCELLED, state.SHIPPED, state.DELIVERED})


@dataclass
class ReplayState:
    """What the driver knows while it runs."""

    total: int
    order_ids: dict[int, int] = field(default_factory=dict)  # order id -> CDNOW line
    paid: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    http_errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    """The replay's outcome, measured from the database.

    ``orders`` counts every order of the replay; ``earlier`` those of them that
    existed before this run began (an earlier replay created them, and the API
    answered with the existing order). Throughput and latencies cover only the
    orders this run created: an earlier run's order says nothing about this one.
    """

    orders: int
    by_status: dict[str, int]
    failures: dict[str, int]
    emails: int
    duplicate_emails: int
    reservations: int
    http_errors: dict[str, int]
    elapsed_s: float
    latencies_ms: list[float]  # created -> ready_to_ship, per order that got there
    # The fulfilment pipeline alone: payment confirmed -> ready_to_ship.
    paid_latencies_ms: list[float] = field(default_factory=list)
    pipeline_s: float = 0.0  # first payment confirmed -> last ready_to_ship
    earlier: int = 0  # orders created before this run (a re-run finds them by external_ref)

    @property
    def new_orders(self) -> int:
        """Orders this run created."""
        return self.orders - self.earlier

    @property
    def throughput(self) -> float:
        """Orders this run created, per second of the run."""
        return self.new_orders / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def pipeline_throughput(self) -> float:
        """Orders per second taken from payment confirmed to ready_to_ship."""
        return len(self.paid_latencies_ms) / self.pipeline_s if self.pipeline_s else 0.0

    def percentile(self, p: float) -> float:
        """Percentile ``p`` of created -> ready_to_ship, in ms."""
        return percentile(self.latencies_ms, p)

    def paid_percentile(self, p: float) -> float:
        """Percentile ``p`` of payment confirmed -> ready_to_ship, in ms."""
        return percentile(self.paid_latencies_ms, p)

    @property
    def complete(self) -> bool:
        open_ = sum(n for s, n in self.by_status.items() if s not in DONE)
        return open_ == 0 and not self.http_errors and self.duplicate_emails == 0

    def to_json(self) -> dict[str, Any]:
        """The figures for scripts (``--summary-json``): counts, rates, latency percentiles in ms."""
        return {
            "orders": self.orders, "earlier_orders": self.earlier,
            "by_status": self.by_status, "failures": self.failures,
            "emails": self.emails, "duplicate_emails": self.duplicate_emails,
            "reservations": self.reservations, "http_errors": self.http_errors,
            "elapsed_s": self.elapsed_s, "throughput": self.throughput,
            "latency_ms": {f"p{p}": self.percentile(p) for p in (50, 95, 99)},
            "pipeline": {"orders": len(self.paid_latencies_ms), "span_s": self.pipeline_s,
                         "throughput": self.pipeline_throughput,
                         "latency_ms": {f"p{p}": self.paid_percentile(p) for p in (50, 95, 99)}},
            "complete": self.complete,
        }

    def render(self) -> str:
        lines = [
            "", "ShopFlow replay summary",
            f"  orders            {self.orders}" + self._earlier_note(),
            "  outcomes          " + ", ".join(f"{s}={n}" for s, n in sorted(self.by_status.items())),
            f"  e-mails           {self.emails} confirmation e-mail(s), {self.duplicate_emails} duplicate(s)",
            f"  reservations      {self.reservations} order(s) had their stock reserved",
        ]
        if self.new_orders:
            lines += [
                f"  throughput        {self.throughput:.1f} orders/s over {self.elapsed_s:.1f} s",
                (f"  latency (create → ready_to_ship)  p50 {self.percentile(50):.0f} ms"
                 f"  p95 {self.percentile(95):.0f} ms  p99 {self.percentile(99):.0f} ms"),
                (f"  pipeline (paid → ready_to_ship)   {self.pipeline_throughput:.1f} orders/s"
                 f"  p50 {self.paid_percentile(50):.0f} ms  p95 {self.paid_percentile(95):.0f} ms"
                 f"  p99 {self.paid_percentile(99):.0f} ms"),
            ]
        else:
            lines.append("  throughput        none measured: this run created no order "
                         "(use a larger --limit, or a fresh var dir, to replay new ones)")
        if self.failures:
            lines.append("  failures:")
            lines += [f"    {n:5d}  {reason}" for reason, n in sorted(self.failures.items(), key=lambda kv: -kv[1])]
        if self.http_errors:
            lines.append("  HTTP errors: " + ", ".join(f"{k}×{v}" for k, v in self.http_errors.items()))
        return "\n".join(lines)

    def _earlier_note(self) -> str:
        if not self.earlier:
            return ""
        return (f" ({self.new_orders} new; {self.earlier} replayed by an earlier run, found "
                "by their external_ref: counted in outcomes and e-mails, not in the rates)")


def percentile(values: list[float], p: float) -> float:
    """Percentile ``p`` (1-99) of sorted ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def _failure_kind(reason: str | None) -> str:
    """Group reasons: 'insufficient stock: product 7 (wanted 2, available 0)' -> per product."""
    if not reason:
        return "no reason recorded"
    if reason.startswith("insufficient stock"):
        products = [p.split(" (")[0] for p in reason.removeprefix("insufficient stock: ").split("; ")]
        return "insufficient stock of " + ", ".join(products)
    return reason


class Replay:
    """Drives one replay against an api base URL, a database and the event stream."""

    def __init__(self, api_url: str, pool: asyncpg.Pool, redis: aioredis.Redis, namespace: str,
                 orders: list[CdnowOrder], day_s: float, timeout_s: float,
                 progress_to: TextIO | None = sys.stderr, *, token: str) -> None:
        """``token`` is a staff token for the API (see :func:`runtime.tokens.staff_token`)."""
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.pool = pool
        self.redis = redis
        self.stream = stream_key(namespace, CHANNEL_ORDER_STATUS)
        self.orders = orders
        self.day_s = day_s
        self.timeout_s = timeout_s
        self.progress_to = progress_to
        self.state = ReplayState(total=len(orders))
        self._payments: set[asyncio.Task[None]] = set()
        self.products = generate_products()

    async def run(self) -> Summary:
        """Replay every order and wait for every outcome (or the timeout)."""
        started = time.monotonic()
        # The database's clock, which stamps created_at: orders older than this were not ours.
        since = await self.pool.fetchval("SELECT clock_timestamp()")
        last_id = await self._stream_tail()
        bar = tqdm(total=len(self.orders), desc="orders done", unit="order", file=self.progress_to,
                   disable=self.progress_to is None, dynamic_ncols=True)
        connector = aiohttp.TCPConnector(limit=HTTP_CONCURRENCY)
        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
            sender = asyncio.create_task(self._send_all(http))
            try:
                await self._follow(http, last_id, bar, started)
            finally:
                sender.cancel()
                for task in self._payments:
                    task.cancel()
                await asyncio.gather(sender, *self._payments, return_exceptions=True)
                bar.close()
        return await self.summary(time.monotonic() - started, since)

    async def _stream_tail(self) -> str:
        last: Any = await self.redis.xrevrange(self.stream, count=1)
        return str(last[0][0].decode()) if last else "0-0"

    async def _send_all(self, http: aiohttp.ClientSession) -> None:
        first_day = self.orders[0].day if self.orders else None
        t0 = time.monotonic()
        sem = asyncio.Semaphore(HTTP_CONCURRENCY)
        tasks = []
        for order in self.orders:
            assert first_day is not None
            due = t0 + (order.day - first_day).days * self.day_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()
            tasks.append(asyncio.create_task(self._send_one(http, order, sem)))
        await asyncio.gather(*tasks)

    async def _post(self, http: aiohttp.ClientSession, path: str,
                    body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """POST with retries while the api is away (restart, crash): both calls are idempotent."""
        deadline = time.monotonic() + RETRY_WINDOW_S
        delay_s = 0.1
        while True:
            try:
                async with http.post(f"{self.api_url}{path}", json=body) as resp:
                    if resp.status < 500 or time.monotonic() > deadline:
                        return resp.status, await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)

    async def _send_one(self, http: aiohttp.ClientSession, order: CdnowOrder, sem: asyncio.Semaphore) -> None:
        body = {"customer_id": order.customer_id, "external_ref": order.external_ref,
                "items": [{"product_id": p, "quantity": q} for p, q in basket(order, self.products)]}
        try:
            status, data = await self._post(http, "/api/v1/orders", body)
            if status not in (200, 201):
                self.state.http_errors[f"create {status}"] += 1
                return
            self.state.order_ids[int(data["id"])] = order.line_no
            if data["status"] == state.RESERVED:
                self._pay_soon(http, int(data["id"]))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.state.http_errors[f"create {type(exc).__name__}"] += 1
        finally:
            sem.release()

    def _pay_soon(self, http: aiohttp.ClientSession, order_id: int) -> None:
        """Confirm the payment in the background, so reading events never waits on HTTP."""
        if order_id in self.state.paid:
            return
        self.state.paid.add(order_id)
        task = asyncio.create_task(self._pay(http, order_id))
        self._payments.add(task)
        task.add_done_callback(self._payments.discard)

    async def _pay(self, http: aiohttp.ClientSession, order_id: int) -> None:
        self.state.paid.add(order_id)
        try:
            status, _ = await self._post(http, f"/api/v1/orders/{order_id}/payment")
            if status not in (200, 409):
                self.state.http_errors[f"payment {status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.state.paid.discard(order_id)
            self.state.http_errors[f"payment {type(exc).__name__}"] += 1

    async def _follow(self, http: aiohttp.ClientSession, last_id: str, bar: tqdm, started: float) -> None:
        next_reconcile = time.monotonic()
        while len(self.state.done) < self.state.total - sum(self.state.http_errors.values()):
            if time.monotonic() - started > self.timeout_s:
                return
            try:
                entries: Any = await self.redis.xread({self.stream: last_id}, count=1000, block=250)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                entries = []  # Redis is restarting: the DB reconciliation below keeps us going
                await asyncio.sleep(0.2)
            for _, items in entries or []:
                for entry_id, fields in items:
                    last_id = entry_id.decode()
                    if fields.get(b"type") == EVENT_STATUS_CHANGED.encode():
                        await self._on_event(http, json.loads(fields[b"payload"]), bar)
            if time.monotonic() >= next_reconcile:
                try:
                    await self._reconcile(http, bar)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    pass  # PostgreSQL is restarting; try again next round
                next_reconcile = time.monotonic() + RECONCILE_EVERY_S

    async def _on_event(self, http: aiohttp.ClientSession, payload: dict[str, Any], bar: tqdm) -> None:
        order_id = int(payload["order_id"])
        if order_id not in self.state.order_ids:
            return
        to = payload["to_status"]
        if to == state.RESERVED:
            self._pay_soon(http, order_id)
        elif to in DONE:
            self._mark_done(order_id, bar)

    def _mark_done(self, order_id: int, bar: tqdm) -> None:
        if order_id not in self.state.done:
            self.state.done.add(order_id)
            bar.update(1)

    async def _reconcile(self, http: aiohttp.ClientSession, bar: tqdm) -> None:
        open_ids = [i for i in self.state.order_ids if i not in self.state.done]
        if not open_ids:
            return
        rows = await self.pool.fetch("SELECT id, status FROM orders WHERE id = ANY($1)", open_ids)
        for row in rows:
            if row["status"] == state.RESERVED:
                self._pay_soon(http, row["id"])
            elif row["status"] in DONE:
                self._mark_done(row["id"], bar)

    async def summary(self, elapsed_s: float, since: datetime) -> Summary:
        """The figures of the replay's orders; rates only over those created at/after ``since``."""
        ids = list(self.state.order_ids)
        async with self.pool.acquire() as conn:
            ages = await conn.fetch(
                "SELECT id, created_at < $2 AS earlier FROM orders WHERE id = ANY($1)", ids, since)
            new_ids = [r["id"] for r in ages if not r["earlier"]]
            statuses = await conn.fetch(
                "SELECT status, status_reason FROM orders WHERE id = ANY($1)", ids)
            emails = await conn.fetchrow(
                """SELECT count(*) AS n, count(*) - count(DISTINCT order_id) AS dup FROM email_log
                   WHERE kind = 'order_confirmation' AND status = 'sent' AND order_id = ANY($1)""", ids)
            reserved = await conn.fetchval(
                """SELECT count(DISTINCT order_id) FROM order_status_history
                   WHERE to_status = 'reserved' AND order_id = ANY($1)""", ids)
            latencies = await conn.fetch(
                """SELECT extract(epoch FROM r.at - o.created_at) * 1000 AS ms
                     FROM orders o JOIN order_status_history r
                       ON r.order_id = o.id AND r.to_status = 'ready_to_ship'
                    WHERE o.id = ANY($1)""", new_ids)
            pipeline = await conn.fetch(
                """SELECT p.at AS paid_at, r.at AS ready_at,
                          extract(epoch FROM r.at - p.at) * 1000 AS ms
                     FROM order_status_history p JOIN order_status_history r
                       ON r.order_id = p.order_id AND r.to_status = 'ready_to_ship'
                    WHERE p.to_status = 'paid' AND p.order_id = ANY($1)""", new_ids)
        pipeline_s = 0.0
        if pipeline:
            span = max(r["ready_at"] for r in pipeline) - min(r["paid_at"] for r in pipeline)
            pipeline_s = span.total_seconds()
        by_status = Counter(r["status"] for r in statuses)
        failures = Counter(_failure_kind(r["status_reason"]) for r in statuses if r["status"] == state.FAILED)
        return Summary(
            orders=len(ids), by_status=dict(by_status), failures=dict(failures),
            emails=int(emails["n"]), duplicate_emails=int(emails["dup"]), reservations=int(reserved),
            http_errors=dict(self.state.http_errors), elapsed_s=elapsed_s,
            latencies_ms=sorted(float(r["ms"]) for r in latencies),
            paid_latencies_ms=sorted(float(r["ms"]) for r in pipeline), pipeline_s=pipeline_s,
            earlier=len(ages) - len(new_ids),
        )
