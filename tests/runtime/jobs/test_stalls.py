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
from typing import Any

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.context import current_job
from runtime.jobs.script import JobScript
from runtime.jobs.worker import make_worker
from runtime.metrics_middleware import FailedJob, MetricsMiddleware
from runtime.settings import Settings

from .conftest import Seen
from .test_dedup import Clock

STALLS = JobSpec(QUEUE_EMAILS, "jobs_test_stalls")
HEARTBEAT_TIMEOUT_MS = 1_000
SWEEP_INTERVAL_S = 0.2
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


def hold(broker: JobBroker, sent: Submitted, policy: str = "") -> None:
    """Fetch and start ``sent`` as the worker that is going to die (before a live worker
    can take it), leaving ``policy`` (JSON) on its record as a real worker's start does."""
    rid = sent.message.options["redis_message_id"]
    assert broker.jobs("fetch", QUEUE_EMAILS, DEAD, 1)[1] == rid
    assert broker.jobs("start", QUEUE_EMAILS, rid, sent.job_id, STALLS.actor, DEAD, 1, "",
                       policy)[0] == "run"


def last_beat(broker: JobBroker, at_ms: int | None = None) -> int:
    """The dying worker's last heartbeat, now (or ``at_ms``); returns it (ms)."""
    beat_ms = int(time.time() * 1000) if at_ms is None else at_ms
    broker.client.zadd(broker.keys.heartbeats, {DEAD: beat_ms})
    return beat_ms


def history(broker: JobBroker, job_id: str) -> list[dict[str, Any]]:
    """The job's events as the script recorded them (its clock), oldest first."""
    entries: list[bytes] = broker.client.lrange(broker.keys.history(job_id), 0, -1)  # type: ignore[assignment]
    return [json.loads(e) for e in reversed(entries)]


def record(broker: JobBroker, job_id: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = broker.client.hgetall(broker.keys.job(job_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


RETRY: dict[str, Any] = {"attempts": 3, "backoff": "fixed", "backoff_ms": 600, "jitter": False}
# The policy a worker leaves on the record of a job sent with RETRY.
RETRY_POLICY: dict[str, Any] = {**RETRY, "backoff_max_ms": 9600}


def test_a_stall_is_found_after_the_heartbeat_timeout_and_runs_again_after_its_backoff(
        quick: tuple[JobBroker, Seen, list[int]]) -> None:
    """Checked on the script's own clock (the times it wrote on the job's history), not the
    test's: the sweep that found the job ran no earlier than a heartbeat timeout after the
    last beat, set the next run exactly one backoff later, and that run started no earlier."""
    broker, seen, attempts = quick
    sent = STALLS.send(broker, **RETRY)
    hold(broker, sent, json.dumps(RETRY_POLICY))
    worker = make_worker(broker, {QUEUE_EMAILS}, 1)
    worker.start()  # its keeper beats from now on, before the other worker's last beat
    try:
        last_beat_ms = last_beat(broker)
        stalled = seen.wait("stalled", sent.job_id)[0]
        assert stalled.detail["outcome"] == "delayed"
        active = seen.wait("active", sent.job_id)[0]
        seen.wait("completed", sent.job_id)
    finally:
        worker.stop()
    events = history(broker, sent.job_id)
    found = next(e for e in events if e["event"] == "stalled")
    rerun = [e for e in events if e["event"] == "active"][-1]
    assert found["at"] - last_beat_ms >= HEARTBEAT_TIMEOUT_MS, "judged dead before its timeout"
    assert found["detail"]["run_at_ms"] == found["at"] + RETRY["backoff_ms"]
    assert rerun["at"] >= found["detail"]["run_at_ms"], "the run after a stall waited its backoff"
    assert active.attempt == 2 and attempts == [2], "the stalled run used attempt 1"
    job = record(broker, sent.job_id)
    assert (job["state"], job["attempt"], job["deaths"]) == ("completed", "2", "1")
    assert json.loads(job["policy"]) == RETRY_POLICY, \
        "the worker that ran it left its policy for a later sweep"


def test_the_sweep_judges_a_worker_dead_once_its_heartbeat_timeout_has_passed(
        settings: Settings) -> None:
    """The other half of the bound, on a clock the test moves: silent for one millisecond
    less than the timeout, a worker is alive; for the whole timeout, its job is stalled. The
    keeper sweeps every sweep interval, so a stall is found within timeout + interval."""
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS))
    clock = Clock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    try:
        sent = STALLS.send(broker, **RETRY)
        hold(broker, sent, json.dumps(RETRY_POLICY))
        beat_ms = last_beat(broker, int(clock() * 1000))
        policy = json.dumps(RETRY_POLICY)

        def sweep_at(at_ms: int) -> dict[str, Any]:
            clock.offset_s = 0.0
            clock.offset_s = at_ms / 1000 - clock()
            reply: dict[str, Any] = json.loads(broker.jobs("sweep", HEARTBEAT_TIMEOUT_MS, 3,
                                                           policy, 0.5))
            return reply

        assert sweep_at(beat_ms + HEARTBEAT_TIMEOUT_MS - 1) == {"requeued": 0}
        assert record(broker, sent.job_id)["state"] == "active"
        found = sweep_at(beat_ms + HEARTBEAT_TIMEOUT_MS)
        assert [s["job_id"] for s in found["stalled"]] == [sent.job_id]
    finally:
        broker.close()


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


def _record_of(broker: JobBroker, sent: Submitted) -> dict[str, str]:
    return record(broker, sent.job_id)


def _rid(sent: Submitted) -> str:
    return str(sent.message.options["redis_message_id"])


class PlayedWorkers:
    """Workers played by script calls on a clock the test moves (no worker threads)."""

    def __init__(self, broker: JobBroker, clock: Clock) -> None:
        self.broker = broker
        self.clock = clock
        self.policy = json.dumps(RETRY_POLICY)

    def fetch(self, worker: str, count: int) -> list[str]:
        reply = self.broker.jobs("fetch", QUEUE_EMAILS, worker, count)
        return [str(rid) for rid in reply[1::2]]

    def start(self, worker: str, sent: Submitted) -> list[str]:
        reply: list[str] = self.broker.jobs("start", QUEUE_EMAILS, _rid(sent), sent.job_id,
                                            STALLS.actor, worker, 1, "", self.policy)
        return reply

    def complete(self, worker: str, sent: Submitted) -> None:
        assert self.broker.jobs("finish", QUEUE_EMAILS, _rid(sent), sent.job_id, STALLS.actor,
                                worker, "completed", "{}", 100, 0, "[]", "", "", 0, 0) == ["ok"]

    def die_running(self, worker: str, *jobs: Submitted) -> list[dict[str, Any]]:
        """``worker`` fetches and starts ``jobs`` together, then dies: the sweep's report."""
        self.clock.offset_s += RETRY["backoff_ms"] / 1000 + 1  # whatever was delayed is due
        assert sorted(self.fetch(worker, len(jobs))) == sorted(_rid(j) for j in jobs)
        for sent in jobs:
            assert self.start(worker, sent)[0] == "run"
        self.broker.client.zadd(self.broker.keys.heartbeats,
                                {worker: int(self.clock() * 1000)})
        self.clock.offset_s += HEARTBEAT_TIMEOUT_MS / 1000
        reply = json.loads(self.broker.jobs("sweep", HEARTBEAT_TIMEOUT_MS, 3, self.policy, 0.5))
        stalled: list[dict[str, Any]] = reply["stalled"]
        return stalled


@pytest.fixture
def played(settings: Settings) -> Iterator[PlayedWorkers]:
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS))
    clock = Clock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    yield PlayedWorkers(broker, clock)
    broker.close()


def test_a_death_in_company_costs_no_attempt_and_the_second_makes_each_job_run_alone(
        played: PlayedWorkers) -> None:
    """Any of the jobs may have killed the worker: none is charged an attempt or a death;
    after two such deaths each runs alone, so a pill among them dies alone next time."""
    broker = played.broker
    pair = [STALLS.send(broker, n, **RETRY) for n in range(2)]
    first = played.die_running("first-worker", *pair)
    assert [(s["outcome"], s["shared_deaths"], s.get("isolated")) for s in first] == \
        [("delayed", 1, None)] * 2
    for sent in pair:
        job = _record_of(broker, sent)
        assert (job["deaths"], job["next_attempt"], job.get("isolate")) == ("0", "1", None)
    second = played.die_running("second-worker", *pair)
    assert [(s["outcome"], s["shared_deaths"], s.get("isolated")) for s in second] == \
        [("delayed", 2, True)] * 2
    for sent in pair:
        job = _record_of(broker, sent)
        assert (job["deaths"], job["next_attempt"], job["isolate"]) == ("0", "1", "1"), \
            "two deaths in company, still on its first attempt"


def test_a_job_that_runs_alone_keeps_its_worker_to_itself(played: PlayedWorkers) -> None:
    broker = played.broker
    suspect, plain, later = (STALLS.send(broker, n, **RETRY) for n in ("suspect", "p", "l"))
    broker.client.hset(broker.keys.job(suspect.job_id), "isolate", 1)  # died in company twice
    worker = "a-live-worker"
    assert played.fetch(worker, 3) == [_rid(suspect), _rid(plain), _rid(later)]
    assert played.start(worker, plain)[0] == "run"
    # Something runs there: the suspect waits, and keeps the worker meanwhile.
    assert played.start(worker, suspect) == ["limited", "50", "isolated"]
    assert played.start(worker, later) == ["limited", "50", "alone"]
    played.complete(worker, plain)
    assert played.start(worker, suspect)[0] == "run"
    assert played.start(worker, later) == ["limited", "50", "alone"], "not while it runs"
    played.complete(worker, suspect)
    assert played.start(worker, later)[0] == "run"
    assert not broker.client.exists(broker.keys.alone(worker))


def test_a_suspect_that_dies_alone_counts_a_death_and_uses_its_attempt(
        played: PlayedWorkers) -> None:
    broker = played.broker
    suspect = STALLS.send(broker, "suspect", **RETRY)
    broker.client.hset(broker.keys.job(suspect.job_id), "isolate", 1)
    [found] = played.die_running("lonely-worker", suspect)
    assert (found["outcome"], found["deaths"]) == ("delayed", 1)
    assert _record_of(broker, suspect)["next_attempt"] == "2"
    assert not broker.client.exists(broker.keys.alone("lonely-worker")), "the sweep freed it"
