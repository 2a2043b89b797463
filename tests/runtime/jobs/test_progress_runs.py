"""Progress is written only by the run the job is on.

A job's context travels into actors, which can outlive the attempt that asked
them (its ask timed out and the job was retried, its worker handed it back at a
stop, the stall sweep ran it again). Progress such a run reports late must not
land on the job's next run, on a job waiting for it, or on a job that ended.
The worker's calls are played on ``jobs.lua`` (as in test_stale_copies.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, setup_broker
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.context import JobContext
from runtime.settings import Settings

PROGRESSING = JobSpec(QUEUE_EMAILS, "jobs_test_progress_runs")
WORKER = "worker-of-the-runs"


@pytest.fixture
def played(settings: Settings) -> Iterator[JobBroker]:
    broker = setup_broker(settings)
    yield broker
    broker.close()


def _context(broker: JobBroker, sent: Submitted, rid: str, attempt: int) -> JobContext:
    return JobContext(sent.job_id, QUEUE_EMAILS, PROGRESSING.actor, attempt, 3, broker.client,
                      broker.keys, broker.jobs, rid=rid)


def _run(broker: JobBroker, sent: Submitted, rid: str, attempt: int) -> JobContext:
    """Fetch and start the run ``rid`` of the job; its job context."""
    assert broker.jobs("fetch", QUEUE_EMAILS, WORKER, 1)[1] == rid
    assert broker.jobs("start", QUEUE_EMAILS, rid, sent.job_id, PROGRESSING.actor, WORKER,
                       attempt, "")[0] == "run"
    return _context(broker, sent, rid, attempt)


def _finish(broker: JobBroker, sent: Submitted, rid: str, outcome: str,
            next_rid: str = "") -> None:
    next_body = sent.message.copy(options={"redis_message_id": next_rid}).encode().decode() \
        if next_rid else ""
    assert broker.jobs("finish", QUEUE_EMAILS, rid, sent.job_id, PROGRESSING.actor, WORKER,
                       outcome, json.dumps({"error": "boom", "attempt": 1}), 500, 0, "[]",
                       next_rid, next_body, 0, 0) == ["ok"]


def _progress(broker: JobBroker, job_id: str) -> object:
    raw = broker.client.hget(broker.keys.job(job_id), "progress")
    return None if raw is None else json.loads(raw)


def test_only_the_current_run_of_an_active_job_writes_progress(played: JobBroker) -> None:
    broker = played
    sent = PROGRESSING.send(broker)
    first_rid = str(sent.message.options["redis_message_id"])
    first = _run(broker, sent, first_rid, 1)
    assert first.progress({"step": 1}) is True
    _finish(broker, sent, first_rid, "retry", next_rid="second-run")
    # The first run's actor goes on after its attempt failed: the waiting job keeps its own.
    assert first.progress({"step": 2}) is False
    assert _progress(broker, sent.job_id) == {"step": 1}
    second = _run(broker, sent, "second-run", 2)
    assert first.progress({"step": 3}) is False, "the old run wrote over the current one's"
    assert second.progress({"step": 4}) is True
    _finish(broker, sent, "second-run", "completed")
    assert second.progress({"step": 5}) is False, "progress landed on an ended job"
    assert _progress(broker, sent.job_id) == {"step": 4}
    # An operator (no run id) still writes whatever the state.
    assert broker.jobs("progress", sent.job_id, "6")[0] == "ok"
    assert _progress(broker, sent.job_id) == 6
