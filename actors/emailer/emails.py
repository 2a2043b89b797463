"""Sending e-mails exactly once per logical key.

The ``email_log`` row is the record of intent: it is created (or found)
before the transport is called and holds a short lease while a delivery is in
flight, so a duplicate message that runs at the same time waits instead of
sending a second copy. After the call the outcome is recorded. A crash after
the transport accepted but before the outcome was recorded leaves the row
``sending`` with an expired lease; the retry then calls the transport again
with the same key, and transports must be idempotent per key (the outbox
transport overwrites the same file; SendGrid is reconciled by its transport).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from actors.emailer.transports import EmailTransport, OutgoingEmail
from runtime.errors import Busy, NotFound, PermanentJobError

log = logging.getLogger(__name__)

# How long one delivery attempt may hold a key before another may try.
SEND_LEASE = timedelta(seconds=30)
# How long a sent e-mail's outcome is retried against an unreachable database.
RECORD_RETRY_S = 20.0


@dataclass(frozen=True)
class DeliveryOutcome:
    """``sent``: delivered now; ``already_sent``: an earlier run did it; ``failed``: permanent."""

    key: str
    result: str


async def _claim(conn: asyncpg.Connection, email: OutgoingEmail, kind: str, transport: str,
                 order_id: int | None, correlation_id: Any) -> str:
    """Record the intent and take the lease; return 'go', 'sent' or 'failed'."""
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO email_log (idempotency_key, kind, recipient, subject, order_id,
                                      transport, correlation_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING""",
            email.idempotency_key, kind, email.to, email.subject, order_id, transport, correlation_id,
        )
        row = await conn.fetchrow(
            "SELECT status, lease_until > now() AS leased FROM email_log WHERE idempotency_key = $1 FOR UPDATE",
            email.idempotency_key,
        )
        assert row is not None
        if row["status"] in ("sent", "failed"):
            return str(row["status"])
        if row["status"] == "sending" and row["leased"]:
            raise Busy(f"e-mail {email.idempotency_key} is being sent by another attempt (lease held)")
        await conn.execute(
            """UPDATE email_log SET status = 'sending', attempts = attempts + 1,
                      lease_until = now() + $2::interval WHERE idempotency_key = $1""",
            email.idempotency_key, SEND_LEASE,
        )
        return "go"


async def deliver(
    pool: asyncpg.Pool,
    transport: EmailTransport,
    email: OutgoingEmail,
    kind: str,
    order_id: int | None = None,
    correlation_id: Any = None,
) -> DeliveryOutcome:
    """Send ``email`` unless its key was already sent; record the outcome."""
    async with pool.acquire() as conn:
        claim = await _claim(conn, email, kind, transport.name, order_id, correlation_id)
    if claim == "sent":
        return DeliveryOutcome(email.idempotency_key, "already_sent")
    if claim == "failed":
        return DeliveryOutcome(email.idempotency_key, "failed")
    try:
        result = await transport.send(email)
    except PermanentJobError as exc:
        await _record(pool, email.idempotency_key, "failed", error=str(exc))
        raise
    except Exception as exc:
        await _record(pool, email.idempotency_key, "pending", error=f"{type(exc).__name__}: {exc}")
        raise
    await _record_sent(pool, email.idempotency_key, result.provider_id)
    return DeliveryOutcome(email.idempotency_key, "sent")


async def _record_sent(pool: asyncpg.Pool, key: str, provider_id: str | None) -> None:
    """Record a delivery that happened, riding out a short database outage.

    If it cannot be recorded at all, the row stays ``sending`` with its lease;
    the retry waits for the lease and sends again under the same key, which
    the transports treat as the same e-mail.
    """
    deadline = asyncio.get_running_loop().time() + RECORD_RETRY_S
    delay_s = 0.1
    while True:
        try:
            await _record(pool, key, "sent", provider_id=provider_id)
            return
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.InternalClientError, asyncpg.exceptions.OperatorInterventionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


async def _record(pool: asyncpg.Pool, key: str, status: str, provider_id: str | None = None,
                  error: str | None = None) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            """UPDATE email_log SET status = $2, provider_id = COALESCE($3, provider_id), error = $4,
                      lease_until = NULL,
                      sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END
                WHERE idempotency_key = $1""",
            key, status, provider_id, error,
        )


def format_brl(cents: int) -> str:
    """R$ 1.234,56: Brazilian formatting of an amount in cents."""
    whole, frac = divmod(abs(cents), 100)
    grouped = f"{whole:,}".replace(",", ".")
    return f"{'-' if cents < 0 else ''}R$ {grouped},{frac:02d}"


async def order_confirmation(conn: asyncpg.Connection, order_id: int, zone: ZoneInfo) -> tuple[OutgoingEmail, Any]:
    """Build the confirmation e-mail of an order from the database."""
    order = await conn.fetchrow(
        """SELECT o.id, o.total_cents, o.created_at, o.correlation_id, c.name, c.email
             FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = $1""",
        order_id,
    )
    if order is None:
        raise PermanentJobError(f"order {order_id} does not exist; no confirmation to send")
    items = await conn.fetch(
        """SELECT p.name, i.quantity, i.unit_price_cents FROM order_items i
             JOIN products p ON p.id = i.product_id WHERE i.order_id = $1 ORDER BY p.name""",
        order_id,
    )
    when = order["created_at"].astimezone(zone).strftime("%d/%m/%Y %H:%M")
    lines = [f"  {r['quantity']} x {r['name']} — {format_brl(r['unit_price_cents'] * r['quantity'])}"
             for r in items]
    text = "\n".join([
        f"Olá {order['name']},",
        "",
        f"Recebemos o pagamento do seu pedido #{order_id} de {when}.",
        "",
        *lines,
        "",
        f"Total: {format_brl(order['total_cents'])}",
        "",
        "Avisaremos quando ele for enviado. Obrigado por comprar na ShopFlow!",
    ])
    email = OutgoingEmail(
        idempotency_key=f"order-confirmation:{order_id}",
        to=order["email"],
        subject=f"Pedido #{order_id} confirmado",
        text=text,
        template="order_confirmation",
        template_data={"order_id": order_id, "name": order["name"],
                       "total": format_brl(order["total_cents"]), "placed_at": when},
    )
    return email, order["correlation_id"]


async def send_order_confirmation(
    pool: asyncpg.Pool, transport: EmailTransport, order_id: int, zone: ZoneInfo
) -> DeliveryOutcome:
    """The one confirmation e-mail of an order, whatever the retries."""
    async with pool.acquire() as conn:
        try:
            email, correlation_id = await order_confirmation(conn, order_id, zone)
        except NotFound as exc:
            raise PermanentJobError(str(exc)) from None
    return await deliver(pool, transport, email, "order_confirmation", order_id, correlation_id)


# Who gets the daily sales report (the original mailed the team's list).
REPORT_RECIPIENT = "equipe@shopflow.example"


def daily_report_email(report: dict[str, Any]) -> OutgoingEmail:
    """The daily sales report e-mail, from a stored report (actors.reports.sales.load_report)."""
    day = str(report["report_date"])
    top = report.get("top_products") or []
    lines = [f"  {i}. {p['name']} ({p['sku']}): {p['units']} un., {format_brl(int(p['revenue_cents']))}"
             for i, p in enumerate(top, start=1)]
    text = "\n".join([
        f"Relatório de vendas de {day} ({report['timezone']})",
        "",
        (f"Pedidos: {report['orders_count']} (concluídos {report['completed_orders']}, "
         f"falhos {report['failed_orders']}, cancelados {report['cancelled_orders']})"),
        f"Receita: {format_brl(int(report['revenue_cents']))}",
        f"Ticket médio: {format_brl(int(report['average_basket_cents']))}",
        "",
        "Mais vendidos:",
        *(lines or ["  (nenhuma venda concluída)"]),
    ])
    return OutgoingEmail(
        idempotency_key=f"daily-report:{day}", to=REPORT_RECIPIENT,
        subject=f"Vendas de {day}", text=text, template="daily_report",
        template_data={k: v for k, v in report.items() if k != "top_products"} | {"top_products": top},
    )


async def send_daily_report(pool: asyncpg.Pool, transport: EmailTransport, report_date_iso: str) -> DeliveryOutcome:
    """Mail the stored report of ``report_date_iso`` to the team, once per day."""
    from actors.reports.sales import load_report  # the reports concern's published reader

    try:
        day = date.fromisoformat(report_date_iso)
    except ValueError:
        raise PermanentJobError(f"not a date: {report_date_iso!r}") from None
    async with pool.acquire() as conn:
        report = await load_report(conn, day)
    if report is None:
        raise PermanentJobError(f"no sales report stored for {day}")
    return await deliver(pool, transport, daily_report_email(report), "daily_report")
