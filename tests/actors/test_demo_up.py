"""`shopflow up` stops the embedded servers it started, and never one it only reused.

Real embedded Redis in the test's own var dir; PostgreSQL is given by URL (the
test's own database) so the session's server is never at stake. The command is made to fail once
the servers and the process tree are up (the tree never turns healthy),
which is when its clean-up runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from actors.demo import up
from runtime import embedded
from runtime.embedded import EmbeddedPaths
from runtime.errors import ServiceError
from runtime.settings import Settings
from tests.support import free_port, http_ready


@pytest.fixture
def up_settings(tmp_path: Path, settings: Settings) -> Iterator[Settings]:
    """No REDIS_URL (embedded, fresh var dir, free port); DATABASE_URL set (the test's own)."""
    given = replace(Settings.from_env({"SHOPFLOW_VAR_DIR": str(tmp_path / "var")}),
                    embedded_redis_port=free_port(), database_url=settings.database_url)
    yield given
    embedded.stop_redis(EmbeddedPaths(given.var_dir), given.embedded_redis_port)


@pytest.fixture
def supervisord_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process tree that exits at once and never answers /health."""

    def start_tree(settings: Settings) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "pass"])

    def never_healthy(settings: Settings, proc: subprocess.Popen[bytes]) -> None:
        proc.wait(30)
        raise ServiceError("the tree cannot start (test)")

    monkeypatch.setattr(up, "start_supervisord", start_tree)
    monkeypatch.setattr(up, "wait_healthy", never_healthy)


def run_up(settings: Settings) -> None:
    args = argparse.Namespace(limit=1, day_s=0.0, timeout_s=1.0, data="sample",
                              stock_multiplier=1, once=True)
    with pytest.raises(ServiceError, match="cannot start"):
        up._cmd_up(args, settings)


def test_up_leaves_a_reused_embedded_server_running(up_settings: Settings,
                                                     supervisord_fails: None) -> None:
    paths, port = EmbeddedPaths(up_settings.var_dir), up_settings.embedded_redis_port
    embedded.ensure_redis(paths, port)  # started by someone else (`shopflow services`, say)
    pid = paths.redis_pidfile.read_text().split()[0]
    run_up(up_settings)
    assert http_ready(port), "up stopped a Redis it had only reused"
    assert paths.redis_pidfile.read_text().split()[0] == pid


def test_up_stops_the_embedded_server_it_started(up_settings: Settings,
                                                 supervisord_fails: None) -> None:
    port = up_settings.embedded_redis_port
    assert not http_ready(port)
    run_up(up_settings)
    assert (EmbeddedPaths(up_settings.var_dir).redis_dir / "redis.log").exists()  # it ran
    assert not http_ready(port), "up left running a Redis it started"


@pytest.fixture
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored, as a shell starts a background job (``ops/dev up &``)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_tree_and_the_embedded_server_up_started(
        up_settings: Settings, monkeypatch: pytest.MonkeyPatch, sigint_ignored: None,
        capsys: pytest.CaptureFixture[str], signum: signal.Signals) -> None:
    """``kill PID`` or ``kill -INT PID`` of ``shopflow up`` cleans up like Ctrl-C, even when
    it runs as a background job (whose SIGINT the shell ignores)."""
    trees: list[subprocess.Popen[bytes]] = []

    def start_tree(settings: Settings) -> subprocess.Popen[bytes]:
        trees.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        return trees[-1]

    def signalled_while_waiting(settings: Settings, proc: subprocess.Popen[bytes]) -> None:
        assert http_ready(settings.embedded_redis_port)
        os.kill(os.getpid(), signum)  # the handler raises here, as it would anywhere
        raise AssertionError(f"{signum.name} did not interrupt up")

    monkeypatch.setattr(up, "start_supervisord", start_tree)
    monkeypatch.setattr(up, "wait_healthy", signalled_while_waiting)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    args = argparse.Namespace(limit=1, day_s=0.0, timeout_s=1.0, data="sample",
                              stock_multiplier=1, once=False, summary_json=None)
    assert up._cmd_up(args, up_settings) == 130
    assert trees and trees[0].poll() is not None, "up left its process tree running"
    assert not http_ready(up_settings.embedded_redis_port), "up left running a Redis it started"
    assert "stopped the embedded Redis this command started" in capsys.readouterr().err
    for sig, handler in before.items():
        assert signal.getsignal(sig) is handler, f"up did not give {sig.name} back"


def test_the_health_line_names_each_check_and_why_one_is_not_ok() -> None:
    checks = {"redis": {"ok": True, "latency_ms": 0.41},
              "postgres": {"ok": False, "error": "ConnectionRefusedError: refused"},
              "scheduler": {"ok": True, "detail": "starting: no heartbeat yet", "leader": None}}
    assert up.describe_checks(checks) == (
        "redis ok 0.41 ms, postgres NOT ok: ConnectionRefusedError: refused, "
        "scheduler ok (starting: no heartbeat yet)")
    assert up.describe_checks({"scheduler": {"ok": True, "detail": "ok"}}) == "scheduler ok"


# A process tree that, asked to stop, sends its parent (`up`) a second stop signal, as an
# impatient operator's second Ctrl-C would, and takes a moment before it exits.
_IMPATIENT_TREE = """
import os, signal, sys, time
def stop(*_):
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(0.5)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_stop_signal_while_stopping_does_not_cut_the_way_out(
        up_settings: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    trees: list[subprocess.Popen[str]] = []

    def start_tree(settings: Settings) -> subprocess.Popen[str]:
        trees.append(subprocess.Popen([sys.executable, "-c", _IMPATIENT_TREE],
                                      stdout=subprocess.PIPE, text=True))
        return trees[-1]

    def stopped_while_waiting(settings: Settings, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt up")

    monkeypatch.setattr(up, "start_supervisord", start_tree)
    monkeypatch.setattr(up, "wait_healthy", stopped_while_waiting)
    args = argparse.Namespace(limit=1, day_s=0.0, timeout_s=1.0, data="sample",
                              stock_multiplier=1, once=False, summary_json=None)
    assert up._cmd_up(args, up_settings) == 130  # no KeyboardInterrupt out of the stop
    assert trees[0].returncode == 0, "up did not wait for its tree to finish stopping"
    assert not http_ready(up_settings.embedded_redis_port), "up left running a Redis it started"
    err = capsys.readouterr().err
    assert "still stopping" in err
    assert "stopped the embedded Redis this command started" in err


def test_up_says_degraded_not_healthy_when_a_check_is_not_ok() -> None:
    ok = {"status": "ok", "checks": {"redis": {"ok": True, "latency_ms": 0.4}}}
    assert up.health_line(ok) == "runtime healthy (redis ok 0.4 ms)"
    degraded = {"status": "degraded", "checks": {
        "redis": {"ok": True, "latency_ms": 0.4},
        "scheduler": {"ok": False, "detail": "no scheduler holds the lease"}}}
    assert up.health_line(degraded) == (
        "runtime up, degraded (redis ok 0.4 ms, scheduler NOT ok: no scheduler holds the lease)")
