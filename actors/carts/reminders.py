"""The abandoned-cart rules, as plain functions over a connection.

**The rule.** A cart that is ``open``, belongs to a known customer
(``customer_id`` set), has items, and has not changed for ``idle_s`` (24 h by
default) gets exactly one reminder e-mail, ever.

- Every change to a cart calls :func:`schedule_reminder` (via the
  ``CART_CHANGED`` message that the functions of ``actors/carts/carts.py``
  put in the outbox with the change): it records the cart's version (``updated_at``) in
  ``cart_reminders`` and, in the same transaction, emits an outbox event whose
  job is ``REMINDER_DUE(cart_id, version)`` delayed by ``idle_s``.
- When the job fires, :func:`fire_reminder` locks the cart and its reminder
  row and sends only if the reminder is still ``scheduled``, the cart is
  still open and non-empty, and its version is still the one the job was
  scheduled for. A checkout cancels the reminder in its own transaction
  (:func:`actors.carts.carts.check_out`); a change supersedes the old job
  (the change scheduled a new one). A job that fires before the cart has been
  idle long enough puts itself back, delayed by the time still to wait, and
  the hourly sweep fires again reminders whose job was lost, so a
  ``scheduled`` reminder is never stranded.
- Deciding to send means: the reminder row becomes ``sent`` and the
  ``SEND_CART_REMINDER`` job is written to the outbox, in one transaction. A
  redelivered or duplicated ``REMINDER_DUE`` finds the row ``sent`` and does
  nothing. :func:`send_reminder_email` then delivers through the emailer's
  ``deliver`` with the idempotency key ``cart-reminder:<cart_id>``, whose
  ``email_log`` row makes a redelivered send job a no-op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from actors.carts.messages import REMINDER_DUE, SEND_CART_REMINDER
from actors.emailer.emails import DeliveryOutcome, deliver
from actors.emailer.transports import EmailTransport, OutgoingEmail
from runtime.broker import JobSpec
from runtime.errors import NotFound
from runtime.outbox import emit

log = logging.getLogger(__name__)

JOBS_CHANNEL = "jobs"
# A scheduled reminder this long past due lost its job; the sweep fires it again.
# Well above any queue backlog, so a due job still on its way is rarely doubled.
STRANDED_AFTER_S = 3600.0
TEMPLATE = "cart_reminder"
KIND = "cart_reminder"


def reminder_key(cart_id: int) -> str:
    """The e-mail idempotency key of a cart's reminder (one per cart, ever)."""
    return f"cart-reminder:{cart_id}"


@dataclass(frozen=True)
class Scheduled:
    """A reminder planned for one cart version."""

    cart_id: int
    cart_updated_at: datetime
    due_at: datetime


async def _lock_cart(conn: asyncpg.Connection, cart_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT c.id, c.customer_id, c.status, c.updated_at,
                  EXISTS (SELECT 1 FROM cart_items i WHERE i.cart_id = c.id) AS has_items
             FROM carts c WHERE c.id = $1 FOR UPDATE""", cart_id)
    return row


def _ineligible_reason(cart: asyncpg.Record) -> str | None:
    if cart["status"] != "open":
        return str(cart["status"])
    if cart["customer_id"] is None:
        return "anonymous"
    if not cart["has_items"]:
        return "empty"
    return None


async def schedule_reminder(conn: asyncpg.Connection, cart_id: int, idle_s: int,
                            spec: JobSpec = REMINDER_DUE) -> Scheduled | None:
    """Plan the reminder for the cart's current version, or cancel it; one transaction."""
    async with conn.transaction():
        cart = await _lock_cart(conn, cart_id)
        if cart is None:
            return None
        reason = _ineligible_reason(cart)
        if reason is not None:
            await cancel_reminder(conn, cart_id, reason)
            return None
        due_at = cart["updated_at"] + timedelta(seconds=idle_s)
        row = await conn.fetchrow(
            """INSERT INTO cart_reminders (cart_id, cart_updated_at, due_at)
               VALUES ($1, $2, $3)
               ON CONFLICT (cart_id) DO UPDATE
                  SET cart_updated_at = EXCLUDED.cart_updated_at, due_at = EXCLUDED.due_at,
                      status = 'scheduled', reason = NULL, decided_at = NULL
                WHERE cart_reminders.status <> 'sent'
                  AND cart_reminders.cart_updated_at <> EXCLUDED.cart_updated_at
               RETURNING cart_id""", cart_id, cart["updated_at"], due_at)
        if row is None:
            return None  # already sent, or this version is already scheduled
        await _emit_due_job(conn, cart_id, cart["updated_at"].isoformat(), due_at,
                            datetime.now(UTC), spec)
        return Scheduled(cart_id, cart["updated_at"], due_at)


async def _emit_due_job(conn: asyncpg.Connection, cart_id: int, version: str, due_at: datetime,
                        now: datetime, spec: JobSpec = REMINDER_DUE) -> None:
    """Put ``REMINDER_DUE(cart_id, version)`` in the outbox, delayed until ``due_at``."""
    delay_ms = max(0, int((due_at - now).total_seconds() * 1000))
    await emit(conn, JOBS_CHANNEL, "cart-reminder-scheduled",
               {"cart_id": cart_id, "cart_updated_at": version, "due_at": due_at.isoformat()},
               job=spec.as_job(cart_id, version, delay_ms=delay_ms))


async def cancel_reminder(conn: asyncpg.Connection, cart_id: int, reason: str) -> bool:
    """Cancel a scheduled (not yet sent) reminder, e.g. at checkout; True if one was cancelled."""
    status = await conn.fetchval(
        """UPDATE cart_reminders SET status = 'cancelled', reason = $2, decided_at = now()
            WHERE cart_id = $1 AND status = 'scheduled' RETURNING status""", cart_id, reason)
    return status is not None


async def fire_reminder(conn: asyncpg.Connection, cart_id: int, cart_updated_at_iso: str,
                        idle_s: int, now: datetime | None = None,
                        send_spec: JobSpec = SEND_CART_REMINDER) -> str:
    """The delayed job's work: send the reminder if everything still holds; return the outcome.

    Outcomes: ``sent``, ``already_sent``, ``superseded`` (the cart changed;
    a newer job exists), ``not_due``, ``unscheduled``, or ``cancelled:<why>``.
    """
    expected = datetime.fromisoformat(cart_updated_at_iso)
    now = now or datetime.now(UTC)
    async with conn.transaction():
        cart = await _lock_cart(conn, cart_id)
        reminder = await conn.fetchrow(
            "SELECT * FROM cart_reminders WHERE cart_id = $1 FOR UPDATE", cart_id)
        if cart is None or reminder is None:
            return "unscheduled"
        if reminder["status"] == "sent":
            return "already_sent"
        reason = _ineligible_reason(cart)
        if reason is not None:
            await cancel_reminder(conn, cart_id, reason)
            return f"cancelled:{reason}"
        if cart["updated_at"] != expected or reminder["cart_updated_at"] != expected:
            return "superseded"
        if reminder["status"] != "scheduled":
            return f"cancelled:{reminder['reason']}"
        due_at = cart["updated_at"] + timedelta(seconds=idle_s)
        if now < due_at:
            # fired early (a clock ahead of the database's, a delay cut short): come back
            # when it is due, or the scheduled row would wait for a job that never comes
            await _emit_due_job(conn, cart_id, cart_updated_at_iso, due_at, now)
            return "not_due"
        await conn.execute(
            "UPDATE cart_reminders SET status = 'sent', decided_at = now() WHERE cart_id = $1",
            cart_id)
        await emit(conn, JOBS_CHANNEL, "cart-reminder-sent",
                   {"cart_id": cart_id, "customer_id": cart["customer_id"]},
                   job=send_spec.as_job(cart_id))
    log.info("cart %d: reminder e-mail queued", cart_id, extra={"cart_id": cart_id})
    return "sent"


async def send_reminder_email(pool: asyncpg.Pool, transport: EmailTransport,
                              cart_id: int) -> DeliveryOutcome:
    """Deliver the decided reminder once (the emailer's ``email_log`` key guards retries)."""
    async with pool.acquire() as conn:
        email = await reminder_email(conn, cart_id)
    return await deliver(pool, transport, email, KIND)


async def reminder_email(conn: asyncpg.Connection, cart_id: int) -> OutgoingEmail:
    """The reminder e-mail, with the cart's items for the template."""
    customer = await conn.fetchrow(
        """SELECT cu.id, cu.name, cu.email FROM carts c JOIN customers cu ON cu.id = c.customer_id
            WHERE c.id = $1""", cart_id)
    items = await conn.fetch(
        """SELECT p.name, i.quantity, p.price_cents FROM cart_items i
             JOIN products p ON p.id = i.product_id WHERE i.cart_id = $1 ORDER BY p.name""", cart_id)
    if customer is None:
        raise NotFound(f"cart {cart_id} has no known customer")
    lines = [f"- {r['quantity']} x {r['name']}" for r in items]
    return OutgoingEmail(
        idempotency_key=reminder_key(cart_id),
        to=customer["email"],
        subject="Você esqueceu algo no carrinho",
        text=f"Olá, {customer['name']}! Seu carrinho ainda espera por você:\n" + "\n".join(lines),
        template=TEMPLATE,
        template_data={
            "customer_name": customer["name"], "cart_id": cart_id,
            "items": [{"name": r["name"], "quantity": r["quantity"],
                       "unit_price_cents": r["price_cents"]} for r in items],
        },
    )


async def sweep_idle_carts(conn: asyncpg.Connection, idle_s: int, limit: int = 500) -> int:
    """Backstop: schedule reminders for idle carts never announced, and re-fire stranded ones.

    Returns how many due jobs it emitted. A stranded reminder is a ``scheduled``
    row for the cart's current version that is overdue by more than
    :data:`STRANDED_AFTER_S` (its job was lost); it gets its due job again.
    A duplicate due job is harmless: the first one to fire sends, the others
    find the row ``sent``.
    """
    rows = await conn.fetch(
        """SELECT c.id FROM carts c
            WHERE c.status = 'open' AND c.customer_id IS NOT NULL
              AND c.updated_at <= now() - make_interval(secs => $1)
              AND NOT EXISTS (SELECT 1 FROM cart_reminders r
                               WHERE r.cart_id = c.id
                                 AND (r.status = 'sent' OR r.cart_updated_at = c.updated_at))
            ORDER BY c.updated_at LIMIT $2""", float(idle_s), limit)
    scheduled = 0
    for row in rows:
        if await schedule_reminder(conn, row["id"], idle_s) is not None:
            scheduled += 1
    return scheduled + await refire_stranded(conn, limit)


async def refire_stranded(conn: asyncpg.Connection, limit: int = 500,
                          stranded_after_s: float = STRANDED_AFTER_S) -> int:
    """Emit the due job again for scheduled reminders long overdue; return how many."""
    now = datetime.now(UTC)
    async with conn.transaction():
        rows = await conn.fetch(
            """SELECT r.cart_id, r.cart_updated_at, r.due_at
                 FROM cart_reminders r JOIN carts c ON c.id = r.cart_id
                WHERE r.status = 'scheduled' AND r.cart_updated_at = c.updated_at
                  AND r.due_at <= now() - make_interval(secs => $1)
                ORDER BY r.due_at LIMIT $2""", float(stranded_after_s), limit)
        for row in rows:
            log.warning("cart %d: reminder due at %s never fired; firing it again", row["cart_id"],
                        row["due_at"].isoformat(), extra={"cart_id": row["cart_id"]})
            await _emit_due_job(conn, row["cart_id"], row["cart_updated_at"].isoformat(), row["due_at"], now)
    return len(rows)
