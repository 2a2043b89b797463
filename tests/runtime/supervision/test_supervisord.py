"""The repo's supervisord.conf: its rules (static, fast) and under the real supervisord (chaos).

The static checks read the file only and run with the rest of the suite. The
chaos tests run the repo's own sections, copied verbatim from
supervisord.conf (inventory-worker running the real ``shopflow worker``, the
``supervisor-events`` listener); the FATAL case copies the stock-sync section
with a command that exits at once. Waits are on supervisord's XML-RPC state,
Redis Streams (XREAD BLOCK), the worker's log and the database, each with a
deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from actors.inventory.messages import RESERVE_STOCK
from actors.orders import service as orders
from runtime import db
from runtime.broker import QUEUE_INVENTORY, setup_broker
from runtime.cli import build_parser
from runtime.settings import DEFAULT_WORKER_STOP_S, Settings
from runtime.tree import SUPERVISORD_SOCKET, render_tree, supervisord_proxy, tree_snapshot
from tests.support import queue_counts, wait_until

REPO = Path(__file__).resolve().parents[3]
CONF = REPO / "supervisord.conf"
# Process kinds of DESIGN.md section 2 and the command each program runs.
PROCESS_KINDS = {
    "api": "web", "email-worker": "worker --kind email",
    "inventory-worker": "worker --kind inventory", "agents-worker": "worker --kind agents",
    "flow-worker": "worker --kind flow", "scheduler": "scheduler", "stock-sync": "stock-sync",
}
# A worker's whole graceful stop (SHOPFLOW_WORKER_STOP_S): supervisord must wait longer.
WORKER_GRACEFUL_STOP_S = DEFAULT_WORKER_STOP_S
ORDERS = 6
# Enough that some are still queued while the worker's threads all hold one.
ORDERS_IN_FLIGHT_CASE = 12

# Only the tests that run supervisord are chaos; the static checks are not.
chaos = [pytest.mark.chaos, pytest.mark.slow]


def repo_conf() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read(CONF)
    return parser


def registered(parser: argparse.ArgumentParser, command: str) -> bool:
    """True when ``shopflow COMMAND`` parses (the owner's code is installed)."""
    try:
        parser.parse_args(shlex.split(command))
    except SystemExit:
        return False
    return True


def test_every_process_kind_is_a_bounded_restarting_program() -> None:
    conf = repo_conf()
    programs = {s.split(":", 1)[1]: conf[s] for s in conf.sections()
                if s.startswith(("program:", "eventlistener:"))}
    parser = build_parser()
    for kind, command in PROCESS_KINDS.items():
        if registered(parser, command):  # kinds whose command has landed must be run
            assert kind in programs, f"no [program:{kind}] for `shopflow {command}`"
    assert programs["api"]["numprocs"] == "%(ENV_SHOPFLOW_API_PROCESSES)s"
    assert programs["email-worker"]["numprocs"] == "%(ENV_SHOPFLOW_EMAIL_WORKERS)s"
    assert "PROCESS_STATE_FATAL" in programs["supervisor-events"]["events"]
    for name, section in programs.items():
        assert section["autorestart"] == "true", name
        assert int(section.get("startsecs", "1")) > 0, name  # supervisord's defaults
        assert 0 < int(section.get("startretries", "3")) <= 10, name
        assert section.get("stopsignal", "TERM") == "TERM", name
        if name.endswith("-worker"):
            assert int(section["stopwaitsecs"]) > WORKER_GRACEFUL_STOP_S, name
    for title in conf.sections():
        if title.startswith("program:"):  # may have children: stop and kill the group
            assert conf[title]["stopasgroup"] == conf[title]["killasgroup"] == "true"


def test_every_program_runs_a_command_that_exists() -> None:
    """A missing command would crash-loop (and under load never even reach FATAL)."""
    parser = build_parser()
    conf = repo_conf()
    for section in conf.sections():
        if section.startswith(("program:", "eventlistener:")):
            argv = shlex.split(conf[section]["command"])
            assert argv[0] == "shopflow", section
            assert registered(parser, shlex.join(argv[1:])), (
                f"{section}: `{conf[section]['command']}` is not a shopflow command")


def test_conf(tmp_path: Path, with_crasher: bool = True) -> Path:
    """The repo's sections for the programs under test, plus (maybe) an instantly-exiting one."""
    conf = repo_conf()
    keep = {"supervisord", "unix_http_server", "rpcinterface:supervisor", "supervisorctl",
            "program:inventory-worker", "eventlistener:supervisor-events"}
    for section in conf.sections():
        if section not in keep and section != "program:stock-sync":
            conf.remove_section(section)
    crasher = dict(conf["program:stock-sync"])
    conf.remove_section("program:stock-sync")
    if with_crasher:
        conf["program:crasher"] = {**crasher, "command": "sh -c 'exit 3'", "startsecs": "1",
                                   "startretries": "1"}
    path = tmp_path / "supervisord.conf"
    with path.open("w") as f:
        conf.write(f)
    return path


test_conf.__test__ = False  # type: ignore[attr-defined]


def infos(settings: Settings) -> dict[str, dict[str, Any]]:
    try:
        proxy = supervisord_proxy(settings.var_dir / SUPERVISORD_SOCKET)
        return {p["name"]: p for p in proxy.supervisor.getAllProcessInfo()}
    except OSError:
        return {}


def state_of(settings: Settings, name: str) -> tuple[str | None, int]:
    info = infos(settings).get(name)
    return (info["statename"], info["pid"]) if info else (None, 0)


def next_entry(client: redis.Redis, key: str, timeout_s: float = 60) -> dict[str, str]:
    """The first entry of a stream, waiting for it with XREAD BLOCK until the deadline.

    Short blocks in a loop, so a busy or briefly unreachable Redis (other
    tests restart theirs on this machine) delays the answer instead of failing it.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply: Any = client.xread({key: "0"}, count=1, block=2000)
        except (redis.TimeoutError, redis.ConnectionError):
            continue
        if reply:
            _, entries = reply[0]
            return {k.decode(): v.decode() for k, v in entries[0][1].items()}
    raise AssertionError(f"nothing arrived on {key} within {timeout_s}s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def seed_orders(settings: Settings, count: int = ORDERS) -> list[int]:
    conn = await db.connect(settings.database_url or "")
    try:
        await conn.execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ana', 'a@x.test')")
        await conn.execute("INSERT INTO products (id, sku, name, price_cents) VALUES (1, 's1', 'CD', 999)")
        await conn.execute("INSERT INTO inventory (product_id, quantity) VALUES (1, 1000)")
        ids = []
        for _ in range(count):
            order = orders.NewOrder(1, (orders.OrderLine(1, 1),))
            order_id, _ = await orders.create_order(conn, order, RESERVE_STOCK.as_job())
            ids.append(order_id)
        return ids
    finally:
        await conn.close()


async def statuses(settings: Settings) -> list[str]:
    conn = await db.connect(settings.database_url or "")
    try:
        return [r["status"] for r in await conn.fetch("SELECT status FROM orders ORDER BY id")]
    finally:
        await conn.close()


StartSupervisord = Callable[[Path], "subprocess.Popen[bytes]"]


@pytest.fixture
def start_supervisord(settings: Settings) -> Iterator[StartSupervisord]:
    """Start the real supervisord on a conf (as often as a test needs); all stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    (settings.var_dir / "log").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.to_env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(conf: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("supervisord")), "-c", str(conf)],
            env=env, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def supervisord(start_supervisord: StartSupervisord,
                tmp_path: Path) -> subprocess.Popen[bytes]:
    return start_supervisord(test_conf(tmp_path))


@pytest.mark.chaos
@pytest.mark.slow
def test_the_tree_survives_kill_alerts_on_fatal_and_stops_cleanly(
        settings: Settings, supervisord: subprocess.Popen[bytes]) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    order_ids = asyncio.run(seed_orders(settings))
    wait_until(lambda: state_of(settings, "inventory-worker")[0] == "RUNNING", 30,
               "inventory-worker RUNNING")

    # A program that exits at once ends FATAL (not restarted forever) and raises an alert.
    alert = next_entry(client, f"{settings.namespace}:events:alerts")
    assert alert["type"] == "process.fatal"
    assert json.loads(alert["payload"])["processname"] == "crasher"
    assert state_of(settings, "crasher")[0] == "FATAL"

    # SIGKILL the worker while it holds jobs and more are queued (the stock row is
    # locked, so none can finish first): it comes back and drains its queue, nothing lost.
    _, old_pid = state_of(settings, "inventory-worker")
    at_kill = asyncio.run(kill_while_holding_jobs(settings, order_ids, old_pid))
    assert set(at_kill.statuses) == {"pending"}, "the kill must land while work remains"
    assert at_kill.counts.completed == 0
    assert at_kill.counts.active >= 1  # held by the worker when it died
    assert at_kill.counts.waiting + at_kill.counts.active + at_kill.counts.delayed == ORDERS
    exited = next_entry(client, f"{settings.namespace}:events:supervision")
    assert exited["type"] == "process.exited"
    wait_until(lambda: state_of(settings, "inventory-worker")[0] == "RUNNING"
               and state_of(settings, "inventory-worker")[1] != old_pid, 30,
               "inventory-worker back with a new pid")
    wait_until(lambda: set(asyncio.run(statuses(settings))) == {"reserved"}, 60,
               "every order reserved after the kill")
    wait_until(lambda: drained(queue_counts(settings, QUEUE_INVENTORY)), 30,
               "the inventory queue to drain after the restart")
    assert queue_counts(settings, QUEUE_INVENTORY).completed == ORDERS
    moves, reserved, reservation_rows = asyncio.run(reservation_effects(settings))
    assert moves == {order_id: 1 for order_id in order_ids}  # each reserved exactly once
    assert reserved == reservation_rows == ORDERS

    snapshot = tree_snapshot(settings)
    names = {p["name"]: p for p in snapshot["processes"]}
    assert names["inventory-worker"]["state"] == "RUNNING"
    assert names["crasher"]["state"] == "FATAL"
    text = render_tree(snapshot)
    assert text.startswith("supervisord: RUNNING")
    assert "inventory-worker" in text and "FATAL" in text

    # SIGTERM to the whole tree: every program stops, supervisord exits 0, no process left.
    pids = [p["pid"] for p in infos(settings).values() if p["pid"]]
    assert pids
    supervisord.send_signal(signal.SIGTERM)
    assert supervisord.wait(90) == 0
    assert [pid for pid in pids if alive(pid)] == []


@dataclass(frozen=True)
class AtKill:
    """What the tree held when the worker was killed."""

    statuses: list[str]
    counts: Any  # runtime.jobs.store.QueueCounts of the inventory queue


def drained(counts: Any) -> bool:
    """Nothing of the queue is waiting, running or due later."""
    return bool(counts.waiting == counts.active == counts.delayed == 0)


async def kill_while_holding_jobs(settings: Settings, order_ids: list[int], pid: int) -> AtKill:
    """Send the reservations with the stock row locked, SIGKILL ``pid`` once it holds one.

    Returns the orders' statuses and the queue's counts read just before the
    kill; the lock is released after it, so the work is done only after the restart.
    """
    blocker = await db.connect(settings.database_url or "")
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM inventory WHERE product_id = 1 FOR UPDATE")
            broker = setup_broker(settings)
            try:
                for order_id in order_ids:
                    RESERVE_STOCK.send(broker, order_id)
            finally:
                broker.close()
            async with asyncio.timeout(60):
                while await backends_waiting_on_locks(settings) < 1:
                    await asyncio.sleep(0.05)
            seen = AtKill(await statuses(settings),
                          await asyncio.to_thread(queue_counts, settings, QUEUE_INVENTORY))
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(wait_until, lambda: not alive(pid), 10, "the worker to die")
        return seen
    finally:
        await blocker.close()


async def backends_waiting_on_locks(settings: Settings) -> int:
    """Sessions of the test's database blocked on a lock: jobs in flight, held by the test."""
    conn = await db.connect(settings.database_url or "")
    try:
        count: int = await conn.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database() AND wait_event_type = 'Lock'""")
        return count
    finally:
        await conn.close()


async def reservation_effects(settings: Settings) -> tuple[dict[int, int], int, int]:
    """Per order how often it moved to reserved; reserved_quantity; reservation rows."""
    conn = await db.connect(settings.database_url or "")
    try:
        moves = {r["order_id"]: r["n"] for r in await conn.fetch(
            """SELECT o.id AS order_id, count(h.id) AS n FROM orders o
               LEFT JOIN order_status_history h ON h.order_id = o.id AND h.to_status = 'reserved'
               GROUP BY o.id""")}
        reserved = await conn.fetchval("SELECT reserved_quantity FROM inventory WHERE product_id = 1")
        rows = await conn.fetchval("SELECT count(*) FROM inventory_reservations")
        return moves, int(reserved), int(rows)
    finally:
        await conn.close()


def log_says(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


@pytest.mark.chaos
@pytest.mark.slow
def test_sigterm_with_jobs_in_flight_loses_none_and_runs_each_once(
        settings: Settings, start_supervisord: StartSupervisord, tmp_path: Path) -> None:
    """SIGTERM to the whole tree while every worker thread holds a job and more are queued.

    The jobs in flight finish within the stop window, the queued ones are
    handed back, the tree exits 0; after a restart every job has run, and
    each has had its effect exactly once.
    """
    conf = test_conf(tmp_path, with_crasher=False)
    order_ids = asyncio.run(seed_orders(settings, ORDERS_IN_FLIGHT_CASE))
    threads = settings.inventory_concurrency
    worker_log = settings.var_dir / "log" / "inventory-worker.log"
    tree = start_supervisord(conf)
    wait_until(lambda: state_of(settings, "inventory-worker")[0] == "RUNNING", 60,
               "inventory-worker RUNNING")

    async def hold_stock_then(release_when: Callable[[], bool]) -> None:
        """Lock the product's stock row so every reservation blocks in flight, then release."""
        blocker = await db.connect(settings.database_url or "")
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM inventory WHERE product_id = 1 FOR UPDATE")
                broker = setup_broker(settings)
                try:
                    for order_id in order_ids:
                        RESERVE_STOCK.send(broker, order_id)
                finally:
                    broker.close()
                async with asyncio.timeout(60):
                    while await backends_waiting_on_locks(settings) < threads:
                        await asyncio.sleep(0.05)
                tree.send_signal(signal.SIGTERM)  # every thread holds a job right now
                async with asyncio.timeout(60):
                    while not release_when():
                        await asyncio.sleep(0.05)
        finally:
            await blocker.close()

    _, worker_pid = state_of(settings, "inventory-worker")
    asyncio.run(hold_stock_then(lambda: log_says(worker_log, "inventory-worker stopping")))
    assert tree.wait(90) == 0
    assert not alive(worker_pid)
    moves, reserved, _ = asyncio.run(reservation_effects(settings))
    done_before_restart = sum(moves.values())
    assert threads <= done_before_restart < ORDERS_IN_FLIGHT_CASE  # held ones finished
    assert reserved == done_before_restart

    tree = start_supervisord(conf)
    wait_until(lambda: set(asyncio.run(statuses(settings))) == {"reserved"}, 90,
               "every order reserved after the restart")
    moves, reserved, reservation_rows = asyncio.run(reservation_effects(settings))
    assert moves == {order_id: 1 for order_id in order_ids}
    assert reserved == reservation_rows == ORDERS_IN_FLIGHT_CASE
    tree.send_signal(signal.SIGTERM)
    assert tree.wait(90) == 0
