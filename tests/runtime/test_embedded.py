"""Embedded servers: a running one is reused, never started twice; with URLs set, nothing starts.

Real servers: a fresh embedded Redis per test in its own var dir (it starts
in milliseconds) and the session's embedded PostgreSQL for reuse.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runtime import embedded
from runtime.embedded import EmbeddedPaths, StartedServices
from runtime.errors import ServiceError
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


def test_an_interrupted_start_stops_the_redis_it_had_started(
        var_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while PostgreSQL starts (its first start takes seconds): the caller never gets
    the Redis started a moment before, so start_services must not leave it running."""
    port = var_settings.embedded_redis_port

    def interrupted(paths: EmbeddedPaths, pg_port: int) -> tuple[str, bool]:
        assert http_ready(port)  # Redis is up by now
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "start_postgres", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.start_services(var_settings)
    assert not http_ready(port), "the Redis started before the interrupt was left running"


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


# One `start_services` in a child process: waits for the go file, then starts or reuses.
_STARTER = """
import json, os, sys, time
from pathlib import Path
from runtime import embedded
from runtime.settings import Settings
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
resolved, started = embedded.start_services(Settings.from_env(os.environ))
print(json.dumps({"urls": [resolved.redis_url, resolved.database_url],
                  "started": [started.redis, started.postgres]}))
"""


@pytest.mark.slow
def test_two_commands_starting_at_once_in_one_var_dir_start_one_server_each() -> None:
    """Two processes without URLs race to start the embedded servers of one var dir (both
    released at the same moment): one starts each server, the other waits on the var dir's
    lock and reuses it; both get the URLs. A real PostgreSQL is initialised, so the var dir
    is outside pytest's temp root (PostgreSQL runs as another user there, see conftest)."""
    paths = EmbeddedPaths(Path(tempfile.mkdtemp(prefix="shopflow-test-race-")))
    rport, pport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env |= {"SHOPFLOW_VAR_DIR": str(paths.root), "SHOPFLOW_EMBEDDED_REDIS_PORT": str(rport),
            "SHOPFLOW_EMBEDDED_PG_PORT": str(pport)}
    go = paths.root / "go"
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, str(go)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        go.touch()
        answers = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            answers.append(json.loads(out.strip().splitlines()[-1]))
        assert answers[0]["urls"] == answers[1]["urls"] == [
            f"redis://127.0.0.1:{rport}/0",
            f"postgresql://postgres@127.0.0.1:{pport}/{embedded.PG_DATABASE}"]
        # Exactly one of the two started each server; the other reused it.
        assert sorted(a["started"][0] for a in answers) == [False, True]
        assert sorted(a["started"][1] for a in answers) == [False, True]
        assert http_ready(rport) and http_ready(pport)
        redis_log = (paths.redis_dir / "redis.log").read_text()
        assert redis_log.count("Ready to accept connections") == 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        embedded.stop_redis(paths, rport)
        embedded.stop_postgres(paths)
        embedded.remove_data(paths)


def _raw(port: int, command: bytes) -> bytes:
    """One raw RESP command and its reply line (no client library between us and valkey)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(command)
        return sock.recv(256)


@pytest.mark.slow
def test_redis_counts_as_started_only_once_it_has_loaded_its_append_only_file(
        var_settings: Settings) -> None:
    """A restarted valkey opens its port before its AOF is loaded and answers -LOADING until
    then. valkey's own debug setting ``key-load-delay`` slows the load (a few thousand keys
    take about a second) so that window is wide enough to see: right after the port opens the
    server says LOADING; the wait gives up with the log file named when the load outlasts its
    timeout, and once it returns the very next command gets data, not LOADING."""
    paths, port = EmbeddedPaths(var_settings.var_dir), var_settings.embedded_redis_port
    embedded.start_redis(paths, port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(b"SET k%d v\r\n" % i for i in range(5000)))
        replies = b""
        while replies.count(b"\r\n") < 5000:
            replies += sock.recv(65536)
    assert embedded.stop_redis(paths, port)
    subprocess.run([str(embedded.redis_binary()), "--port", str(port), "--bind", "127.0.0.1",
                    "--dir", str(paths.redis_dir), "--appendonly", "yes", "--daemonize", "yes",
                    "--pidfile", str(paths.redis_pidfile), "--logfile", str(paths.redis_log),
                    "--save", "", "--key-load-delay", "200"], check=True)
    deadline = time.monotonic() + 30
    while not http_ready(port):
        assert time.monotonic() < deadline, "the restarted valkey never opened its port"
        time.sleep(0.01)
    assert _raw(port, b"PING\r\n").startswith(b"-LOADING")  # the window this is about

    with pytest.raises(ServiceError) as too_short:
        embedded._wait_redis_ready(port, paths.redis_log, timeout_s=0.2)
    message = str(too_short.value)
    assert "LOADING" in message and str(paths.redis_log) in message and "\n" not in message

    embedded._wait_redis_ready(port, paths.redis_log)
    assert _raw(port, b"GET k4999\r\n") == b"$1\r\nv\r\n"
