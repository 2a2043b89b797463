"""The fulfilment flow, one step per message.

Each step checks where the order is, does that step's work and moves the
order on in one transaction that also queues the next step through the
outbox. A step that finds the order already past it does nothing, so a
retried or duplicated message is harmless. Calls to outside services happen
before the transaction, with idempotency keys, so a retry repeats no side
effect.

A transient failure of an outside service (timeout, 5xx, open breaker)
raises, so the job is retried and the order waits where it is; the next
attempt sends the same idempotency key and gets the same label. A permanent
refusal (a 4xx other than 408/425/429) will not get better by retrying: the
order moves to ``failed`` with the service's answer as its reason, and a
``fulfillment.failed`` event on the ``alerts`` channel puts it on the
dashboard, all in one transaction. The order is never left waiting silently.
That transaction also gives the order's stock back (what its allocation took
off ``quantity``), with ``stock-updated`` events: an order that will not ship
holds no stock.

Every outside call's outcome is also told to a :class:`StepOutcomes`
(``refused`` / ``passed``, by service and step), which is how on-call gets
paged when a service starts refusing orders and hears when they get through
again (``actors/fulfillment/alerts.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import asyncpg

from actors.fulfillment.adapters import ShippingGateway
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.inventory.reservations import allocate_for_order, release_order_stock
from actors.orders import service as orders
from actors.orders import state
from runtime.errors import ExternalRequestRejected
from runtime.outbox import emit

log = logging.getLogger(__name__)

Step = Callable[[asyncpg.Connection], Awaitable[None]]
T = TypeVar("T")
# Where a permanently failed step is reported for staff (the dashboard's alert feed).
ALERTS_CHANNEL = "alerts"
EVENT_FULFILLMENT_FAILED = "fulfillment.failed"
# The flow's steps that call an outside service, and the service each one calls.
STEP_LABEL = "shipping label"
STEP_PACKING = "packing request"
SERVICE_OF_STEP = {STEP_LABEL: "carrier", STEP_PACKING: "warehouse"}


class StepOutcomes(Protocol):
    """Hears how each outside-service step went, per service and step.

    Called on the process loop in the middle of a flow step, whose Dramatiq
    thread is waiting for the step: implementations must hand slow work
    (a webhook) elsewhere and return at once.
    """

    def refused(self, service: str, step: str, order_id: int, http_status: int | None,
                reason: str) -> None:
        """The service refused the order's request for good; the order was failed."""
        ...

    def passed(self, service: str, step: str, order_id: int) -> None:
        """The service took the order's request; the order moved on."""
        ...


class NoOutcomes:
    """A :class:`StepOutcomes` that tells nobody (callers without alerting)."""

    def refused(self, service: str, step: str, order_id: int, http_status: int | None,
                reason: str) -> None:
        """Nothing to do."""

    def passed(self, service: str, step: str, order_id: int) -> None:
        """Nothing to do."""


async def _move(pool: asyncpg.Pool, order_id: int, expected: str, to_status: str,
                work: Step | None = None, next_step: bool = True,
                reason: str | None = None) -> bool:
    """Lock the order; if it is still ``expected`` do ``work`` and move it. False if it was not."""
    async with pool.acquire() as conn, conn.transaction():
        row = await orders.lock_order(conn, order_id)
        if row["status"] != expected:
            return False
        if work is not None:
            await work(conn)
        jobs = [ADVANCE_FULFILLMENT.as_job(order_id)] if next_step else []
        await orders.transition(conn, order_id, to_status, reason, jobs=jobs)
        return True


async def _call_or_fail(pool: asyncpg.Pool, order_id: int, correlation_id: Any, status: str,
                        step: str, call: Callable[[], Awaitable[T]],
                        outcomes: StepOutcomes) -> T | None:
    """``call()``; if the service refuses for good, fail the order (None) instead of raising.

    Failing it gives its stock back and reports it, in the transaction of the
    move; a redelivered step finds the order ``failed`` and changes nothing.
    ``outcomes`` hears of the refusal once that transaction is over.
    """
    try:
        return await call()
    except ExternalRequestRejected as exc:
        reason, http_status = f"{step} failed: {exc}", exc.status
    log.error("order %d: %s", order_id, reason,
              extra={"order_id": order_id, "step": step, "http_status": http_status})

    async def give_back_and_report(conn: asyncpg.Connection) -> None:
        await release_order_stock(conn, order_id, correlation_id)
        await emit(conn, ALERTS_CHANNEL, EVENT_FULFILLMENT_FAILED,
                   {"order_id": order_id, "step": step, "from_status": status,
                    "http_status": http_status, "reason": reason})

    await _move(pool, order_id, status, state.FAILED, give_back_and_report, next_step=False,
                reason=reason)
    outcomes.refused(SERVICE_OF_STEP[step], step, order_id, http_status, reason)
    return None


async def order_age_s(pool: asyncpg.Pool, order_id: int) -> float:
    """Seconds from the order's creation to now (its end-to-end latency when it is done)."""
    age = await pool.fetchval(
        "SELECT extract(epoch FROM clock_timestamp() - created_at) FROM orders WHERE id = $1", order_id)
    return float(age or 0.0)


async def advance(pool: asyncpg.Pool, gateway: ShippingGateway, order_id: int,
                  outcomes: StepOutcomes | None = None,
                  on_ready_to_ship: Callable[[], Awaitable[None]] | None = None) -> str:
    """Take the order one step along the flow; return its status afterwards.

    ``outcomes`` hears how the label and packing calls went (default: nobody).
    ``on_ready_to_ship`` is awaited once per order, by the step that moved it
    to ``ready_to_ship`` (not by a redelivered step that finds it there), so a
    latency measured in it counts each order once.
    """
    outcomes = outcomes or NoOutcomes()
    async with pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM orders WHERE id = $1", order_id)
        correlation_id = await conn.fetchval("SELECT correlation_id FROM orders WHERE id = $1", order_id)
    if status is None:
        return "missing"
    if status == state.PAID:
        async def allocate(conn: asyncpg.Connection) -> None:
            await allocate_for_order(conn, order_id, correlation_id)
        await _move(pool, order_id, state.PAID, state.ALLOCATED, allocate)
        return state.ALLOCATED
    if status == state.ALLOCATED:
        await _move(pool, order_id, state.ALLOCATED, state.PROCESSING)
        return state.PROCESSING
    if status == state.PROCESSING:
        label = await _call_or_fail(
            pool, order_id, correlation_id, status, STEP_LABEL,
            lambda: gateway.create_label(order_id, f"label:{order_id}"), outcomes)
        if label is None:
            return state.FAILED

        async def store_label(conn: asyncpg.Connection) -> None:
            await conn.execute(
                """INSERT INTO shipments (order_id, carrier, tracking_code, label_url)
                   VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO NOTHING""",
                order_id, label.carrier, label.tracking_code, label.label_url,
            )
        await _move(pool, order_id, state.PROCESSING, state.LABEL_CREATED, store_label)
        outcomes.passed(SERVICE_OF_STEP[STEP_LABEL], STEP_LABEL, order_id)
        return state.LABEL_CREATED
    if status == state.LABEL_CREATED:
        packing_ref = await _call_or_fail(
            pool, order_id, correlation_id, status, STEP_PACKING,
            lambda: gateway.request_packing(order_id, f"packing:{order_id}"), outcomes)
        if packing_ref is None:
            return state.FAILED

        async def store_packing(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE shipments SET packing_ref = $2, updated_at = now() WHERE order_id = $1",
                order_id, packing_ref,
            )
        moved = await _move(pool, order_id, state.LABEL_CREATED, state.READY_TO_SHIP,
                            store_packing, next_step=False)
        outcomes.passed(SERVICE_OF_STEP[STEP_PACKING], STEP_PACKING, order_id)
        if moved and on_ready_to_ship is not None:
            await on_ready_to_ship()
        return state.READY_TO_SHIP
    return str(status)
