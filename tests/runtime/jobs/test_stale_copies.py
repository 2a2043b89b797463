"""A copy of a job left behind in a worker presumed dead never runs a second time.

The workers are played by the same ``jobs.lua`` calls a real worker makes (as in
test_stalls.py): worker A fetches a job and goes silent, the sweep hands the job
back, worker B runs it to its end, then A wakes up and tries to start the copy
still in its memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, setup_broker
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.script import JobScript
from runtime.settings import Settings

from .test_dedup import Clock

STALE = JobSpec(QUEUE_EMAILS, "jobs_test_stale")
TIMEOUT_MS = 1_000
ASLEEP = "worker-presumed-dead"
OTHER = "worker-that-took-over"


@pytest.fixture
def played(settings: Settings) -> Iterator[tuple[JobBroker, Clock]]:
    """A broker (no worker) whose script runs on a clock the test moves."""
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=TIMEOUT_MS))
    clock = Clock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    yield broker, clock
    broker.close()


def _rid(sent: Submitted) -> str:
    return str(sent.message.options["redis_message_id"])


def _state(broker: JobBroker, job_id: str) -> str:
    raw = broker.client.hget(broker.keys.job(job_id), "state")
    assert isinstance(raw, bytes)
    return raw.decode()


def _start(broker: JobBroker, worker: str, sent: Submitted) -> list[str]:
    reply: list[str] = broker.jobs("start", QUEUE_EMAILS, _rid(sent), sent.job_id, STALE.actor,
                                   worker, 1, "", json.dumps({"attempts": 1}))
    return reply


def _finish(broker: JobBroker, worker: str, sent: Submitted, outcome: str) -> list[str]:
    reply: list[str] = broker.jobs(
        "finish", QUEUE_EMAILS, _rid(sent), sent.job_id, STALE.actor, worker, outcome,
        json.dumps({"error": "boom", "attempt": 1}), 500, 0, "[]", "", "", 0, 0)
    return reply


def _taken_back_from_the_sleeper(broker: JobBroker, clock: Clock, sent: Submitted) -> None:
    """A fetches the job and falls silent; a sweep past A's heartbeat timeout hands it back."""
    assert broker.jobs("fetch", QUEUE_EMAILS, ASLEEP, 1)[1] == _rid(sent)
    clock.offset_s = 2 * TIMEOUT_MS / 1000
    swept = json.loads(broker.jobs("sweep", TIMEOUT_MS, 3, json.dumps({"attempts": 1}), 0.5))
    assert swept == {"requeued": 1}


@pytest.mark.parametrize("end", ["failed", "completed"])
def test_a_stale_copy_of_a_job_that_ended_on_another_worker_does_not_run(
        played: tuple[JobBroker, Clock], end: str) -> None:
    broker, clock = played
    sent = STALE.send(broker, attempts=1)
    _taken_back_from_the_sleeper(broker, clock, sent)
    assert broker.jobs("fetch", QUEUE_EMAILS, OTHER, 1)[1] == _rid(sent)
    assert _start(broker, OTHER, sent)[0] == "run"
    assert _finish(broker, OTHER, sent, end) == ["ok"]
    # A wakes up and goes on with the copy it fetched before it was presumed dead.
    assert _start(broker, ASLEEP, sent) == ["done", end]
    assert _finish(broker, ASLEEP, sent, "ack") == ["lost"]
    assert _state(broker, sent.job_id) == end


def test_a_stale_copy_does_not_run_while_the_handed_back_one_waits_nor_take_its_body(
        played: tuple[JobBroker, Clock]) -> None:
    broker, clock = played
    sent = STALE.send(broker, attempts=1)
    _taken_back_from_the_sleeper(broker, clock, sent)
    # A wakes before anyone fetched the copy the sweep put back.
    assert _start(broker, ASLEEP, sent) == ["stale", "taken back from this worker"]
    assert _finish(broker, ASLEEP, sent, "ack") == ["lost"]
    assert broker.client.hexists(broker.keys.queue(QUEUE_EMAILS, "msgs"), _rid(sent)), \
        "letting the stale copy go left the handed-back one its body"
    assert broker.jobs("fetch", QUEUE_EMAILS, OTHER, 1)[1] == _rid(sent)
    assert _start(broker, OTHER, sent)[0] == "run"
    assert _finish(broker, OTHER, sent, "completed") == ["ok"]
    assert _state(broker, sent.job_id) == "completed"


def test_a_copy_of_an_older_run_of_the_job_does_not_start(
        played: tuple[JobBroker, Clock]) -> None:
    broker, _clock = played
    sent = STALE.send(broker, attempts=1)
    assert broker.jobs("fetch", QUEUE_EMAILS, ASLEEP, 1)[1] == _rid(sent)
    # Meanwhile the job's record moved on to a newer run (another message id).
    broker.client.hset(broker.keys.job(sent.job_id), "rid", "a-newer-run")
    assert _start(broker, ASLEEP, sent) == ["stale", "superseded by a newer run"]
