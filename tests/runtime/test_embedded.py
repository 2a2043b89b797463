"""Embedded servers: a running one is reused, never started twice; with URLs set, nothing starts.

Real servers: a fresh embedded Redis per test in its own var dir (it starts
in milliseconds) and the session's embedded PostgreSQL for reuse.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runtime import embedded
from runtime.embedded import EmbeddedPaths, StartedServices
from runtime.settings import Settings
from tests.conftest import SessionServers
from tests.support import free_port, http_ready


def server_pid(pidfile: Path) -> int:
    return int(pidfile.read_text().split()[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def var_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings with no URLs, a fresh var dir and free embedded ports; stops what is left."""
    settings = replace(Settings.from_env({"SHOPFLOW_VAR_DIR": str(tmp_path / "var")}),
                       embedded_redis_port=free_port(), embedded_pg_port=free_port())
    yield settings
    embedded.stop_redis(EmbeddedPaths(settings.var_dir), settings.embedded_redis_port)


def test_a_running_embedded_redis_is_reused_not_started_twice(var_settings: Settings) -> None:
    paths, port = EmbeddedPaths(var_settings.var_dir), var_settings.embedded_redis_port
    url, started = embedded.start_redis(paths, port)
    assert (url, started) == (f"redis://127.0.0.1:{port}/0", True)
    pid = server_pid(paths.redis_pidfile)

    again_url, started_again = embedded.start_redis(paths, port)
    assert (again_url, started_again) == (url, False)
    assert embedded.ensure_redis(paths, port) == url
    assert server_pid(paths.redis_pidfile) == pid and alive(pid)
    # One server ever started on this var dir: its log shows one start-up, no bind failure.
    log = (paths.redis_dir / "redis.log").read_text()
    assert log.count("Ready to accept connections") == 1
    assert "Could not create server TCP listening socket" not in log


def test_a_running_embedded_postgres_is_reused(session_servers: SessionServers) -> None:
    if session_servers.paths is None or session_servers.pg_port is None:
        pytest.skip("TEST_DATABASE_URL is set: no embedded PostgreSQL in this session")
    pidfile = session_servers.paths.pg_dir / "postmaster.pid"
    pid = server_pid(pidfile)
    url, started = embedded.start_postgres(session_servers.paths, session_servers.pg_port)
    assert started is False
    assert url == (f"postgresql://postgres@127.0.0.1:{session_servers.pg_port}/"
                   f"{embedded.PG_DATABASE}")
    assert server_pid(pidfile) == pid and alive(pid)


def test_urls_set_start_nothing(var_settings: Settings) -> None:
    # Nobody listens on these: with URLs given, nothing is started, or even checked.
    given = replace(var_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                    database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/shop")
    resolved, started = embedded.start_services(given)
    assert started == StartedServices(redis=False, postgres=False)
    assert (resolved.redis_url, resolved.database_url) == (given.redis_url, given.database_url)
    assert embedded.ensure_services(given) == resolved
    assert not given.var_dir.exists()  # no data dir, pid file or log was made
    with embedded.running_services(given) as inside:
        assert inside == resolved
    assert not given.var_dir.exists()


def test_running_services_stops_what_it_started_and_only_that(var_settings: Settings,
                                                               servers: tuple[str, str]) -> None:
    """Redis embedded in a fresh var dir; PostgreSQL given by URL (so it is not touched)."""
    settings = replace(var_settings, database_url=servers[1])
    paths, port = EmbeddedPaths(settings.var_dir), settings.embedded_redis_port

    with embedded.running_services(settings) as inside:  # nothing running: it starts Redis
        assert inside.redis_url == f"redis://127.0.0.1:{port}/0"
        pid = server_pid(paths.redis_pidfile)
        assert alive(pid)
    assert not http_ready(port)  # started here, so stopped here

    embedded.ensure_redis(paths, port)  # someone else's Redis on this var dir
    pid = server_pid(paths.redis_pidfile)
    with pytest.raises(RuntimeError, match="inside"), embedded.running_services(settings):
        raise RuntimeError("the command failed inside")
    assert server_pid(paths.redis_pidfile) == pid and alive(pid)  # reused, so left running
    assert http_ready(port)
