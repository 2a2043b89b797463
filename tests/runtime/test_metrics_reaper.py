"""The supervisord event listener marks exited processes dead (protocol over pipes)."""

from __future__ import annotations

import io
import os
import signal
import subprocess

import pytest

from runtime.metrics import metrics_dir, prepare_metrics_dir
from runtime.metrics_cli import run_reaper
from runtime.settings import Settings
from tests.support import SHOPFLOW


def _event(name: str, payload: str) -> str:
    header = (f"ver:3.0 server:supervisor serial:1 pool:metrics-reaper poolserial:1 "
              f"eventname:{name} len:{len(payload)}\n")
    return header + payload


def test_reaper_forgets_live_gauges_of_exited_processes(settings: Settings) -> None:
    path = prepare_metrics_dir(settings)
    for name in ("gauge_livesum_4001.db", "gauge_liveall_4001.db", "counter_4001.db",
                 "gauge_livesum_4002.db", "gauge_max_4001.db"):
        (path / name).write_bytes(b"")
    stdin = io.StringIO(
        _event("PROCESS_STATE_EXITED", "processname:api-0 groupname:api from_state:RUNNING "
               "expected:0 pid:4001")
        + _event("PROCESS_STATE_RUNNING", "processname:api-1 groupname:api from_state:STARTING "
                 "pid:4002"))
    stdout = io.StringIO()
    run_reaper(settings, stdin, stdout)
    assert stdout.getvalue() == "READY\nRESULT 2\nOKREADY\nRESULT 2\nOKREADY\n"
    assert sorted(p.name for p in metrics_dir(settings).iterdir()) == [
        "counter_4001.db", "gauge_livesum_4002.db", "gauge_max_4001.db"]


@pytest.mark.parametrize("command", ["metrics-reaper", "supervisor-events"])
def test_an_event_listener_stopped_by_supervisord_exits_0(settings: Settings, command: str) -> None:
    """supervisord stops listeners with SIGTERM; "terminated by SIGTERM" on every normal
    shutdown would be a WARN in its log that means nothing."""
    listener = subprocess.Popen([SHOPFLOW, command], env={**os.environ, **settings.to_env()},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline() == "READY\n"  # it waits for an event on stdin now
        listener.send_signal(signal.SIGTERM)
        assert listener.wait(30) == 0
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
