"""Chaos: real orders flow through the supervised process tree while one thing breaks.

Each test starts its own Redis and PostgreSQL (so it may restart them), the
repository's supervisord.conf with the real programs, and replays real CDNOW
orders through the HTTP API. Mid-run it injects one fault, then checks that
after recovery every order has exactly one outcome, no e-mail went out twice,
the inventory invariants hold, no job is dead or lost, and every program is
RUNNING again. Time to recover is printed and appended to
``var/chaos-recovery.jsonl`` of the test (see BENCHMARKS.md).

Run alone with ``ops/dev test -m chaos``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from supervisor.xmlrpc import SupervisorTransport

from actors.demo.catalog import load_orders, seed
from actors.demo.replay import Replay, Summary
from actors.demo.up import start_supervisord, stop_supervisord, wait_healthy
from runtime import db, embedded
from runtime.broker import ALL_QUEUES
from runtime.settings import Settings
from runtime.tokens import staff_token
from tests.support import free_port, wait_until

pytestmark = pytest.mark.chaos

ORDERS = 200
DAY_S = 1.0  # the first 200 orders span 8 days of data: about 8 s of steady load


@dataclass
class Tree:
    """A running process tree on servers this test owns."""

    settings: Settings
    paths: embedded.EmbeddedPaths
    supervisord: subprocess.Popen[bytes]

    def rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.settings.var_dir}/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def pid_of(self, program: str) -> int:
        return int(self.rpc().getProcessInfo(program)["pid"])

    def all_running(self) -> bool:
        return all(p["statename"] == "RUNNING" for p in self.rpc().getAllProcessInfo())

    def restart_redis(self) -> None:
        embedded.stop_redis(self.paths, self.settings.embedded_redis_port)
        embedded.ensure_redis(self.paths, self.settings.embedded_redis_port)

    def restart_postgres(self) -> None:
        embedded.stop_postgres(self.paths)
        embedded.ensure_postgres(self.paths, self.settings.embedded_pg_port)


async def _prepare(settings: Settings) -> None:
    conn = await db.connect(settings.database_url or "")
    try:
        await db.migrate(conn)
        await seed(conn, load_orders(limit=ORDERS))
    finally:
        await conn.close()


@pytest.fixture
def tree() -> Iterator[Tree]:
    var = Path(tempfile.mkdtemp(prefix="shopflow-chaos-"))
    base = Settings.from_env({"SHOPFLOW_VAR_DIR": str(var)})
    settings = replace(
        base, embedded_redis_port=free_port(), embedded_pg_port=free_port(), http_port=free_port(),
        warehouse_sim_port=free_port(), api_processes=2, email_workers=1, job_backoff_ms=200, broker_heartbeat_timeout_ms=3_000,
        broker_maintenance_chance=200_000, outbox_poll_s=0.2, namespace="chaos",
    )
    paths = embedded.EmbeddedPaths(var)
    settings = embedded.ensure_services(settings)
    asyncio.run(_prepare(settings))
    proc = start_supervisord(settings)
    t = Tree(settings, paths, proc)
    try:
        wait_healthy(settings, proc)
        yield t
    finally:
        stop_supervisord(proc)
        embedded.stop_redis(paths, settings.embedded_redis_port)
        embedded.stop_postgres(paths)
        embedded.remove_data(paths)


class Load:
    """The replay running in a thread, with a way to see progress from the test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.summary: Summary | None = None
        self.error: BaseException | None = None
        self.replay: Replay | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = asyncio.run(self._replay())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which re-raises it
            self.error = exc

    async def _replay(self) -> Summary:
        import redis.asyncio as aioredis

        pool = await db.create_pool(self.settings.database_url or "", min_size=1, max_size=3)
        client = aioredis.Redis.from_url(self.settings.redis_url or "")
        try:
            self.replay = Replay(f"http://127.0.0.1:{self.settings.http_port}", pool, client,
                                 self.settings.namespace, load_orders(limit=ORDERS), DAY_S,
                                 timeout_s=240, progress_to=None,
                                 token=staff_token(self.settings, 3600))
            return await self.replay.run()
        finally:
            await client.aclose()
            await pool.close()

    def done_count(self) -> int:
        return len(self.replay.state.done) if self.replay else 0

    def finish(self) -> Summary:
        self.thread.join(300)
        if self.error:
            raise self.error
        assert self.summary is not None
        return self.summary


async def _check_outcomes(settings: Settings) -> None:
    conn = await db.connect(settings.database_url or "")
    try:
        assert await conn.fetchval("SELECT count(*) FROM orders") == ORDERS
        assert await conn.fetchval(
            "SELECT count(*) FROM orders WHERE status NOT IN ('ready_to_ship', 'failed')") == 0
        assert await conn.fetchval(
            """SELECT count(*) FROM (SELECT order_id FROM order_status_history
                WHERE to_status IN ('ready_to_ship', 'failed') GROUP BY order_id HAVING count(*) <> 1) x""") == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM (SELECT order_id FROM email_log GROUP BY order_id HAVING count(*) > 1) x") == 0
        assert await conn.fetchval(
            """SELECT count(*) FROM inventory i WHERE i.reserved_quantity <>
               coalesce((SELECT sum(quantity) FROM inventory_reservations r WHERE r.product_id = i.product_id), 0)""") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        await conn.close()


def _emails_settled(settings: Settings) -> bool:
    """Every shipped order's e-mail is recorded as sent (an outage can delay that, not skip it)."""
    async def q() -> bool:
        conn = await db.connect(settings.database_url or "")
        try:
            sent = await conn.fetchval("SELECT count(*) FROM email_log WHERE status = 'sent'")
            shipped = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'ready_to_ship'")
            return bool(sent == shipped)
        finally:
            await conn.close()
    return asyncio.run(q())


async def _shipped(settings: Settings) -> int:
    conn = await db.connect(settings.database_url or "")
    try:
        return int(await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'ready_to_ship'"))
    finally:
        await conn.close()


def _no_dead_jobs(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ns = f"{settings.namespace}-jobs"
    dead = {q: client.zcard(f"{ns}:{q}.XQ") for q in ALL_QUEUES}
    assert sum(dead.values()) == 0, dead


def _record(settings: Settings, fault: str, recover_s: float) -> None:
    line = json.dumps({"fault": fault, "recover_s": round(recover_s, 2)})
    print(f"\nchaos: {line}")
    with (settings.var_dir / "chaos-recovery.jsonl").open("a") as fh:
        fh.write(line + "\n")
    out = os.environ.get("SHOPFLOW_CHAOS_REPORT")
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def _kill(program: str) -> Callable[[Tree], None]:
    def fault(tree: Tree) -> None:
        os.kill(tree.pid_of(program), signal.SIGKILL)
    return fault


FAULTS: dict[str, Callable[[Tree], None]] = {
    "sigkill api-0": _kill("api:api-0"),
    "sigkill email-worker": _kill("email-worker:email-worker-0"),
    "sigkill inventory-worker": _kill("inventory-worker"),
    "sigkill flow-worker": _kill("flow-worker"),
    "sigkill agents-worker": _kill("agents-worker"),
    "sigkill scheduler": _kill("scheduler:scheduler-0"),
    "sigkill stock-sync": _kill("stock-sync"),
    "redis restart": Tree.restart_redis,
    "postgresql restart": Tree.restart_postgres,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_orders_survive(tree: Tree, fault: str) -> None:
    load = Load(tree.settings)
    load.thread.start()
    wait_until(lambda: load.done_count() >= 20 or not load.thread.is_alive(), 120, "steady load")
    assert load.thread.is_alive(), "the load ended before the fault"
    before = load.done_count()
    hit = time.monotonic()
    FAULTS[fault](tree)
    wait_until(lambda: load.done_count() > before or not load.thread.is_alive(), 120,
               "the first order completed after the fault")
    recover_s = time.monotonic() - hit
    summary = load.finish()
    assert summary.complete, summary.render()
    asyncio.run(_check_outcomes(tree.settings))
    wait_until(lambda: _emails_settled(tree.settings), 120, "every confirmation e-mail recorded as sent",
               every_s=0.5)
    assert len(list((tree.settings.var_dir / "mail").glob("*.eml"))) == \
        asyncio.run(_shipped(tree.settings))
    _no_dead_jobs(tree.settings)
    wait_until(tree.all_running, 60, "every program RUNNING again")
    _record(tree.settings, fault, recover_s)
