"""Worker-process guarantees the first job tests could not break: a slow job's
heartbeat, a stop request across a restart, a dead job retried by an operator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from runtime.broker import setup_broker
from runtime.cli import main
from runtime.jobs.store import JobStore
from runtime.settings import Settings
from tests.support import wait_until

from . import more_worker_process as mw
from .procs import Log, job, state_is

pytestmark = pytest.mark.slow


@pytest.fixture
def one_queue(fast: Settings) -> Iterator[mw.OneQueueWorkers]:
    w = mw.OneQueueWorkers(fast)
    yield w
    w.stop_all()


def _store_call(settings: Settings, call: str, job_id: str) -> str | None:
    """``JobStore.<call>(job_id)`` on a fresh client (the tests are sync)."""
    async def run() -> str | None:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            store = JobStore(client, setup_broker(settings).keys, [mw.QUEUE])
            result: str | None = await getattr(store, call)(job_id)
            return result
        finally:
            await client.aclose()
    return asyncio.run(run())


def test_a_slow_job_kept_alive_by_the_keepers_heartbeat_alone_runs_once(
        fast: Settings, one_queue: mw.OneQueueWorkers) -> None:
    """One thread on one queue: while the job runs its consumer never fetches, so only
    the keeper's heartbeat tells the other worker's sweep that this worker lives."""
    log = Log(fast)
    one_queue.start(threads=1)
    one_queue.start(threads=1)  # sweeps, and would take the job if it were handed back
    run_s = 4 * fast.broker_heartbeat_timeout_ms / 1000
    sent = mw.SLOW.send(setup_broker(fast), "slow-1", run_s)
    wait_until(state_is(fast, sent.job_id, "completed"), run_s + 30, "the slow job to complete")
    assert (log.count("slow-1", "start"), log.count("slow-1", "end")) == (1, 1)
    found = job(fast, sent.job_id)
    assert found is not None and found["deaths"] == 0
    assert "stalled" not in [h["event"] for h in found["history"]]


def test_a_stop_request_survives_the_workers_death_and_the_job_is_not_run_again(
        fast: Settings, one_queue: mw.OneQueueWorkers) -> None:
    log = Log(fast)
    first = one_queue.start()
    sent = mw.UNHEEDING.send(setup_broker(fast), "stop-1")
    wait_until(lambda: log.count("stop-1", "start") == 1, 20, "the job to start")
    assert _store_call(fast, "cancel", sent.job_id) == "requested"
    first.kill()  # before the job ever looked at the request
    first.wait(10)
    one_queue.start()
    wait_until(state_is(fast, sent.job_id, "cancelled"), 30,
               "the new worker to end the job as cancelled")
    assert (log.count("stop-1", "start"), log.count("stop-1", "end")) == (1, 0)
    found = job(fast, sent.job_id)
    assert found is not None and found["cancel_requested"] is True
    assert "stalled" in [h["event"] for h in found["history"]]


def _until_dead(settings: Settings, workers: mw.OneQueueWorkers, job_id: str) -> None:
    """Play supervisord: start workers until the job that kills them is quarantined."""
    dead = state_is(settings, job_id, "dead")
    for _restart in range(4):
        current = workers.start(wait_ready=False)
        wait_until(lambda p=current: p.poll() is not None or dead(), 30,  # type: ignore[misc]
                   "the job to kill its worker or be quarantined")
        if dead():
            return
    raise AssertionError(f"job {job_id} was never quarantined: {job(settings, job_id)}")


def test_a_dead_job_retried_from_python_or_the_command_line_runs_again_and_completes(
        fast: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = replace(fast, job_poison_deaths=1)  # one death quarantines
    workers = mw.OneQueueWorkers(settings)
    log = Log(settings)
    broker = setup_broker(settings)
    try:
        by_api = mw.DIE_FIRST.send(broker, "dead-api")
        _until_dead(settings, workers, by_api.job_id)
        by_cli = mw.DIE_FIRST.send(broker, "dead-cli")
        _until_dead(settings, workers, by_cli.job_id)
        for sent in (by_api, by_cli):
            found = job(settings, sent.job_id)
            assert found is not None and "poison pill" in found["reason"]
        workers.start()  # the fixed release: these jobs no longer kill it
        _store_call(settings, "retry", by_api.job_id)
        for key, value in settings.to_env().items():
            monkeypatch.setenv(key, value)
        assert main(["jobs", "retry", by_cli.job_id]) == 0
        assert f"job {by_cli.job_id} is waiting again" in capsys.readouterr().out
        for sent, tag in ((by_api, "dead-api"), (by_cli, "dead-cli")):
            wait_until(state_is(settings, sent.job_id, "completed"), 30,
                       f"the retried dead job {tag} to complete")
            found = job(settings, sent.job_id)
            assert found is not None and found["result"] == f"{tag} done"
            assert (log.count(tag, "start"), log.count(tag, "end")) == (2, 1)
    finally:
        workers.stop_all()
