"""A worker that stops gracefully hands back the jobs it must abandon, uncharged.

A job still running when the stop's time for jobs runs out is not the job's
fault (a deploy, a scale-down): it must wait again at once as the same attempt,
with no death counted, and not be found by the stall sweep a heartbeat timeout
later and charged as if it had killed its worker. Its abandoned thread may
still be running: nothing it does afterwards (finish, ack, progress) may touch
the job's record.

The first test runs a real worker process (``run_worker``'s graceful stop);
the others play the calls of a stopping worker and of its abandoned thread on
``jobs.lua`` itself, as test_stale_copies.py does.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, setup_broker
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.store import JobStore
from runtime.settings import Settings
from tests.support import spawn_module, stop, wait_until

from . import actor_worker_process as awp
from .procs import Log, job

pytestmark = pytest.mark.slow

# The worker's whole graceful stop (SHOPFLOW_WORKER_STOP_S) in the process test...
STOP_BUDGET_S = 2.0
# ...what the interpreter may add on its way out, and how long a worker may take to boot.
EXIT_SLACK_S = 10.0
BOOT_S = 60.0

STOPPING = "worker-that-stops"
OTHER = "worker-that-takes-over"
PLAYED = JobSpec(QUEUE_EMAILS, "jobs_test_graceful_stop")


def _worker(settings: Settings, log_name: str) -> subprocess.Popen[bytes]:
    return spawn_module(settings, "tests.runtime.jobs.actor_worker_process", log_name)


def test_a_job_abandoned_by_a_graceful_stop_waits_again_uncharged_and_completes_once(
        fast: Settings) -> None:
    configured = replace(fast, worker_stop_s=STOP_BUDGET_S)
    log = Log(configured)
    first = _worker(configured, "worker-stopping")
    second: subprocess.Popen[bytes] | None = None
    try:
        broker = setup_broker(configured)
        try:
            sent = awp.IGNORES_STOP.send(broker, "stubborn", attempts=3)
        finally:
            broker.close()
        wait_until(lambda: log.count("stubborn", "start") == 1, BOOT_S, "the job to start")
        first.send_signal(signal.SIGTERM)
        assert first.wait(STOP_BUDGET_S + EXIT_SLACK_S) == 0
        # At once, not after a heartbeat timeout: back at its place, the same attempt.
        handed_back = job(configured, sent.job_id)
        assert handed_back is not None
        assert handed_back["state"] == "waiting", handed_back
        assert handed_back["attempt"] == 1
        assert handed_back.get("deaths", 0) == 0 and handed_back.get("shared_deaths", 0) == 0
        assert "worker" not in handed_back
        second = _worker(configured, "worker-takes-over")
        wait_until(lambda: (job(configured, sent.job_id) or {}).get("state") == "completed",
                   BOOT_S, "the job to complete on the other worker")
    finally:
        stop(first)
        if second is not None:
            stop(second)
    done = job(configured, sent.job_id)
    assert done is not None and done["attempt"] == 1, done
    assert log.count("stubborn", "end") == 1
    kinds = [entry["event"] for entry in done["history"]]
    assert "stalled" not in kinds and kinds.count("completed") == 1, kinds


@pytest.fixture
def played(settings: Settings) -> Iterator[JobBroker]:
    """A broker without a worker: the test plays the workers' script calls."""
    broker = setup_broker(settings)
    yield broker
    broker.close()


def _rid(sent: Submitted) -> str:
    return str(sent.message.options["redis_message_id"])


def _record(broker: JobBroker, job_id: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = broker.client.hgetall(broker.keys.job(job_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def _fetch_and_start(broker: JobBroker, worker: str, rid: str, job_id: str) -> None:
    assert broker.jobs("fetch", QUEUE_EMAILS, worker, 1)[1] == rid
    assert broker.jobs("start", QUEUE_EMAILS, rid, job_id, PLAYED.actor, worker, 1, "",
                       json.dumps({"attempts": 1}))[0] == "run"


def _finish(broker: JobBroker, worker: str, rid: str, job_id: str, outcome: str) -> list[str]:
    reply: list[str] = broker.jobs(
        "finish", QUEUE_EMAILS, rid, job_id, PLAYED.actor, worker, outcome,
        json.dumps({"result": "\"late\"", "attempt": 1}), 500, 0, "[]", "", "", 0, 0)
    return reply


def _release(broker: JobBroker, sent: Submitted, new_rid: str) -> dict[str, object]:
    body = sent.message.copy(options={"redis_message_id": new_rid}).encode().decode()
    entry = {"queue": QUEUE_EMAILS, "rid": _rid(sent), "new_rid": new_rid, "new_message": body,
             "limit_keys": []}
    reply: dict[str, object] = json.loads(broker.jobs("release", STOPPING, json.dumps([entry])))
    return reply


@pytest.mark.parametrize("late", ["completed", "failed", "ack"])
def test_the_abandoned_run_cannot_end_the_handed_back_job(played: JobBroker, late: str) -> None:
    """The last attempt, handed back: a late finish of the abandoned thread is lost, whether
    the job still waits or another worker has started it."""
    broker = played
    sent = PLAYED.send(broker, attempts=1)
    _fetch_and_start(broker, STOPPING, _rid(sent), sent.job_id)
    assert _release(broker, sent, "next-run") == {"released": [sent.job_id], "requeued": 0}
    record = _record(broker, sent.job_id)
    assert (record["state"], record["rid"], record["attempt"]) == ("waiting", "next-run", "1")
    assert "worker" not in record and record.get("deaths") == "0"
    assert broker.client.zscore(broker.keys.heartbeats, STOPPING) is None, "still judged"
    assert _finish(broker, STOPPING, _rid(sent), sent.job_id, late) == ["lost"]
    assert _record(broker, sent.job_id)["state"] == "waiting"
    # The next run starts elsewhere; the abandoned thread cannot start its copy again either.
    _fetch_and_start(broker, OTHER, "next-run", sent.job_id)
    assert broker.jobs("start", QUEUE_EMAILS, _rid(sent), sent.job_id, PLAYED.actor, STOPPING,
                       1, "")[0] == "stale"
    assert _finish(broker, STOPPING, _rid(sent), sent.job_id, late) == ["lost"]
    assert _finish(broker, OTHER, "next-run", sent.job_id, "completed") == ["ok"]
    assert _record(broker, sent.job_id)["state"] == "completed"


async def test_a_release_hands_back_what_was_only_fetched_and_forgets_the_worker(
        played: JobBroker, settings: Settings) -> None:
    import redis.asyncio as aioredis

    broker = played
    started = PLAYED.send(broker)
    fetched = PLAYED.send(broker)
    _fetch_and_start(broker, STOPPING, _rid(started), started.job_id)
    assert broker.jobs("fetch", QUEUE_EMAILS, STOPPING, 1)[1] == _rid(fetched)
    # The worker's threads did not know of the started one yet: it goes back as it was.
    reply = json.loads(broker.jobs("release", STOPPING, "[]"))
    assert reply == {"released": [started.job_id], "requeued": 1}
    assert broker.client.exists(broker.keys.acks(STOPPING, QUEUE_EMAILS)) == 0
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        store = JobStore(client, broker.keys, [QUEUE_EMAILS])
        waiting = await store.list_jobs(QUEUE_EMAILS, "waiting")
        [counts] = await store.counts([QUEUE_EMAILS])
    finally:
        await client.aclose()
    assert [j["id"] for j in waiting] == [started.job_id, fetched.job_id], "their places kept"
    assert (counts.active, counts.totals.get("released"), counts.totals.get("stalled")) == \
        (0, 1, None)
