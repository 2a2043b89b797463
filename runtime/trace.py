"""Correlation: one id follows an order through every step, and ``shopflow trace`` tells it.

Every order has a ``correlation_id`` (orders table). The flow copies it onto
what the order causes: outbox events (``outbox.correlation_id``), jobs (the
``correlation_id`` job option, which the metrics middleware puts on every log
line of the job, with the ``order_id`` its actor takes), e-mails
(``email_log.correlation_id``), and the steps that leave no row elsewhere
(:func:`record_trail`, table ``order_trail``). :func:`load_trail` reads all of
them back in time order.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from runtime import db, embedded
from runtime.cli import add_command
from runtime.errors import NotFound
from runtime.jobs.args import int_arg
from runtime.jobs.broker import JobBroker
from runtime.jobs.hooks import JobEvent
from runtime.loop import LoopBridge
from runtime.settings import Settings

log = logging.getLogger(__name__)

# Ties between rows at the same instant are told in this order.
_SOURCE_ORDER = {"order": 0, "status": 1, "event": 2, "email": 3, "trail": 4}


@dataclass(frozen=True)
class TrailEntry:
    """One step of an order's story."""

    at: datetime
    source: str  # order, status, event, email, trail
    step: str
    detail: dict[str, Any] = field(default_factory=dict)
    row_id: int = 0

    def sort_key(self) -> tuple[datetime, int, int]:
        """Time first; at the same instant, cause before effect by source."""
        return self.at, _SOURCE_ORDER.get(self.source, 9), self.row_id


# Job events that belong in an order's story (the rest are its normal steps).
TRAIL_EVENTS = ("retrying", "failed", "stalled", "dead", "cancelled")


def install_order_trail(broker: JobBroker, pool: asyncpg.Pool, bridge: LoopBridge) -> None:
    """Record every failed, retried, stalled or cancelled attempt of an order's job on its trail.

    Hooks run on Dramatiq's threads; the insert is handed to the process loop
    without waiting, so a database that is down (often why the job failed)
    never holds a worker thread. A failed insert is logged.
    """
    def on_event(event: JobEvent) -> None:
        if event.kind not in TRAIL_EVENTS:
            return
        actor = broker.actors.get(event.actor)
        order_id = int_arg(actor.fn if actor else None, event.args)
        if order_id is None:
            return
        detail = {"job_id": event.job_id, "queue": event.queue, "attempt": event.attempt,
                  **{k: v for k, v in event.detail.items() if k in ("error", "delay_ms",
                                                                    "deaths", "reason")}}
        coro = _record_quietly(pool, order_id, f"job {event.actor} {event.kind}", detail)
        asyncio.run_coroutine_threadsafe(coro, bridge.loop).add_done_callback(_log_if_failed)

    broker.hooks.subscribe(None, on_event)


def _log_if_failed(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("recording a job event on an order's trail failed", exc_info=future.exception())


async def _record_quietly(pool: asyncpg.Pool, order_id: int, step: str,
                          detail: dict[str, Any]) -> None:
    try:
        async with pool.acquire() as conn:
            await record_trail(conn, order_id, "jobs", step, detail)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("could not add %r to order %d's trail: %s", step, order_id, exc)


async def record_trail(
    conn: asyncpg.Connection,
    order_id: int,
    source: str,
    step: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """Add a step to the order's trail (in the caller's transaction, if any); returns its id.

    The correlation id is copied from the order, so callers need only the order id.
    ``conn`` must have the runtime's JSON codecs (``runtime.db``): ``detail`` is a dict.
    """
    row_id: int | None = await conn.fetchval(
        """INSERT INTO order_trail (order_id, correlation_id, source, step, detail)
           SELECT id, correlation_id, $2, $3, $4::jsonb FROM orders WHERE id = $1
           RETURNING id""",
        order_id, source, step, detail or {},
    )
    if row_id is None:
        raise NotFound(f"order {order_id} does not exist")
    return row_id


async def load_trail(conn: asyncpg.Connection, order_id: int) -> tuple[dict[str, Any], list[TrailEntry]]:
    """The order row and every step of its story, oldest first."""
    order = await conn.fetchrow(
        """SELECT id, customer_id, status, total_cents, external_ref, correlation_id, created_at
           FROM orders WHERE id = $1""", order_id)
    if order is None:
        raise NotFound(f"order {order_id} does not exist")
    cid = order["correlation_id"]
    entries = [TrailEntry(order["created_at"], "order", "created",
                          {"customer_id": order["customer_id"],
                           "total_cents": order["total_cents"],
                           "external_ref": order["external_ref"]})]
    entries += await _status_history(conn, order_id)
    entries += await _events(conn, order_id, cid)
    entries += await _emails(conn, order_id, cid)
    entries += await _trail_rows(conn, order_id)
    return dict(order), sorted(entries, key=TrailEntry.sort_key)


async def _status_history(conn: asyncpg.Connection, order_id: int) -> list[TrailEntry]:
    rows = await conn.fetch(
        """SELECT id, from_status, to_status, reason, at FROM order_status_history
           WHERE order_id = $1""", order_id)
    return [TrailEntry(r["at"], "status", f"{r['from_status'] or '-'} -> {r['to_status']}",
                       {"reason": r["reason"]} if r["reason"] else {}, r["id"]) for r in rows]


async def _events(conn: asyncpg.Connection, order_id: int, cid: uuid.UUID) -> list[TrailEntry]:
    rows = await conn.fetch(
        """SELECT id, channel, event_type, job, created_at, published_at FROM outbox
           WHERE correlation_id = $1""", cid)
    out = []
    for r in rows:
        # A time stays a datetime here: the text shows it in the shop's zone, JSON in UTC.
        detail: dict[str, Any] = {"published_at": r["published_at"] or "not yet"}
        job = _json(r["job"])
        if job:
            detail["job"] = f"{job.get('queue')}/{job.get('actor')}"
        out.append(TrailEntry(r["created_at"], "event", f"{r['channel']}: {r['event_type']}",
                              detail, r["id"]))
    return out


async def _emails(conn: asyncpg.Connection, order_id: int, cid: uuid.UUID) -> list[TrailEntry]:
    rows = await conn.fetch(
        """SELECT id, kind, recipient, subject, status, transport, attempts, error, created_at,
                  sent_at FROM email_log WHERE correlation_id = $1 OR order_id = $2""",
        cid, order_id)
    return [entry for r in rows for entry in _email_steps(r)]


def _email_steps(row: asyncpg.Record) -> list[TrailEntry]:
    """One e-mail's steps: its first delivery attempt and, once delivered, its sending.

    The ``email_log`` row is created as the first attempt starts and stamped
    ``sent_at`` when the transport took it, two moments with other steps
    between them (a failed attempt, a retry); both lines name the e-mail by
    its row id, so they read as one e-mail's progress, not as two e-mails. Its
    current status is said on the first line unless the second says it.
    """
    name = f"{row['kind']} e-mail #{row['id']}"
    detail: dict[str, Any] = {"to": row["recipient"], "subject": row["subject"],
                              "transport": row["transport"], "attempts_in_all": row["attempts"]}
    if row["status"] != "sent" or not row["sent_at"]:
        detail = {"status": row["status"], **detail}
    if row["error"]:
        detail["error"] = row["error"]
    steps = [TrailEntry(row["created_at"], "email", f"{name}: first attempt", detail, row["id"])]
    if row["sent_at"]:
        steps.append(TrailEntry(row["sent_at"], "email", f"{name}: sent",
                                {"transport": row["transport"]}, row["id"]))
    return steps


async def _trail_rows(conn: asyncpg.Connection, order_id: int) -> list[TrailEntry]:
    rows = await conn.fetch(
        "SELECT id, source, step, detail, at FROM order_trail WHERE order_id = $1", order_id)
    return [TrailEntry(r["at"], "trail", f"{r['source']}: {r['step']}", _json(r["detail"]) or {},
                       r["id"]) for r in rows]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def format_trail(order: dict[str, Any], entries: list[TrailEntry], zone: ZoneInfo) -> str:
    """The story as text, one step a line, every time in the shop's zone with its offset.

    A second line names the zone, and each time carries its UTC offset, so no
    time on a line (the step's, or one in its details) can pass for another zone's.
    """
    lines = [f"order {order['id']}  status {order['status']}  correlation {order['correlation_id']}",
             f"times in {zone.key} (the shop's zone, SHOPFLOW_TIMEZONE)"]
    for e in entries:
        detail = "  ".join(f"{k}={_shop_time(v, zone) if isinstance(v, datetime) else v}"
                           for k, v in e.detail.items() if v is not None)
        lines.append(f"{_shop_time(e.at, zone)}  {e.source:<6}  {e.step}"
                     + (f"  [{detail}]" if detail else ""))
    return "\n".join(lines)


def _shop_time(at: datetime, zone: ZoneInfo) -> str:
    """``2026-12-03 12:00:00.000-03:00``: milliseconds, and the offset that says the zone."""
    return at.astimezone(zone).isoformat(sep=" ", timespec="milliseconds")


def trail_as_json(order: dict[str, Any], entries: list[TrailEntry]) -> dict[str, Any]:
    """The story as JSON-ready data (for ``--json`` and a dashboard view); times ISO 8601."""
    return {
        "order": {k: _json_value(v) for k, v in order.items()},
        "trail": [{"at": e.at.isoformat(), "source": e.source, "step": e.step,
                   "detail": {k: _json_value(v) for k, v in e.detail.items()}}
                  for e in entries],
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if isinstance(value, uuid.UUID) else value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``shopflow trace ORDER_ID`` (entry point of the ``shopflow.commands`` group)."""
    parser = add_command(subparsers, "trace", _cmd_trace,
                         "print an order's story: status, events, e-mails",
                         "print an order's whole story: status changes, events, e-mails, steps")
    parser.add_argument("order_id", type=int, help="the order's id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    database_url = embedded.find_services(settings, redis=False, postgres=True).database_url
    assert database_url is not None  # find_services raises rather than leave it unset

    async def load() -> tuple[dict[str, Any], list[TrailEntry]]:
        conn = await db.connect(database_url)
        try:
            return await load_trail(conn, args.order_id)
        finally:
            await conn.close()

    order, entries = asyncio.run(load())
    if args.json:
        print(json.dumps(trail_as_json(order, entries), indent=2, default=str))
    else:
        print(format_trail(order, entries, settings.zone))
    return 0
