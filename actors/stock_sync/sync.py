"""One stock sync: warehouse quantities into ``inventory``, in batches, only what changed.

:func:`sync_once` is the business function; the daemon calls it every
interval. Per batch of external ids it makes one warehouse lookup (timeouts,
retries and the breaker live in the client) and then one transaction:

1. ONE ``UPDATE ... FROM unnest(...)`` writes the rows whose quantity changes
   and, in the same statement, returns the rows in conflict;
2. one ``stock-updated`` outbox event per changed product;
3. conflicts are recorded in ``stock_conflicts`` (one open row per product)
   and each newly opened one emits ``stock-conflict`` on the ``alerts`` channel.

**The conflict rule.** The warehouse says W, locally R units are reserved by
orders. If W >= R the warehouse wins: quantity = W. If W < R the warehouse is
not applied blindly (that would break ``reserved_quantity <= quantity`` and
take stock promised to customers): quantity becomes R (so nothing more can be
sold), a conflict is opened for staff with W and R, and it stays open until a
sync sees W >= R again, which resolves it automatically (event
``stock-conflict-resolved``). The same rule holds if a reservation lands
between lookup and write: the UPDATE computes ``GREATEST(W, reserved)`` on the
row it locks.

A failed batch changes nothing and does not stop the other batches. The sync
checks ``should_stop`` before each batch: on SIGTERM the batches in flight
finish and the rest are skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from actors.stock_sync.metrics import StockSyncMetrics
from actors.stock_sync.warehouse_client import StockAnswer, StockSource
from runtime.errors import CircuitOpen, ExternalServiceError, MalformedResponse
from runtime.outbox import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

STOCK_CHANNEL = "stock-updated"
ALERTS_CHANNEL = "alerts"
CONFLICT_RULE = "quantity set to reserved_quantity; conflict open for staff"

_APPLY_BATCH_SQL = """
WITH incoming AS (
    SELECT t.external_id, t.warehouse_qty
      FROM unnest($1::text[], $2::int[]) AS t(external_id, warehouse_qty)
), updated AS (
    UPDATE inventory i
       SET quantity = GREATEST(t.warehouse_qty, i.reserved_quantity),
           synced_at = now(), updated_at = now()
      FROM incoming t
     WHERE i.external_id = t.external_id
       AND i.quantity <> GREATEST(t.warehouse_qty, i.reserved_quantity)
    RETURNING i.product_id, i.external_id, i.quantity, i.reserved_quantity, t.warehouse_qty
)
SELECT product_id, external_id, quantity, reserved_quantity, warehouse_qty, true AS changed
  FROM updated
UNION ALL
SELECT i.product_id, i.external_id, i.quantity, i.reserved_quantity, t.warehouse_qty, false
  FROM inventory i JOIN incoming t ON t.external_id = i.external_id
 WHERE t.warehouse_qty < i.reserved_quantity
   AND NOT EXISTS (SELECT 1 FROM updated u WHERE u.product_id = i.product_id)
"""

_OPEN_CONFLICTS_SQL = """
INSERT INTO stock_conflicts (product_id, external_id, warehouse_quantity, reserved_quantity)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::int[])
ON CONFLICT (product_id) WHERE status = 'open' DO UPDATE
   SET warehouse_quantity = EXCLUDED.warehouse_quantity,
       reserved_quantity = EXCLUDED.reserved_quantity,
       last_seen_at = now()
RETURNING product_id, (xmax = 0) AS opened
"""

_RESOLVE_CONFLICTS_SQL = """
UPDATE stock_conflicts c
   SET status = 'resolved', resolved_at = now(),
       resolution = 'warehouse stock covers the reservations again'
  FROM inventory i
  JOIN unnest($1::text[], $2::int[]) AS t(external_id, warehouse_qty)
    ON t.external_id = i.external_id
 WHERE c.product_id = i.product_id AND c.status = 'open'
   AND t.warehouse_qty >= i.reserved_quantity
RETURNING c.product_id, t.warehouse_qty
"""

_EMIT_MANY_SQL = """
INSERT INTO outbox (channel, event_type, payload)
SELECT $1, $2, p::jsonb FROM unnest($3::text[]) AS p
"""


@dataclass(frozen=True)
class SyncDeps:
    """What one sync needs, passed in (tests build their own)."""

    pool: asyncpg.Pool
    warehouse: StockSource
    metrics: StockSyncMetrics | None = None
    batch_size: int = 100
    concurrency: int = 4
    # The whole run's budget; batches still running when it ends are cancelled
    # (their transactions roll back) so the next run starts on time.
    deadline_s: float | None = None
    should_stop: Callable[[], bool] = lambda: False
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class BatchResult:
    """What one batch did (or why it failed)."""

    checked: int = 0
    changed: int = 0
    conflicts_opened: int = 0
    conflicts_resolved: int = 0
    missing: int = 0
    error_kind: str | None = None
    skipped: bool = False


@dataclass(frozen=True)
class SyncReport:
    """The outcome of one :func:`sync_once` (an immutable snapshot)."""

    batches: int
    checked: int
    changed: int
    conflicts_opened: int
    conflicts_resolved: int
    missing: int
    failed_batches: int
    skipped_batches: int
    error_kinds: tuple[str, ...]
    duration_s: float

    @property
    def outcome(self) -> str:
        """ok (every batch worked), stopped, partial, or failed (no batch worked)."""
        if self.failed_batches == 0 and self.skipped_batches == 0:
            return "ok"
        if self.failed_batches == 0:
            return "stopped"
        return "failed" if self.failed_batches == self.batches else "partial"

    @property
    def succeeded(self) -> bool:
        """True when every batch was read and applied."""
        return self.outcome == "ok"


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """``items`` cut into lists of at most ``size``."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


async def linked_external_ids(pool: asyncpg.Pool) -> list[str]:
    """External ids of every product the warehouse knows, in a stable order."""
    rows = await pool.fetch(
        "SELECT external_id FROM inventory WHERE external_id IS NOT NULL ORDER BY product_id")
    return [r["external_id"] for r in rows]


async def emit_many(conn: asyncpg.Connection, channel: str, event_type: str,
                    payloads: list[dict[str, Any]]) -> None:
    """Insert outbox events in the caller's transaction with one statement, then wake the relay.

    The bulk form of :func:`runtime.outbox.emit` (same columns, same NOTIFY), so a
    batch of 100 changes costs one INSERT instead of 100.
    """
    if not payloads:
        return
    await conn.execute(_EMIT_MANY_SQL, channel, event_type, [json.dumps(p) for p in payloads])
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


async def apply_batch(conn: asyncpg.Connection, answer: StockAnswer) -> BatchResult:
    """Write one batch's answer in ONE transaction: changes, events, conflicts."""
    ids = list(answer.quantities)
    qtys = [answer.quantities[i] for i in ids]
    async with conn.transaction():
        rows = await conn.fetch(_APPLY_BATCH_SQL, ids, qtys)
        changed = [r for r in rows if r["changed"]]
        await emit_many(conn, STOCK_CHANNEL, "stock-updated", [
            {"product_id": r["product_id"], "quantity": r["quantity"],
             "reserved_quantity": r["reserved_quantity"]} for r in changed])
        in_conflict = [r for r in rows if r["warehouse_qty"] < r["reserved_quantity"]]
        opened = await _open_conflicts(conn, in_conflict)
        resolved = await conn.fetch(_RESOLVE_CONFLICTS_SQL, ids, qtys)
        await emit_many(conn, ALERTS_CHANNEL, "stock-conflict-resolved", [
            {"product_id": r["product_id"], "warehouse_quantity": r["warehouse_qty"]}
            for r in resolved])
    return BatchResult(checked=len(ids), changed=len(changed), conflicts_opened=opened,
                       conflicts_resolved=len(resolved), missing=len(answer.missing))


async def _open_conflicts(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> int:
    """Record conflicts (one open row per product); emit an alert for each new one."""
    if not rows:
        return 0
    result = await conn.fetch(
        _OPEN_CONFLICTS_SQL, [r["product_id"] for r in rows], [r["external_id"] for r in rows],
        [r["warehouse_qty"] for r in rows], [r["reserved_quantity"] for r in rows])
    new_ids = {r["product_id"] for r in result if r["opened"]}
    events = []
    for r in rows:
        if r["product_id"] not in new_ids:
            continue
        payload = {"product_id": r["product_id"], "external_id": r["external_id"],
                   "warehouse_quantity": r["warehouse_qty"],
                   "reserved_quantity": r["reserved_quantity"],
                   "applied_quantity": r["reserved_quantity"], "rule": CONFLICT_RULE}
        log.warning("stock conflict: warehouse has %d of product %d, %d reserved locally",
                    r["warehouse_qty"], r["product_id"], r["reserved_quantity"], extra=payload)
        events.append(payload)
    await emit_many(conn, ALERTS_CHANNEL, "stock-conflict", events)
    return len(events)


def error_kind(exc: BaseException) -> str:
    """The metrics label for a failed batch."""
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, MalformedResponse):
        return "malformed"
    if isinstance(exc, ExternalServiceError):
        if exc.status is None and isinstance(exc.__cause__, asyncio.TimeoutError):
            return "timeout"
        return "http"
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return "database"
    return "other"


async def _run_batch(deps: SyncDeps, ids: list[str], gate: asyncio.Semaphore,
                     budget_end: float | None) -> BatchResult:
    async with gate:
        if deps.should_stop():
            return BatchResult(skipped=True)
        remaining = None if budget_end is None else max(0.0, budget_end - deps.clock())
        try:
            answer = await deps.warehouse.fetch_stock(ids, deadline_s=remaining)
            async with deps.pool.acquire() as conn:
                return await apply_batch(conn, answer)
        except Exception as exc:
            kind = error_kind(exc)
            if kind == "other":
                log.exception("stock batch failed unexpectedly (%d ids)", len(ids))
            else:
                log.warning("stock batch failed (%s, %d ids): %s", kind, len(ids), exc,
                            extra={"error_kind": kind})
            return BatchResult(error_kind=kind)


async def sync_once(deps: SyncDeps) -> SyncReport:
    """Fetch and apply stock for every linked product; never raises for a failed batch."""
    started = deps.clock()
    ids = await linked_external_ids(deps.pool)
    batches = chunks(ids, deps.batch_size)
    gate = asyncio.Semaphore(deps.concurrency)
    budget_end = None if deps.deadline_s is None else started + deps.deadline_s
    tasks = [asyncio.ensure_future(_run_batch(deps, b, gate, budget_end)) for b in batches]
    try:
        async with asyncio.timeout(deps.deadline_s):
            await asyncio.gather(*tasks, return_exceptions=True)
    except TimeoutError:
        log.warning("stock sync hit its %.1fs budget; unfinished batches cancelled", deps.deadline_s)
    results = [_result_of(t) for t in tasks]
    report = _summarise(results, deps.clock() - started)
    if deps.metrics is not None:
        record_metrics(deps.metrics, report, deps.wall_clock())
    log.info("stock sync %s: %d checked, %d changed, %d conflicts, %d failed batches in %.2fs",
             report.outcome, report.checked, report.changed, report.conflicts_opened,
             report.failed_batches, report.duration_s,
             extra={"outcome": report.outcome, "duration_s": round(report.duration_s, 3)})
    return report


def _result_of(task: asyncio.Future[BatchResult]) -> BatchResult:
    if task.cancelled():
        return BatchResult(error_kind="timeout")
    exc = task.exception()
    if exc is not None:
        return BatchResult(error_kind=error_kind(exc))
    return task.result()


def _summarise(results: list[BatchResult], duration_s: float) -> SyncReport:
    failed = [r for r in results if r.error_kind is not None]
    return SyncReport(
        batches=len(results),
        checked=sum(r.checked for r in results),
        changed=sum(r.changed for r in results),
        conflicts_opened=sum(r.conflicts_opened for r in results),
        conflicts_resolved=sum(r.conflicts_resolved for r in results),
        missing=sum(r.missing for r in results),
        failed_batches=len(failed),
        skipped_batches=sum(1 for r in results if r.skipped),
        error_kinds=tuple(r.error_kind for r in failed if r.error_kind),
        duration_s=duration_s,
    )


def record_metrics(metrics: StockSyncMetrics, report: SyncReport, now_unix_s: float) -> None:
    """Fold one report into the metrics."""
    metrics.checked.inc(report.checked)
    metrics.changed.inc(report.changed)
    metrics.conflicts.inc(report.conflicts_opened)
    metrics.errors.inc(len(report.error_kinds))
    for kind in report.error_kinds:
        metrics.batch_errors.labels(kind=kind).inc()
    metrics.runs.labels(outcome=report.outcome).inc()
    metrics.duration.observe(report.duration_s)
    if report.succeeded:
        metrics.last_success.set(now_unix_s)


@dataclass
class SyncHealth:
    """Tracks successful syncs to answer "should someone be paged?"."""

    interval_s: float
    alert_after_intervals: int
    started_at_s: float
    last_success_s: float | None = None

    def record(self, report: SyncReport, now_s: float) -> None:
        """Note a finished run."""
        if report.succeeded:
            self.last_success_s = now_s

    def overdue(self, now_s: float) -> bool:
        """True when no sync succeeded for ``alert_after_intervals`` intervals (or since start)."""
        return sync_overdue(self.last_success_s, now_s, self.interval_s,
                            self.alert_after_intervals, self.started_at_s)


def sync_overdue(last_success_s: float | None, now_s: float, interval_s: float,
                 alert_after_intervals: int, started_at_s: float) -> bool:
    """The alert condition: the newest success (or the start) is older than N intervals."""
    reference = last_success_s if last_success_s is not None else started_at_s
    return now_s - reference > interval_s * alert_after_intervals
