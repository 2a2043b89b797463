"""The repo's supervisord.conf under the real supervisord.

The programs under test are the repo's own sections, copied verbatim from
supervisord.conf (inventory-worker running the real ``shopflow worker``, the
``supervisor-events`` listener); the FATAL case copies the stock-sync section
with a command that exits at once. Waits are on supervisord's XML-RPC state,
Redis Streams (XREAD BLOCK) and the database, each with a deadline.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from actors.inventory.messages import RESERVE_STOCK
from actors.orders import service as orders
from runtime import db
from runtime.broker import setup_broker
from runtime.cli import build_parser
from runtime.settings import Settings
from runtime.tree import SUPERVISORD_SOCKET, render_tree, supervisord_proxy, tree_snapshot
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[3]
CONF = REPO / "supervisord.conf"
# Process kinds of DESIGN.md section 2 and the command each program runs.
PROCESS_KINDS = {
    "api": "web", "email-worker": "worker --kind email",
    "inventory-worker": "worker --kind inventory", "agents-worker": "worker --kind agents",
    "flow-worker": "worker --kind flow", "scheduler": "scheduler", "stock-sync": "stock-sync",
}
WORKER_GRACEFUL_STOP_S = 20  # runtime.worker.GRACEFUL_STOP_MS
ORDERS = 6

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


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
    for section in conf.sections():
        if section.startswith("program:"):  # may have children: stop and kill the group
            assert conf[section]["stopasgroup"] == conf[section]["killasgroup"] == "true"


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


def test_conf(tmp_path: Path) -> Path:
    """The repo's sections for the programs under test, plus an instantly-exiting one."""
    conf = repo_conf()
    keep = {"supervisord", "unix_http_server", "rpcinterface:supervisor", "supervisorctl",
            "program:inventory-worker", "eventlistener:supervisor-events"}
    for section in conf.sections():
        if section not in keep and section != "program:stock-sync":
            conf.remove_section(section)
    crasher = dict(conf["program:stock-sync"])
    conf.remove_section("program:stock-sync")
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
            reply = client.xread({key: "0"}, count=1, block=2000)
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


async def seed_orders(settings: Settings) -> list[int]:
    conn = await db.connect(settings.database_url or "")
    try:
        await conn.execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ana', 'a@x.test')")
        await conn.execute("INSERT INTO products (id, sku, name, price_cents) VALUES (1, 's1', 'CD', 999)")
        await conn.execute("INSERT INTO inventory (product_id, quantity) VALUES (1, 1000)")
        ids = []
        for _ in range(ORDERS):
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


@pytest.fixture
def supervisord(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    conf = test_conf(tmp_path)
    (settings.var_dir / "log").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.to_env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("supervisord")), "-c", str(conf)],
                            env=env, start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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

    # SIGKILL the worker with jobs queued: it comes back and drains its queue, nothing lost.
    broker = setup_broker(settings)
    try:
        for order_id in order_ids:
            RESERVE_STOCK.send(broker, order_id)
    finally:
        broker.close()
    _, old_pid = state_of(settings, "inventory-worker")
    os.kill(old_pid, signal.SIGKILL)
    exited = next_entry(client, f"{settings.namespace}:events:supervision")
    assert exited["type"] == "process.exited"
    wait_until(lambda: state_of(settings, "inventory-worker")[0] == "RUNNING"
               and state_of(settings, "inventory-worker")[1] != old_pid, 30,
               "inventory-worker back with a new pid")
    wait_until(lambda: set(asyncio.run(statuses(settings))) == {"reserved"}, 60,
               "every order reserved after the kill")

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
