"""The README's first command on real CDNOW orders: `shopflow up --once --limit 300`.

It runs the real process tree under supervisord with the repository's
supervisord.conf, against this test's Redis and an EMPTY PostgreSQL database
(never migrated, as on a fresh machine): `up` must migrate and seed before it
starts the tree, or the workers would start on a database without tables.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from runtime import db
from runtime.settings import Settings
from runtime.trace import TrailEntry, load_trail
from tests.support import SHOPFLOW, free_port

LIMIT = 300


async def _facts(settings: Settings) -> dict[str, object]:
    conn = await db.connect(settings.database_url or "")
    try:
        return {
            "orders": await conn.fetchval("SELECT count(*) FROM orders"),
            "open": await conn.fetchval(
                "SELECT count(*) FROM orders WHERE status NOT IN ('ready_to_ship', 'failed')"),
            "failed_without_reason": await conn.fetchval(
                "SELECT count(*) FROM orders WHERE status = 'failed' AND coalesce(status_reason, '') = ''"),
            "shipped": await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'ready_to_ship'"),
            "emails": await conn.fetchval(
                "SELECT count(*) FROM email_log WHERE kind = 'order_confirmation' AND status = 'sent'"),
            "emails_per_order_max": await conn.fetchval(
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM email_log GROUP BY order_id) x"),
            # Every e-mail an order caused carries the order's correlation id (the trail's key).
            "emails_off_the_trail": await conn.fetchval(
                """SELECT count(*) FROM email_log e JOIN orders o ON o.id = e.order_id
                   WHERE e.correlation_id IS DISTINCT FROM o.correlation_id"""),
            "reserved_mismatch": await conn.fetchval(
                """SELECT count(*) FROM inventory i WHERE i.reserved_quantity <>
                   coalesce((SELECT sum(quantity) FROM inventory_reservations r WHERE r.product_id = i.product_id), 0)
                   OR i.reserved_quantity < 0 OR i.reserved_quantity > i.quantity"""),
        }
    finally:
        await conn.close()


FLOW = ["pending", "reserved", "paid", "allocated", "processing", "label_created",
        "ready_to_ship"]


def _one_orders_story_is_whole(settings: Settings) -> None:
    """`shopflow trace`'s view of a shipped order: every status, its events and its e-mail."""
    async def story() -> tuple[dict[str, object], list[TrailEntry], list[object]]:
        conn = await db.connect(settings.database_url or "")
        try:
            order_id = await conn.fetchval(
                "SELECT min(id) FROM orders WHERE status = 'ready_to_ship'")
            order, entries = await load_trail(conn, order_id)
            # The trace finds e-mails by correlation id OR order id; the row must carry the id.
            email_cids = [r["correlation_id"] for r in await conn.fetch(
                "SELECT correlation_id FROM email_log WHERE order_id = $1", order_id)]
            cid = await conn.fetchval("SELECT correlation_id FROM orders WHERE id = $1", order_id)
            assert email_cids == [cid], (email_cids, cid)
            return order, entries, email_cids
        finally:
            await conn.close()

    _order, entries, _ = asyncio.run(story())
    statuses = [e.step.split("->")[-1].strip() for e in entries if e.source == "status"]
    assert statuses == FLOW, statuses
    assert [e for e in entries if e.source == "email"], "the confirmation e-mail is in the story"
    assert len([e for e in entries if e.source == "event"]) >= len(FLOW) - 1


SUPERVISORD_CONF = Path(__file__).resolve().parents[2] / "supervisord.conf"


def _conf_sections(kind: str) -> list[str]:
    """Names of supervisord.conf's sections of one kind (``program:``, ``eventlistener:``)."""
    conf = configparser.RawConfigParser()
    conf.read(SUPERVISORD_CONF)
    return [title.split(":", 1)[1] for title in conf.sections() if title.startswith(kind)]


def _spawned(log: str) -> dict[str, list[int]]:
    """Every process supervisord's log says it spawned: name -> pids (one per incarnation)."""
    out: dict[str, list[int]] = {}
    for name, pid in re.findall(r"spawned: '([^']+)' with pid (\d+)", log):
        out.setdefault(name, []).append(int(pid))
    return out


def _group_alive(pid: int) -> bool:
    """True while the process or any process of its group (supervisord makes one each) runs."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid was reused by another user's process group
        return False
    return True


async def _empty_database(database_url: str) -> None:
    """Drop and re-create the test's database with nothing in it (no migrations, no tables)."""
    base, _, name = database_url.rpartition("/")
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


@pytest.mark.slow
def test_up_once_replays_300_real_orders_to_an_outcome_each(settings: Settings) -> None:
    asyncio.run(_empty_database(settings.database_url or ""))
    settings = replace(settings, http_port=free_port(), warehouse_sim_port=free_port(),
                       api_processes=2, email_workers=1,
                       job_backoff_ms=200)
    env = {**os.environ, **settings.to_env()}
    summary_path = settings.var_dir / "summary.json"
    done = subprocess.run([SHOPFLOW, "up", "--once", "--limit", str(LIMIT), "--day-s", "0.005",
                           "--timeout-s", "240", "--summary-json", str(summary_path)],
                          check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ShopFlow replay summary" in done.stdout
    assert "latency (create → ready_to_ship)" in done.stdout
    assert "pipeline (paid → ready_to_ship)" in done.stdout
    facts = asyncio.run(_facts(settings))
    summary = json.loads(summary_path.read_text())
    assert summary["orders"] == LIMIT and summary["complete"] is True
    # The pipeline figures cover exactly the orders that got from paid to ready_to_ship.
    pipeline = summary["pipeline"]
    assert pipeline["orders"] == facts["shipped"]
    assert pipeline["throughput"] == pytest.approx(pipeline["orders"] / pipeline["span_s"])
    p50, p95, p99 = (pipeline["latency_ms"][k] for k in ("p50", "p95", "p99"))
    assert 0 < p50 <= p95 <= p99 <= pipeline["span_s"] * 1000
    assert p99 <= summary["latency_ms"]["p99"]  # paid comes after created
    assert facts["orders"] == LIMIT
    assert facts["open"] == 0
    assert facts["failed_without_reason"] == 0
    assert facts["emails"] == facts["shipped"]  # every paid order: exactly one e-mail
    assert facts["emails_per_order_max"] == 1
    assert facts["emails_off_the_trail"] == 0
    assert facts["reserved_mismatch"] == 0
    _one_orders_story_is_whole(settings)
    eml = list(Path(settings.mail_dir).glob("*.eml"))
    assert len(eml) == facts["shipped"]
    # supervisord started every program of supervisord.conf and stopped each cleanly
    # (exit status 0); no process it started, nor anything in their groups, is left.
    log = (settings.var_dir / "log" / "supervisord.log").read_text()
    spawned = _spawned(log)
    for program in _conf_sections("program:"):
        ran = [name for name in spawned if name == program or name.startswith(f"{program}-")]
        assert ran, f"program {program} never ran"
        for name in ran:
            assert f"stopped: {name} (exit status 0)" in log, name
    assert {"api-0", "api-1", "email-worker-0", "scheduler-0"} <= set(spawned)
    left = [(name, pid) for name, pids in spawned.items() for pid in pids if _group_alive(pid)]
    assert left == [], f"processes of the tree still running: {left}"
