"""One confirmation e-mail per order, whatever the retries and races."""

from __future__ import annotations

import asyncio
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from actors.emailer.emails import deliver, format_brl, send_order_confirmation
from actors.emailer.transports import OutboxTransport, OutgoingEmail, SendResult
from runtime.errors import Busy, PermanentJobError
from tests.factories import make_order, make_shop

ZONE = ZoneInfo("America/Sao_Paulo")


def test_brl_formatting() -> None:
    assert format_brl(123456) == "R$ 1.234,56"
    assert format_brl(5) == "R$ 0,05"


class HeldTransport:
    """The outbox transport, held inside ``send`` until the test releases it."""

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.inner = OutboxTransport(directory)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def send(self, email: OutgoingEmail) -> SendResult:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return await self.inner.send(email)


async def test_retries_and_concurrent_duplicates_send_one_email(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """Duplicates that arrive while the first send is still in the transport meet its lease
    (Busy: retried later, nothing sent); retries after it went out find it sent."""
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        order_id = await make_order(conn, 1, {1: 2})
    transport = HeldTransport(tmp_path)
    first = asyncio.create_task(send_order_confirmation(pool, transport, order_id, ZONE))
    await asyncio.wait_for(transport.entered.wait(), 10)
    # Bounded: a duplicate that got past the lease would wait in the held transport.
    during = await asyncio.wait_for(asyncio.gather(
        *(send_order_confirmation(pool, transport, order_id, ZONE) for _ in range(5)),
        return_exceptions=True,
    ), 10)
    assert all(isinstance(r, Busy) for r in during), during
    assert transport.calls == 1 and not first.done()
    transport.release.set()
    assert (await asyncio.wait_for(first, 10)).result == "sent"
    after = await asyncio.gather(
        *(send_order_confirmation(pool, transport, order_id, ZONE) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(getattr(r, "result", None) == "already_sent" for r in after), after
    assert transport.calls == 1
    files = list(tmp_path.glob("*.eml"))
    assert len(files) == 1
    text = files[0].read_text()
    assert "R$ 39,80" in text and f"#{order_id}" in text
    assert await pool.fetchval("SELECT count(*) FROM email_log") == 1
    assert await pool.fetchval("SELECT attempts FROM email_log") == 1


async def test_the_confirmation_carries_the_orders_correlation_id(pool: asyncpg.Pool,
                                                                  tmp_path: Path) -> None:
    """The trail (``shopflow trace``) finds the e-mail by the order's correlation id alone."""
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        order_id = await make_order(conn, 1, {1: 1})
        other_id = await make_order(conn, 1, {1: 1})
    for oid in (order_id, other_id):
        await send_order_confirmation(pool, OutboxTransport(tmp_path), oid, ZONE)
    rows = await pool.fetch(
        """SELECT e.order_id, e.correlation_id AS email_cid, o.correlation_id AS order_cid
             FROM email_log e JOIN orders o ON o.id = e.order_id ORDER BY e.order_id""")
    assert [r["order_id"] for r in rows] == [order_id, other_id]
    assert all(r["email_cid"] is not None and r["email_cid"] == r["order_cid"] for r in rows)
    assert rows[0]["email_cid"] != rows[1]["email_cid"]


class FlakyTransport:
    """Fails the first call after 'accepting' it, like a timeout after the provider got it."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def send(self, email: OutgoingEmail) -> SendResult:
        self.calls.append(email.idempotency_key)
        if len(self.calls) == 1:
            raise TimeoutError("read timed out")
        return SendResult("provider-1")


async def test_a_failed_attempt_is_retried_and_recorded_once_sent(pool: asyncpg.Pool) -> None:
    transport = FlakyTransport()
    email = OutgoingEmail("k-1", "a@example.com.br", "s", "t")
    with pytest.raises(TimeoutError):
        await deliver(pool, transport, email, "test")
    assert await pool.fetchval("SELECT status FROM email_log WHERE idempotency_key = 'k-1'") == "pending"
    assert (await deliver(pool, transport, email, "test")).result == "sent"
    assert (await deliver(pool, transport, email, "test")).result == "already_sent"
    assert transport.calls == ["k-1", "k-1"]


class RejectingTransport:
    name = "rejecting"

    async def send(self, email: OutgoingEmail) -> SendResult:
        raise PermanentJobError("400 invalid address")


async def test_a_permanent_failure_is_recorded_and_not_sent_again(pool: asyncpg.Pool) -> None:
    email = OutgoingEmail("k-2", "not-an-address", "s", "t")
    with pytest.raises(PermanentJobError):
        await deliver(pool, RejectingTransport(), email, "test")
    assert (await deliver(pool, RejectingTransport(), email, "test")).result == "failed"
    row = await pool.fetchrow("SELECT status, error FROM email_log WHERE idempotency_key = 'k-2'")
    assert row["status"] == "failed" and "invalid address" in row["error"]
