"""Keep-last-N holds on every path a job ends by: a worker's finish, a cancel, the sweep."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from runtime.broker import ALL_QUEUES, QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker
from runtime.jobs.options import DEFAULT_KEEP_COMPLETED
from runtime.jobs.script import JobScript
from runtime.jobs.store import JobStore
from runtime.settings import Settings

from .conftest import Seen
from .test_dedup import Clock

KEPT = JobSpec(QUEUE_EMAILS, "jobs_test_kept")
TIMEOUT_MS = 1_000
DEAD = "worker-that-died"


def _index(broker: JobBroker, state: str) -> list[str]:
    """Ids in a queue's ended-jobs index, oldest first."""
    ids: list[bytes] = broker.client.zrange(broker.keys.queue(QUEUE_EMAILS, state), 0, -1)  # type: ignore[assignment]
    return [i.decode() for i in ids]


def _has_record(broker: JobBroker, job_id: str) -> bool:
    return bool(broker.client.exists(broker.keys.job(job_id)))


async def test_by_default_the_last_100_completed_jobs_are_kept(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    assert DEFAULT_KEEP_COMPLETED == 100
    declare_actor(broker, KEPT, lambda n: None)
    sent = [KEPT.send(broker, n) for n in range(DEFAULT_KEEP_COMPLETED + 3)]
    with running({QUEUE_EMAILS}, threads=4):
        await asyncio.to_thread(seen.wait, "completed", None, len(sent))
    assert (await store.counts([QUEUE_EMAILS]))[0].completed == DEFAULT_KEEP_COMPLETED
    kept = set(_index(broker, "completed"))
    gone = [s.job_id for s in sent if s.job_id not in kept]
    assert len(gone) == 3
    assert not any(_has_record(broker, job_id) for job_id in gone)


async def test_cancelling_waiting_jobs_keeps_the_last_n_cancelled(
        settings: Settings, broker: JobBroker) -> None:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    store = JobStore(client, broker.keys, ALL_QUEUES, keep_failed=2)
    try:
        sent = [KEPT.send(broker, n) for n in range(3)]
        own = KEPT.send(broker, "own", keep_failed=1)  # the message's own option wins
        for s in sent:
            assert await store.cancel(s.job_id) == "cancelled"
        assert _index(broker, "cancelled") == [s.job_id for s in sent[1:]]
        assert not _has_record(broker, sent[0].job_id)
        assert await store.cancel(own.job_id) == "cancelled"
        assert _index(broker, "cancelled") == [own.job_id]
    finally:
        await client.aclose()


@pytest.fixture
def played(settings: Settings) -> Iterator[tuple[JobBroker, Clock]]:
    """A broker (no worker) whose script runs on a clock the test moves."""
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=TIMEOUT_MS))
    clock = Clock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    yield broker, clock
    broker.close()


def test_jobs_the_sweep_fails_are_trimmed_to_the_last_n_failed(
        played: tuple[JobBroker, Clock]) -> None:
    broker, clock = played
    policy = json.dumps({"attempts": 1})
    for round_ in range(3):
        sent = KEPT.send(broker, round_, attempts=1)
        worker = f"{DEAD}-{round_}"
        rid = sent.message.options["redis_message_id"]
        assert broker.jobs("fetch", QUEUE_EMAILS, worker, 1)[1] == rid
        assert broker.jobs("start", QUEUE_EMAILS, rid, sent.job_id, KEPT.actor, worker, 1, "",
                           policy)[0] == "run"
        clock.offset_s += 2 * TIMEOUT_MS / 1000  # its worker falls silent
        reply = json.loads(broker.jobs("sweep", TIMEOUT_MS, 3, policy, 0.5, 2))
        assert [s["outcome"] for s in reply["stalled"]] == ["failed"]
    assert len(_index(broker, "failed")) == 2
