"""200 reservations for 50 units, two real worker processes, redelivery and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import redis

from actors.inventory.messages import RESERVE_STOCK
from runtime import db
from runtime.broker import QUEUE_INVENTORY, setup_broker
from runtime.jobs.script import events_stream
from runtime.settings import Settings
from tests.factories import inventory, make_order, make_shop
from tests.support import queue_counts, spawn, stop, wait_until

ORDERS = 200
STOCK = 50
# The job store's totals that count a job as ended (each job ends once: jobs.lua's finish).
ENDED_TOTALS = ("completed", "skipped", "failed", "cancelled", "dead", "removed")


async def _seed(settings: Settings) -> list[int]:
    conn = await db.connect(settings.database_url or "")
    try:
        await make_shop(conn, {1: STOCK}, customers=ORDERS)
        return [await make_order(conn, c, {1: 1}) for c in range(1, ORDERS + 1)]
    finally:
        await conn.close()


def _outcomes(settings: Settings) -> dict[str, int]:
    async def q() -> dict[str, int]:
        conn = await db.connect(settings.database_url or "")
        try:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM orders GROUP BY status")
            return {r["status"]: r["n"] for r in rows}
        finally:
            await conn.close()
    return asyncio.run(q())


def _check_invariants(settings: Settings) -> None:
    async def q() -> None:
        conn = await db.connect(settings.database_url or "")
        try:
            assert await inventory(conn, 1) == (STOCK, STOCK)
            assert await conn.fetchval("SELECT count(*) FROM inventory_reservations") == STOCK
            failed = await conn.fetch("SELECT status_reason FROM orders WHERE status = 'failed'")
            assert len(failed) == ORDERS - STOCK
            assert all(r["status_reason"].startswith("insufficient stock: product 1") for r in failed)
            # One history row per move: nobody was reserved or failed twice.
            assert await conn.fetchval(
                "SELECT count(*) FROM order_status_history WHERE to_status <> 'pending'") == ORDERS
        finally:
            await conn.close()
    asyncio.run(q())


def _drained(settings: Settings) -> bool:
    """Nothing of the inventory queue is waiting, running or due later (retries, delays)."""
    counts = queue_counts(settings, QUEUE_INVENTORY)
    return bool(counts.waiting == counts.active == counts.delayed == 0)


def _workers_that_ran_jobs(settings: Settings) -> set[str]:
    """The worker (broker) ids the job layer's event stream shows starting inventory jobs."""
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    try:
        entries = client.xrange(events_stream(settings.namespace))
    finally:
        client.close()
    payloads = [json.loads(fields["payload"]) for _, fields in entries
                if fields.get("type") == "job.active"]
    return {p["worker"] for p in payloads if p.get("queue") == QUEUE_INVENTORY}


def _says(path: Path, text: str) -> bool:
    """True once ``text`` is in the log at ``path``."""
    try:
        return text in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


def _tcp_ports_of(pid: int) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` holds (Linux /proc): its connections."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _kill_while_holding_a_job(settings: Settings, victim: subprocess.Popen[bytes],
                                    before_kill: Callable[[], object]) -> dict[str, int]:
    """SIGKILL ``victim`` while one of its reservations is mid-transaction.

    The stock row is locked here, so every reservation in flight waits on it;
    once a session of the victim's own (matched by its client port) waits on
    the lock, the victim holds a message for sure. ``before_kill`` then runs
    (the survivor starts), and the victim is killed. Returns the pending
    orders and the queue's active jobs just before the kill; the lock is
    released after it.
    """
    blocker = await db.connect(settings.database_url or "")
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM inventory WHERE product_id = 1 FOR UPDATE")
            async with asyncio.timeout(60):
                while not await _waits_on_a_lock(blocker, _tcp_ports_of(victim.pid)):
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(before_kill)
            pending = await blocker.fetchval("SELECT count(*) FROM orders WHERE status = 'pending'")
            counts = await asyncio.to_thread(queue_counts, settings, QUEUE_INVENTORY)
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
        return {"pending": int(pending), "active": int(counts.active)}
    finally:
        await blocker.close()


async def _waits_on_a_lock(conn: asyncpg.Connection, client_ports: set[int]) -> bool:
    """True when a session from one of ``client_ports`` waits on a lock in this database."""
    waiting = await conn.fetch(
        """SELECT client_port FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'""")
    return any(r["client_port"] in client_ports for r in waiting)


@pytest.fixture
def worker_settings(settings: Settings) -> Iterator[Settings]:
    yield replace(settings, inventory_concurrency=5)


def _send_all(settings: Settings, order_ids: list[int]) -> None:
    broker = setup_broker(settings)
    try:
        for order_id in order_ids:
            RESERVE_STOCK.send(broker, order_id)
    finally:
        broker.close()


@pytest.mark.slow
def test_two_workers_reserve_exactly_the_stock_and_redelivery_changes_nothing(worker_settings: Settings) -> None:
    settings = worker_settings
    order_ids = asyncio.run(_seed(settings))
    workers = [spawn(settings, "worker", "--kind", "inventory", log_name=f"inv{i}") for i in range(2)]
    try:
        _send_all(settings, order_ids)
        wait_until(lambda: _outcomes(settings).get("pending", 0) == 0, 90, "every order to get an outcome")
        assert _outcomes(settings) == {"reserved": STOCK, "failed": ORDERS - STOCK}
        _check_invariants(settings)
        assert len(_workers_that_ran_jobs(settings)) == 2, "both worker processes took messages"
        _send_all(settings, order_ids)  # every message delivered a second time
        wait_until(lambda: _drained(settings), 90, "the redelivered messages to be processed")
        totals = queue_counts(settings, QUEUE_INVENTORY).totals
        ended = sum(totals.get(state, 0) for state in ENDED_TOTALS)
        assert ended == 2 * ORDERS, totals  # every message sent, both rounds, has ended
        assert _outcomes(settings) == {"reserved": STOCK, "failed": ORDERS - STOCK}
        _check_invariants(settings)
    finally:
        for w in workers:
            assert stop(w) == 0


@pytest.mark.chaos
def test_sigkill_of_a_worker_mid_run_loses_nothing(worker_settings: Settings) -> None:
    settings = worker_settings
    order_ids = asyncio.run(_seed(settings))
    # The victim runs alone until it is caught mid-reservation: with the survivor up, the
    # cross-process concurrency limit (5) could leave every permit to the survivor's
    # threads, and the victim would never touch the locked row.
    victim = spawn(settings, "worker", "--kind", "inventory", log_name="victim")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        _send_all(settings, order_ids)
        wait_until(lambda: sum(v for k, v in _outcomes(settings).items() if k != "pending") >= 20,
                   60, "the run to be under way")
        at_kill = asyncio.run(_kill_while_holding_a_job(
            settings, victim,
            lambda: workers.append(spawn(settings, "worker", "--kind", "inventory",
                                         log_name="survivor"))))
        assert at_kill["pending"] > 0, "the kill must land while work remains"
        assert at_kill["active"] >= 1  # the victim held a message when it died
        workers.append(spawn(settings, "worker", "--kind", "inventory", log_name="replacement"))
        # Up before the end, so the restart takes part and its SIGTERM finds it serving.
        wait_until(lambda: _says(settings.var_dir / "replacement.log", "worker inventory-worker started"),
                   90, "the replacement worker to start")
        wait_until(lambda: _outcomes(settings).get("pending", 0) == 0, 120,
                   "every order to get an outcome after the kill")
        wait_until(lambda: _drained(settings), 60, "queues to drain")
        assert _outcomes(settings) == {"reserved": STOCK, "failed": ORDERS - STOCK}
        _check_invariants(settings)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
        for w in workers:
            assert stop(w) == 0
