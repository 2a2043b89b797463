"""Stalled jobs in one process: a worker that stopped beating is played by script calls.

The "dead" worker fetches and starts a job through the same ``jobs.lua`` calls a
real worker makes, then never beats again; the live worker's keeper must find it.
(SIGKILL of real worker processes: test_processes.py.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.context import current_job
from runtime.jobs.worker import make_worker
from runtime.metrics_middleware import FailedJob, MetricsMiddleware
from runtime.settings import Settings

from .conftest import Seen

STALLS = JobSpec(QUEUE_EMAILS, "jobs_test_stalls")
HEARTBEAT_TIMEOUT_MS = 1_000
SWEEP_INTERVAL_S = 0.2
# Scheduling slack on a busy 2-core machine, on top of the documented bound.
SLACK_S = 0.5
DEAD = "worker-that-died"


@pytest.fixture
def quick(settings: Settings) -> Iterator[tuple[JobBroker, Seen, list[int]]]:
    """A broker with a short heartbeat timeout, its events, and the attempts its actor ran."""
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
                                  job_sweep_interval_s=SWEEP_INTERVAL_S))
    seen = Seen()
    broker.hooks.subscribe(None, seen)
    attempts: list[int] = []

    def run() -> None:
        job = current_job()
        assert job is not None
        attempts.append(job.attempt)

    declare_actor(broker, STALLS, run)
    yield broker, seen, attempts
    broker.close()


def hold(broker: JobBroker, sent: Submitted) -> None:
    """Fetch and start ``sent`` as the worker that is going to die (before a live worker
    can take it)."""
    rid = sent.message.options["redis_message_id"]
    assert broker.jobs("fetch", QUEUE_EMAILS, DEAD, 1)[1] == rid
    assert broker.jobs("start", QUEUE_EMAILS, rid, sent.job_id, STALLS.actor, DEAD, 1, "",
                       "")[0] == "run"


def last_beat(broker: JobBroker) -> float:
    """The dying worker's last heartbeat, now; returns it (s)."""
    beat_s = time.time()
    broker.client.zadd(broker.keys.heartbeats, {DEAD: int(beat_s * 1000)})
    return beat_s


def record(broker: JobBroker, job_id: str) -> dict[str, str]:
    raw = broker.client.hgetall(broker.keys.job(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_a_stall_is_found_within_the_bound_and_runs_again_after_its_backoff(
        quick: tuple[JobBroker, Seen, list[int]]) -> None:
    broker, seen, attempts = quick
    sent = STALLS.send(broker, attempts=3, backoff="fixed", backoff_ms=600, jitter=False)
    hold(broker, sent)
    worker = make_worker(broker, {QUEUE_EMAILS}, 1)
    worker.start()  # its keeper beats from now on, before the other worker's last beat
    try:
        last_beat_s = last_beat(broker)
        stalled = seen.wait("stalled", sent.job_id)[0]
        found_s = time.time()
        assert stalled.detail["outcome"] == "delayed"
        assert record(broker, sent.job_id)["state"] == "delayed"
        active = seen.wait("active", sent.job_id)[0]
        rerun_s = time.time()
        seen.wait("completed", sent.job_id)
    finally:
        worker.stop()
    bound_s = HEARTBEAT_TIMEOUT_MS / 1000 + SWEEP_INTERVAL_S
    assert HEARTBEAT_TIMEOUT_MS / 1000 <= found_s - last_beat_s <= bound_s + SLACK_S
    assert rerun_s - found_s >= 0.6 - 0.05, "the run after a stall waited its backoff"
    assert active.attempt == 2 and attempts == [2], "the stalled run used attempt 1"
    job = record(broker, sent.job_id)
    assert (job["state"], job["attempt"], job["deaths"]) == ("completed", "2", "1")
    assert json.loads(job["policy"]) == {"attempts": 3, "backoff": "fixed", "backoff_ms": 600,
                                         "backoff_max_ms": 9600, "jitter": False}, \
        "the worker that ran it left its policy for a later sweep"


def test_a_job_that_stalls_on_its_last_attempt_fails_for_good_as_stalled(
        quick: tuple[JobBroker, Seen, list[int]]) -> None:
    broker, seen, attempts = quick
    sent = STALLS.send(broker, attempts=1)
    hold(broker, sent)
    worker = make_worker(broker, {QUEUE_EMAILS}, 1)
    worker.start()
    try:
        failed = seen.wait("failed", sent.job_id)[0]
    finally:
        worker.stop()
    assert failed.detail["reason"] == "stalled"
    assert seen.kinds(sent.job_id) == ["waiting", "stalled", "failed"]
    job = record(broker, sent.job_id)
    assert (job["state"], job["reason"]) == ("failed", "stalled")
    assert broker.client.zscore(broker.keys.queue(QUEUE_EMAILS, "failed"), sent.job_id)
    assert attempts == [], "a job out of attempts does not run again"


def test_a_critical_poison_pill_quarantined_by_the_sweep_pages_once(settings: Settings) -> None:
    """Paging lives in the metrics middleware's nack; a job the sweep quarantines is never
    nacked, so the middleware pages for the keeper's ``dead`` event instead, once."""
    settings = replace(settings, broker_heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
                       job_sweep_interval_s=SWEEP_INTERVAL_S, job_poison_deaths=1)
    pages: list[FailedJob] = []
    broker = setup_broker(settings, [MetricsMiddleware(settings, on_failed_for_good=pages.append)])
    seen = Seen()
    broker.hooks.subscribe(None, seen)
    declare_actor(broker, STALLS, lambda order_id: None, critical=True)
    after = JobSpec(QUEUE_EMAILS, "jobs_test_after_the_pill")
    declare_actor(broker, after, lambda: None)
    sent = STALLS.send(broker, 42)
    hold(broker, sent)
    worker = make_worker(broker, {QUEUE_EMAILS}, 1)
    worker.start()
    try:
        last_beat(broker)
        seen.wait("dead", sent.job_id)
        # More sweeps pass while a later job runs: the quarantined pill pages no more.
        later = after.send(broker)
        seen.wait("completed", later.job_id)
        for _ in range(3):
            seen.wait("completed", after.send(broker).job_id)
    finally:
        worker.stop()
        broker.close()
    assert [(p.actor, p.message_id, p.args) for p in pages] == [(STALLS.actor, sent.job_id, (42,))]
    assert pages[0].error is not None and "poison pill" in pages[0].error


def hold_both(broker: JobBroker, first: Submitted, second: Submitted, policy: str) -> None:
    """Fetch and start two jobs together on the worker that is going to die, leaving
    ``policy`` (JSON) on their records as a real worker's start does."""
    reply = broker.jobs("fetch", QUEUE_EMAILS, DEAD, 2)
    rids = {first.message.options["redis_message_id"], second.message.options["redis_message_id"]}
    assert {reply[1], reply[3]} == rids, reply
    for sent in (first, second):
        rid = sent.message.options["redis_message_id"]
        assert broker.jobs("start", QUEUE_EMAILS, rid, sent.job_id, STALLS.actor, DEAD, 1, "",
                           policy)[0] == "run"


@pytest.mark.parametrize("died_in_company_before", [False, True], ids=["first", "again"])
def test_jobs_that_die_together_again_run_again_apart(
        quick: tuple[JobBroker, Seen, list[int]], died_in_company_before: bool) -> None:
    """A first shared death costs only the backoff (one crash delays nobody further); jobs
    that die together again are spread one heartbeat timeout apart."""
    broker, seen, _attempts = quick
    retry = {"attempts": 5, "backoff": "fixed", "backoff_ms": 300, "jitter": False}
    sent = [STALLS.send(broker, **retry), STALLS.send(broker, **retry)]
    hold_both(broker, *sent, json.dumps({**retry, "backoff_max_ms": 300}))
    if died_in_company_before:
        for s in sent:
            broker.client.hset(broker.keys.job(s.job_id), "shared_deaths", 1)
    worker = make_worker(broker, {QUEUE_EMAILS}, 1)
    worker.start()
    try:
        last_beat(broker)
        for s in sent:
            seen.wait("stalled", s.job_id)
        run_at = sorted(int(record(broker, s.job_id)["run_at_ms"]) for s in sent)
        for s in sent:
            seen.wait("completed", s.job_id)
    finally:
        worker.stop()
    apart_ms = run_at[1] - run_at[0]
    if died_in_company_before:
        assert apart_ms >= HEARTBEAT_TIMEOUT_MS, run_at
    else:
        assert apart_ms < HEARTBEAT_TIMEOUT_MS / 2, run_at  # same sweep, same backoff
    for s in sent:
        job = record(broker, s.job_id)
        assert (job["deaths"], job["shared_deaths"]) == ("0", "2" if died_in_company_before else "1")
