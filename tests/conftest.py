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
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class SessionServers:
    """The session's servers; the ports are set for those it started embedded."""

    redis_url: str
    database_url: str
    paths: embedded.EmbeddedPaths | None = None
    redis_port: int | None = None
    pg_port: int | None = None


@pytest.fixture(scope="session")
def session_servers() -> Iterator[SessionServers]:
    """Redis and PostgreSQL for the whole session: TEST_*_URL, or embedded ones started here."""
    redis_url = os.environ.get("TEST_REDIS_URL")
    database_url = os.environ.get("TEST_DATABASE_URL")
    if redis_url and database_url:
        yield SessionServers(redis_url, database_url)
        return
    # Not under pytest's temp root: another pytest session on the machine can
    # reset its permissions, and PostgreSQL runs as another user here.
    paths = embedded.EmbeddedPaths(Path(tempfile.mkdtemp(prefix="shopflow-test-")))
    rport = None if redis_url else _free_port()
    pport = None if database_url else _free_port()
    if rport is not None:
        redis_url = embedded.ensure_redis(paths, rport)
    if pport is not None:
        database_url = embedded.ensure_postgres(paths, pport)
    assert redis_url and database_url
    yield SessionServers(redis_url, database_url, paths, rport, pport)
    if rport is not None:
        embedded.stop_redis(paths, rport)
    if pport is not None:
        embedded.stop_postgres(paths)
    embedded.remove_data(paths)


@pytest.fixture(scope="session")
def servers(session_servers: SessionServers) -> tuple[str, str]:
    """(redis_url, postgres server url) for the whole session, migrated template ready."""
    asyncio.run(_build_template(session_servers.database_url))
    return session_servers.redis_url, session_servers.database_url


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
        job_sweep_interval_s=0.5,
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
