"""The job ledger: every job sent ends once, whatever retries, delays and SIGKILLs happen.

Real Redis, real worker processes (tests/runtime/metrics_worker.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from runtime.broker import LedgerRow, read_ledger, setup_broker
from runtime.settings import Settings
from tests.runtime.metrics_helpers import kill_process, process_env, start_process, stop_process
from tests.runtime.metrics_worker import FLAKY, OK, PERMANENT
from tests.support import wait_until

WORKER = ["-m", "tests.runtime.metrics_worker"]


def _ledger(settings: Settings) -> dict[str, LedgerRow]:
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        return read_ledger(client, f"{settings.namespace}-jobs")
    finally:
        client.close()


def _redelivery_env(settings: Settings) -> dict[str, str]:
    """The test's short heartbeat timeout and frequent sweeps, for the worker processes too:
    the new worker is the one that finds the dead one's jobs and requeues them."""
    return {"SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS": str(settings.broker_heartbeat_timeout_ms),
            "SHOPFLOW_BROKER_MAINTENANCE_CHANCE": str(settings.broker_maintenance_chance)}


def _idle(settings: Settings) -> bool:
    rows = _ledger(settings).values()
    return bool(rows) and all(row.open == 0 for row in rows)


def test_retries_delays_and_failures_each_end_a_job_once(settings: Settings) -> None:
    """20 ok (3 of them delayed), 4 failing every attempt (1 retry each), 3 permanent."""
    settings = replace(settings, job_attempts=2, job_backoff_ms=20)
    producer = setup_broker(settings)
    worker = start_process(WORKER, process_env(settings))
    try:
        for n in range(17):
            OK.send(producer, n)
        for n in range(3):
            OK.send(producer, n, delay_ms=50)
        for n in range(4):
            FLAKY.send(producer, n)
        for n in range(3):
            PERMANENT.send(producer, n)
        wait_until(lambda: _idle(settings), 30, "every job to end")
        ledger = _ledger(settings)
        # inventory: 3 delayed jobs and 4 retries fall due (again: 3 + 4 into the delay
        # queue's hand-over, 4 retries); every message that left a queue was acked or rejected.
        assert ledger["inventory"] == LedgerRow("inventory", sent=24, again=11, acked=31, rejected=4)
        assert ledger["inventory"].ended == 24
        assert ledger["emails"] == LedgerRow("emails", sent=3, again=0, acked=0, rejected=3)
        assert stop_process(worker) == 0
    finally:
        if worker.poll() is None:
            kill_process(worker)
        producer.close()


@pytest.mark.slow
def test_a_worker_killed_mid_stream_loses_no_job_and_ends_none_twice(settings: Settings) -> None:
    """SIGKILL while jobs run and are acknowledged: the next worker ends the rest, each once."""
    producer = setup_broker(settings)
    env = process_env(settings, **_redelivery_env(settings))
    worker = start_process(WORKER, env)
    try:
        for n in range(2000):
            OK.send(producer, n)
        wait_until(lambda: _ledger(settings)["inventory"].acked >= 100, 30, "the worker busy")
        kill_process(worker)
        after_kill = _ledger(settings)["inventory"]
        assert 0 < after_kill.ended < 2000, after_kill
        worker = start_process(WORKER, env)
        wait_until(lambda: _idle(settings), 60, "the jobs of the killed worker to be redelivered")
        assert _ledger(settings)["inventory"] == LedgerRow("inventory", sent=2000, acked=2000)
        assert stop_process(worker) == 0
    finally:
        if worker.poll() is None:
            kill_process(worker)
        producer.close()


def test_a_job_nobody_runs_stays_open(settings: Settings) -> None:
    producer = setup_broker(settings)
    try:
        OK.send(producer, 1)
        assert _ledger(settings)["inventory"] == LedgerRow("inventory", sent=1)
        assert _ledger(settings)["inventory"].open == 1
    finally:
        producer.close()
