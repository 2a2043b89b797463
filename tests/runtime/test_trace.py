"""The correlation trail of one order, from rows inserted as the flow would write them."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from runtime import db
from runtime.cli import main
from runtime.errors import NotFound
from runtime.logs import JsonFormatter
from runtime.settings import Settings
from runtime.trace import load_trail, order_log_context, record_trail

T0 = datetime(2026, 12, 3, 15, 0, 0, tzinfo=UTC)


async def _insert_story(settings: Settings) -> tuple[int, str]:
    """One order's rows, in a jumbled insert order, plus another order's to stay out."""
    conn = await db.connect(settings.database_url or "")
    try:
        await conn.execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ana', 'a@x'), "
                           "(2, 'Bia', 'b@x')")
        order_id, cid = await conn.fetchrow(
            "INSERT INTO orders (customer_id, total_cents, created_at) VALUES (1, 4990, $1) "
            "RETURNING id, correlation_id", T0)
        other_id, other_cid = await conn.fetchrow(
            "INSERT INTO orders (customer_id, total_cents) VALUES (2, 100) "
            "RETURNING id, correlation_id")

        def at(s: int) -> datetime:
            return T0 + timedelta(seconds=s)

        await conn.executemany(
            "INSERT INTO order_status_history (order_id, from_status, to_status, reason, at) "
            "VALUES ($1, $2, $3, $4, $5)",
            [(order_id, "reserved", "paid", None, at(20)), (order_id, None, "pending", None, at(0)),
             (order_id, "pending", "reserved", "stock held", at(2)),
             (other_id, None, "pending", None, at(1))])
        await conn.executemany(
            "INSERT INTO outbox (channel, event_type, payload, job, correlation_id, created_at, "
            "published_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [("order-status-changed", "order.reserved", {"order_id": order_id},
              {"queue": "emails", "actor": "send_order_confirmation"}, cid, at(2), at(3)),
             ("stock-updated", "stock.reserved", {"product_id": 7}, None, cid, at(2), at(3)),
             ("order-status-changed", "order.pending", {"order_id": other_id}, None, other_cid,
              at(1), None)])
        await conn.execute(
            "INSERT INTO email_log (idempotency_key, kind, recipient, subject, order_id, status, "
            "transport, attempts, correlation_id, created_at, sent_at) VALUES "
            "($1, 'order_confirmation', 'a@x', 'Your order', $2, 'sent', 'outbox', 2, $3, $4, $5)",
            f"confirm:{order_id}", order_id, cid, at(5), at(9))
        trail_id = await record_trail(conn, order_id, "emailer", "attempt 1 failed",
                                      {"error": "SendGrid 503"})
        await conn.execute("UPDATE order_trail SET at = $1 WHERE id = $2", at(6), trail_id)
        return order_id, str(cid)
    finally:
        await conn.close()


def test_the_whole_story_in_order(settings: Settings, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    order_id, cid = asyncio.run(_insert_story(settings))

    async def load() -> list[tuple[str, str]]:
        conn = await db.connect(settings.database_url or "")
        try:
            _, entries = await load_trail(conn, order_id)
            return [(e.source, e.step) for e in entries]
        finally:
            await conn.close()

    assert asyncio.run(load()) == [
        ("order", "created"),
        ("status", "- -> pending"),
        ("status", "pending -> reserved"),
        ("event", "order-status-changed: order.reserved"),
        ("event", "stock-updated: stock.reserved"),
        ("email", "order_confirmation (sent)"),
        ("trail", "emailer: attempt 1 failed"),
        ("email", "order_confirmation sent"),
        ("status", "reserved -> paid"),
    ]

    for key, val in settings.to_env().items():
        monkeypatch.setenv(key, val)
    assert main(["trace", str(order_id)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"order {order_id}  status pending  correlation {cid}")
    assert out[1].startswith("2026-12-03 12:00:00.000  order ")  # shop zone, UTC-3
    assert "error=SendGrid 503" in out[7]
    assert main(["trace", str(order_id), "--json"]) == 0
    story = json.loads(capsys.readouterr().out)
    assert len(story["trail"]) == 9 and story["order"]["correlation_id"] == cid
    assert main(["trace", "999999"]) == 1
    assert "order 999999 does not exist" in capsys.readouterr().err


def test_record_trail_needs_an_order(settings: Settings) -> None:
    async def record() -> None:
        conn = await db.connect(settings.database_url or "")
        try:
            await record_trail(conn, 424242, "test", "nothing")
        finally:
            await conn.close()

    with pytest.raises(NotFound):
        asyncio.run(record())


def test_log_lines_carry_the_order_and_its_correlation_id() -> None:
    record = logging.LogRecord("shop", logging.INFO, __file__, 1, "reserved", None, None)
    with order_log_context(42, "3f0c7c4e-0000-4000-8000-000000000000"):
        line = json.loads(JsonFormatter().format(record))
    assert (line["order_id"], line["correlation_id"]) == (
        42, "3f0c7c4e-0000-4000-8000-000000000000")
