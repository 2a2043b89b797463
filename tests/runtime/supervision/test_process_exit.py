"""Escalation out of the root supervisor ends the process with code 70; SIGTERM stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from actors.inventory.messages import RESERVE_STOCK
from runtime.settings import Settings
from tests.support import next_supervision_event, queue_counts, spawn_module, stop, wait_until

ROOT = Path(__file__).resolve().parents[3]
# How long a real worker process may take to start, crash and exit.
WAIT_S = 60.0
# A worker's whole graceful stop in the stop test (SHOPFLOW_WORKER_STOP_S)...
STOP_BUDGET_S = 3.0
# ...and what the interpreter may add to it on its way out (the unbounded stop took 50 s+).
EXIT_SLACK_S = 10.0


def program(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.supervision.program", mode],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("mode", ["crashloop", "crashloop-hook"])
def test_escalation_out_of_the_root_exits_the_process_with_70(mode: str) -> None:
    proc = program(mode)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 70, err
    assert out.splitlines()[:2] == ["start a", "start b"]
    assert out.splitlines()[-1] == "stop a"
    assert "root supervisor" in err and "gave up" in err


def test_sigterm_stops_the_children_in_reverse_and_exits_0() -> None:
    proc = program("serve")
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(4)]
    assert lines == ["start a", "start b", "start c", "ready"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["stop", "c", "stop", "b", "stop", "a"]


@pytest.mark.slow
def test_a_worker_process_exits_70_when_its_root_gives_up(settings: Settings) -> None:
    """A real ``shopflow worker`` whose reserver crashes: the root gives up, logs, exits 70.

    With SHOPFLOW_SUPERVISOR_MAX_RESTARTS=0 the first crash exceeds the
    intensity. The exit goes through ``exit_process_on_escalate`` (its
    CRITICAL line is flushed to the log before ``os._exit``), the give-up is
    an alert on Redis, and the job the crashed actor held is neither done nor
    lost (its message is still owed to the queue).
    """
    from runtime.broker import QUEUE_INVENTORY, setup_broker
    from runtime.root import EXIT_ESCALATED

    configured = replace(settings, supervisor_max_restarts=0, inventory_concurrency=1)
    proc = spawn_module(configured, "tests.runtime.supervision.crashing_worker",
                        log_name="worker-escalates")
    try:
        broker = setup_broker(configured)
        try:
            RESERVE_STOCK.send(broker, 4242)
        finally:
            broker.close()
        code = proc.wait(WAIT_S)
    finally:
        stop(proc)
    assert code == EXIT_ESCALATED
    log_text = (configured.var_dir / "worker-escalates.log").read_text()
    assert "root supervisor gave up, exiting with code 70" in log_text
    alert = next_supervision_event(configured, "escalation", None, "alerts", WAIT_S)
    assert alert["supervisor"] == "inventory-worker-root"
    assert alert["process"] == "inventory-worker"
    counts = queue_counts(configured, QUEUE_INVENTORY)
    assert (counts.completed, counts.dead) == (0, 0)
    assert counts.waiting + counts.active + counts.delayed == 1


def test_a_worker_whose_job_ignores_the_stop_still_stops_within_its_budget_and_exits_0(
        settings: Settings) -> None:
    """SIGTERM while a job holds a database connection and never ends: the stop gives the
    job its share of SHOPFLOW_WORKER_STOP_S, stops the actors, terminates the pool it cannot
    close, and exits 0 within the budget (supervisord's stopwaitsecs is longer). The job is
    handed back at once: neither done nor dead, waiting in its queue again."""
    from runtime.broker import QUEUE_INVENTORY, setup_broker
    from tests.runtime.supervision.stubborn_worker import MARKER

    configured = replace(settings, worker_stop_s=STOP_BUDGET_S, inventory_concurrency=1)
    proc = spawn_module(configured, "tests.runtime.supervision.stubborn_worker",
                        log_name="worker-stubborn")
    marker = configured.var_dir / MARKER
    try:
        broker = setup_broker(configured)
        try:
            RESERVE_STOCK.send(broker, 4242)
        finally:
            broker.close()
        wait_until(marker.exists, WAIT_S, "the stubborn job to start")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_BUDGET_S + EXIT_SLACK_S)
    finally:
        stop(proc)
    log_text = (configured.var_dir / "worker-stubborn.log").read_text()
    assert code == 0, log_text[-3000:]
    # The overruns were logged, not waited out.
    assert "did not stop its children within" in log_text
    assert "terminating its connections" in log_text
    counts = queue_counts(configured, QUEUE_INVENTORY)
    assert (counts.completed, counts.dead) == (0, 0)
    assert (counts.waiting, counts.active, counts.delayed) == (1, 0, 0)
