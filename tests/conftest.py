"""Test fixtures: real Redis and real PostgreSQL for every test.

One embedded Redis and one embedded PostgreSQL per test session (started from
the PyPI wheels, data in a temporary directory), or the servers named by
``TEST_REDIS_URL`` / ``TEST_DATABASE_URL`` when set. Each test gets its own
database (a copy of a migrated template, so it is fast) and its own Redis key
namespace, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import values

from runtime import db, embedded
from runtime.settings import Settings

TEMPLATE_DB = "shopflow_test_template"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin_url(database_url: str, dbname: str) -> str:
    base, _, _ = database_url.rpartition("/")
    return f"{base}/{dbname}"


async def _build_template(server_url: str) -> None:
    admin = await asyncpg.connect(_admin_url(server_url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await admin.close()
    conn = await db.connect(_admin_url(server_url, TEMPLATE_DB))
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
def _metrics_mode_per_test() -> Iterator[None]:
    """Undo prometheus-client's process-wide multiprocess switch after each test.

    ``runtime.metrics.get_metrics`` flips the value class for the whole
    process; without this, metrics a later test builds on its own registry
    would read values left in the earlier test's files.
    """
    yield
    values.ValueClass = values.MutexValue
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(redis_url, postgres server url) for the whole session, migrated template ready."""
    redis_url = os.environ.get("TEST_REDIS_URL")
    database_url = os.environ.get("TEST_DATABASE_URL")
    started = None
    if not (redis_url and database_url):
        # Not under pytest's temp root: another pytest session on the machine can
        # reset its permissions, and PostgreSQL runs as another user here.
        var = Path(tempfile.mkdtemp(prefix="shopflow-test-"))
        paths = embedded.EmbeddedPaths(var)
        rport, pport = _free_port(), _free_port()
        redis_url = redis_url or embedded.ensure_redis(paths, rport)
        database_url = database_url or embedded.ensure_postgres(paths, pport)
        started = (paths, rport)
    asyncio.run(_build_template(database_url))
    yield redis_url, database_url
    if started is not None:
        paths, rport = started
        embedded.stop_redis(paths, rport)
        embedded.stop_postgres(paths)
        embedded.remove_data(paths)


@pytest.fixture
def settings(servers: tuple[str, str], tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: its own database and its own Redis namespace."""
    redis_url, server_url = servers
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await asyncpg.connect(_admin_url(server_url, "postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
        finally:
            await admin.close()

    async def drop() -> None:
        admin = await asyncpg.connect(_admin_url(server_url, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    base = Settings.from_env({"SHOPFLOW_VAR_DIR": str(tmp_path / "var")})
    yield replace(
        base,
        redis_url=redis_url,
        database_url=_admin_url(server_url, name),
        namespace=f"sf{name}",
        job_backoff_ms=100,
        broker_heartbeat_timeout_ms=3_000,
        broker_maintenance_chance=200_000,
        outbox_poll_s=0.2,
        # Processes that serve a simulator themselves (no WAREHOUSE_URL / CARRIER_URL)
        # get ports of their own: tests of other sessions may run on this machine.
        warehouse_sim_port=_free_port(),
        carrier_sim_port=_free_port(),
        # Incidents resolve at the first clear check unless a test is about the hysteresis.
        alert_resolve_after_s=0,
    )
    asyncio.run(drop())


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on the test's database, on the test's event loop."""
    p = await db.create_pool(settings.database_url or "", min_size=1, max_size=5)
    yield p
    await p.close()
