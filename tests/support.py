"""Helpers for tests that run real runtime processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from runtime.settings import Settings

SHOPFLOW = shutil.which("shopflow") or str(Path(sys.executable).with_name("shopflow"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_http_port(settings: Settings) -> Settings:
    """Settings with a free HTTP port of its own."""
    return replace(settings, http_port=free_port())


def spawn(settings: Settings, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``shopflow ARGS`` with ``settings`` in its environment; logs go to var/."""
    env = {**os.environ, **settings.to_env()}
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.var_dir / f"{log_name or '-'.join(args).replace('/', '_')}.log"
    log = log_path.open("ab")
    return subprocess.Popen([SHOPFLOW, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def spawn_module(settings: Settings, module: str, log_name: str) -> subprocess.Popen[bytes]:
    """Start ``python -m MODULE`` (a test harness around a runtime command) like :func:`spawn`."""
    env = {**os.environ, **settings.to_env()}
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    log = (settings.var_dir / f"{log_name}.log").open("ab")
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-m", module], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """SIGTERM the process and wait for it; SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def http_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def published_root(settings: Settings, process: str, pid: int | None = None,
                   timeout_s: float = 30.0) -> dict[str, Any]:
    """A process's root supervisor as its TreeReporter published it, once it and every child run.

    Waits (polling Redis until the deadline) for the hash of ``process`` with
    ``pid`` (this process by default), as ``shopflow tree`` reads it.
    """
    from runtime.tree import published_processes

    wanted_pid = os.getpid() if pid is None else pid
    client = redis.Redis.from_url(settings.redis_url or "")
    found: list[dict[str, Any]] = []

    def running() -> bool:
        for entry in published_processes(client, settings.namespace):
            if entry["process"] == process and entry["pid"] == wanted_pid and entry["supervisors"]:
                root: dict[str, Any] = entry["supervisors"][0]
                if (root["state"] == "running" and root["children"]
                        and all(c["state"] == "running" for c in root["children"])):
                    found[:] = [root]
                    return True
        return False

    try:
        wait_until(running, timeout_s, f"{process} publishing its root with every child running")
    finally:
        client.close()
    return found[0]


def next_supervision_event(settings: Settings, kind: str, child: str | None = None,
                           stream: str = "supervision", timeout_s: float = 30.0
                           ) -> dict[str, Any]:
    """The first ``supervision.<kind>`` event (of ``child``) on a Redis stream, by XREAD BLOCK."""
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    key = f"{settings.namespace}:events:{stream}"
    last = "0"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            reply: Any = client.xread({key: last}, count=100, block=1000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    payload: dict[str, Any] = json.loads(fields["payload"])
                    if fields["type"] == f"supervision.{kind}" and (
                            child is None or payload["child"] == child):
                        return payload
    finally:
        client.close()
    raise AssertionError(f"no supervision.{kind} event for {child} on {key} in {timeout_s}s")


def queue_counts(settings: Settings, queue: str) -> Any:
    """The job layer's counts of ``queue`` (a :class:`runtime.jobs.store.QueueCounts`).

    Read through :class:`~runtime.jobs.store.JobStore`, as the dashboard and
    ``shopflow jobs`` read them, so a test never depends on the broker's raw keys.
    """
    import asyncio

    import redis.asyncio as aioredis

    from runtime.jobs.script import JobKeys, events_stream
    from runtime.jobs.store import JobStore

    async def read() -> Any:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            keys = JobKeys(f"{settings.namespace}-jobs", events_stream(settings.namespace))
            [counts] = await JobStore(client, keys, [queue]).counts()
            return counts
        finally:
            await client.aclose()

    return asyncio.run(read())


def queues_table_rows(text: str) -> dict[str, dict[str, str]]:
    """``shopflow jobs queues``' tables read back: queue -> column -> cell, both tables merged.

    Each table starts with a header ``queue (now)`` / ``queue (totals)`` and its
    column names; a blank line ends it; the note after the tables is skipped.
    """
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for line in text.splitlines():
        if line.startswith("queue ("):
            columns = line.split(")", 1)[1].split()
        elif not line.strip():
            columns = []
        elif columns:
            name, *cells = line.split()
            rows.setdefault(name, {}).update(zip(columns, cells, strict=True))
    return rows
