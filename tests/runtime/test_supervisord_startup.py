"""supervisord empties the metrics directory when the tree starts, never when a program restarts.

The supervisord sections come verbatim from the repository's supervisord.conf
(including ``[rpcinterface:shopflow]``); the one program is a small process
that counts jobs in the multiprocess directory. Waits are on the program's
log and supervisord's XML-RPC state, each with a deadline.
"""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.metrics import metrics_dir
from runtime.settings import Settings
from runtime.tree import SUPERVISORD_SOCKET, supervisord_proxy
from tests.runtime.metrics_helpers import REPO_ROOT, process_env, scrape, value, wait_until
from tests.runtime.metrics_writer import ACTOR

pytestmark = pytest.mark.slow

REPO_SECTIONS = ("supervisord", "unix_http_server", "rpcinterface:supervisor",
                 "rpcinterface:shopflow", "supervisorctl")


def _conf(tmp_path: Path, settings: Settings) -> Path:
    repo = configparser.RawConfigParser()
    repo.read(REPO_ROOT / "supervisord.conf")
    conf = configparser.RawConfigParser()
    for name in REPO_SECTIONS:
        conf[name] = dict(repo[name])  # KeyError: the repository's conf lacks the section
    conf["program:writer"] = {
        "command": f"{sys.executable} -m tests.runtime.metrics_writer",
        "directory": str(REPO_ROOT), "autorestart": "true", "startsecs": "1",
        "startretries": "3", "stopsignal": "TERM", "redirect_stderr": "true",
        "stdout_logfile": str(settings.var_dir / "log" / "writer.log"),
    }
    path = tmp_path / "supervisord.conf"
    with path.open("w") as f:
        conf.write(f)
    return path


def _jobs(settings: Settings) -> float | None:
    return value(scrape(settings), "shopflow_jobs_total", queue="emails", actor=ACTOR,
                 outcome="completed")


@pytest.fixture
def tree(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    (settings.var_dir / "log").mkdir(parents=True, exist_ok=True)
    env = process_env(settings)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("supervisord")), "-c",
                             str(_conf(tmp_path, settings))], env=env, start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def previous_run(settings: Settings) -> None:
    """A finished process of an earlier run left its counter file: 5 jobs."""
    done = subprocess.run([sys.executable, "-m", "tests.runtime.metrics_writer", "--once"],
                          env=process_env(settings, WRITER_JOBS="5"), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert _jobs(settings) == 5, "without cleaning, the next run would add to these"


def _readies(settings: Settings) -> int:
    log = settings.var_dir / "log" / "writer.log"
    return log.read_text().count("ready") if log.exists() else 0


def test_the_tree_start_empties_the_directory_and_a_restart_does_not(
        settings: Settings, previous_run: None, tree: subprocess.Popen[bytes]) -> None:
    wait_until(lambda: _readies(settings) == 1, 60, "the program counted its job")
    assert _jobs(settings) == 1, "the previous run's counters are gone"
    proxy = supervisord_proxy(settings.var_dir / SUPERVISORD_SOCKET)
    assert proxy.shopflow.getStartup()["metrics_dir"] == str(metrics_dir(settings))

    # A program restart (supervisord's own, as after a crash) keeps what its predecessor counted.
    proxy.supervisor.stopProcess("writer")
    proxy.supervisor.startProcess("writer")
    wait_until(lambda: _readies(settings) == 2, 60, "the restarted program counted its job")
    assert _jobs(settings) == 2, "counters never go backwards across a restart"

    # `supervisorctl reload` stops everything and starts the tree again: a new start, clean.
    proxy.supervisor.restart()
    wait_until(lambda: _readies(settings) == 3, 60, "the reloaded tree's program counted")
    assert _jobs(settings) == 1
    tree.send_signal(signal.SIGTERM)
    assert tree.wait(60) == 0
