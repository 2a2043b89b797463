"""The correlation trail of one order, from rows inserted as the flow would write them."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from runtime import db
from runtime.cli import main
from runtime.errors import NotFound
from runtime.settings import Settings
from runtime.trace import load_trail, record_trail

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
        await conn.execute(
            "INSERT INTO email_log (idempotency_key, kind, recipient, subject, order_id, status, "
            "transport, attempts, error, correlation_id, created_at) VALUES "
            "($1, 'shipping_update', 'a@x', 'On its way', $2, 'failed', 'sendgrid', 1, "
            "'550 mailbox unavailable', $3, $4)", f"shipped:{order_id}", order_id, cid, at(30))
        trail_id = await record_trail(conn, order_id, "emailer", "attempt 1 failed",
                                      {"error": "SendGrid 503"})
        await conn.execute("UPDATE order_trail SET at = $1 WHERE id = $2", at(6), trail_id)
        return order_id, str(cid)
    finally:
        await conn.close()


def test_the_whole_story_in_order(settings: Settings, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    order_id, cid = asyncio.run(_insert_story(settings))

    async def load() -> tuple[dict[str, int], list[tuple[str, str]]]:
        conn = await db.connect(settings.database_url or "")
        try:
            _, entries = await load_trail(conn, order_id)
            ids = {r["kind"]: r["id"] for r in await conn.fetch(
                "SELECT kind, id FROM email_log WHERE order_id = $1", order_id)}
            return ids, [(e.source, e.step) for e in entries]
        finally:
            await conn.close()

    email_ids, steps = asyncio.run(load())
    email_id = email_ids["order_confirmation"]
    assert steps == [
        ("order", "created"),
        ("status", "- -> pending"),
        ("status", "pending -> reserved"),
        ("event", "order-status-changed: order.reserved"),
        ("event", "stock-updated: stock.reserved"),
        # One e-mail, named by its row on both of its lines: attempted, later sent.
        ("email", f"order_confirmation e-mail #{email_id}: first attempt"),
        ("trail", "emailer: attempt 1 failed"),
        ("email", f"order_confirmation e-mail #{email_id}: sent"),
        ("status", "reserved -> paid"),
        ("email", f"shipping_update e-mail #{email_ids['shipping_update']}: first attempt"),
    ]

    for key, val in settings.to_env().items():
        monkeypatch.setenv(key, val)
    assert main(["trace", str(order_id)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"order {order_id}  status pending  correlation {cid}")
    assert out[1] == "times in America/Sao_Paulo (the shop's zone, SHOPFLOW_TIMEZONE)"
    assert out[2].startswith("2026-12-03 12:00:00.000-03:00  order ")
    # A time in the details is the shop's too (at(3) = 15:00:03 UTC), offset and all.
    assert "published_at=2026-12-03 12:00:03.000-03:00" in out[5]
    assert "status=" not in out[7], "the sent line says the status"
    assert out[7].split("  ")[0] == "2026-12-03 12:00:05.000-03:00"
    assert "error=SendGrid 503" in out[8]
    # An e-mail never sent is one line, which says its status and why.
    assert "[status=failed  to=a@x" in out[11] and "error=550 mailbox unavailable" in out[11]
    assert main(["trace", str(order_id), "--json"]) == 0
    story = json.loads(capsys.readouterr().out)
    assert len(story["trail"]) == 10 and story["order"]["correlation_id"] == cid
    assert story["trail"][3]["detail"]["published_at"] == "2026-12-03T15:00:03+00:00"
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


async def test_failed_attempts_of_an_orders_jobs_join_its_trail(settings: Settings) -> None:
    """A real worker: an order's job that retries and then fails leaves both on the trail."""
    import threading

    from runtime.broker import QUEUE_FULFILLMENT, JobSpec, declare_actor, setup_broker
    from runtime.errors import TransientJobError
    from runtime.jobs.worker import make_worker
    from runtime.loop import LoopBridge
    from runtime.trace import install_order_trail

    conn = await db.connect(settings.database_url or "")
    await conn.execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ana', 'a@x')")
    order_id = await conn.fetchval(
        "INSERT INTO orders (customer_id, total_cents) VALUES (1, 4990) RETURNING id")
    bridge = LoopBridge().start()
    pool = bridge.run(db.create_pool(settings.database_url or "", min_size=1, max_size=2))
    broker = setup_broker(settings)
    install_order_trail(broker, pool, bridge)
    failed = threading.Event()
    broker.hooks.subscribe("failed", lambda e: failed.set())

    def label(order_id: int) -> None:
        raise TransientJobError("carrier timed out")

    spec = JobSpec(QUEUE_FULFILLMENT, "trace_test_label")
    declare_actor(broker, spec, label, attempts=2, backoff_ms=10)
    worker = make_worker(broker, {QUEUE_FULFILLMENT}, 1)
    worker.start()
    try:
        spec.send(broker, order_id)
        assert await asyncio.to_thread(failed.wait, 20)
        steps: list[str] = []
        for _ in range(200):  # the trail insert is handed to the loop, not awaited by the worker
            steps = [r["step"] for r in await conn.fetch(
                "SELECT step FROM order_trail WHERE order_id = $1 ORDER BY id", order_id)]
            if len(steps) == 2:
                break
            await asyncio.sleep(0.05)
        assert steps == ["job trace_test_label retrying", "job trace_test_label failed"]
        _, entries = await load_trail(conn, order_id)
        failure = next(e for e in entries if e.step == "jobs: job trace_test_label failed")
        assert failure.detail["error"] == "TransientJobError: carrier timed out"
    finally:
        worker.stop()
        broker.close()
        bridge.run(pool.close())
        bridge.stop()
        await conn.close()
