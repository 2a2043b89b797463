"""Delayed jobs and retries wake an idle consumer when they are due before what it waits for.

An idle consumer sleeps on its queue's wake-up list until the next due time it
saw at its last fetch, or its idle timeout. A delayed job, a retry or a
requeue due earlier than that must push a wake-up token, or it starts up to
the idle timeout late. Structurally: the token is there. End to end: with an
idle timeout of 4 s (just under redis-py's 5 s socket timeout, which bounds
every blocking wait), a delayed job and a retry after 100 ms both start
within half of it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from runtime.broker import QUEUE_ANALYTICS, JobSpec, declare_actor, setup_broker
from runtime.errors import TransientJobError
from runtime.jobs.broker import JobBroker
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

from .conftest import Seen

SOON = JobSpec(QUEUE_ANALYTICS, "jobs_test_soon")
IDLE_TIMEOUT_MS = 4_000
# Well below the idle timeout: a job waiting for the idle timeout cannot make it.
WITHIN_S = IDLE_TIMEOUT_MS / 1000 / 2


@pytest.fixture
def patient(settings: Settings) -> Iterator[tuple[JobBroker, Seen]]:
    """A broker whose idle consumers sleep 4 s between looks unless woken."""
    broker = setup_broker(replace(settings, worker_idle_timeout_ms=IDLE_TIMEOUT_MS))
    seen = Seen()
    broker.hooks.subscribe(None, seen)
    yield broker, seen
    broker.close()


def _tokens(broker: JobBroker) -> int:
    return int(broker.client.llen(broker.keys.queue(QUEUE_ANALYTICS, "wake")))


def test_a_delayed_job_due_before_every_other_pushes_a_wake_up_token(
        patient: tuple[JobBroker, Seen]) -> None:
    broker, _seen = patient
    SOON.send(broker, "in a minute", delay_ms=60_000)
    assert _tokens(broker) == 1, "the first delayed job is the earliest"
    SOON.send(broker, "in two minutes", delay_ms=120_000)
    assert _tokens(broker) == 1, "a later one changes nothing for a sleeping consumer"
    SOON.send(broker, "in a second", delay_ms=1_000)
    assert _tokens(broker) == 2, "an earlier one does"


def test_a_retry_written_by_a_finish_pushes_a_wake_up_token(
        patient: tuple[JobBroker, Seen]) -> None:
    broker, _seen = patient
    sent = SOON.send(broker, "fails once")
    rid = sent.message.options["redis_message_id"]
    assert broker.jobs("fetch", QUEUE_ANALYTICS, "a-worker", 10)[1] == rid
    assert _tokens(broker) == 0, "the fetch that emptied the queue dropped the tokens"
    assert broker.jobs("start", QUEUE_ANALYTICS, rid, sent.job_id, SOON.actor, "a-worker", 1,
                       "")[0] == "run"
    retry_body = json.dumps({**json.loads(sent.message.encode()), "options": {
        **sent.message.options, "redis_message_id": "the-retry", "retries": 1}})
    assert broker.jobs("finish", QUEUE_ANALYTICS, rid, sent.job_id, SOON.actor, "a-worker",
                       "retry", json.dumps({"error": "boom", "attempt": 1}), 100, 0, "[]",
                       "the-retry", retry_body, int(time.time() * 1000) + 100, 0) == ["ok"]
    assert _tokens(broker) == 1


async def test_an_idle_worker_runs_a_delayed_job_and_a_retry_long_before_its_idle_timeout(
        patient: tuple[JobBroker, Seen]) -> None:
    broker, seen = patient
    runs: list[str] = []

    def soon(tag: str) -> None:
        runs.append(tag)
        if tag == "retried" and runs.count(tag) == 1:
            raise TransientJobError("first attempt fails")

    declare_actor(broker, SOON, soon)
    # Two threads: while one runs the failing attempt the consumer sleeps on the wake-up list.
    worker = make_worker(broker, {QUEUE_ANALYTICS}, 2)
    worker.start()
    try:
        # The worker's consumer has looked once and found nothing: it sleeps up to 4 s now.
        delayed = SOON.send(broker, "delayed", delay_ms=100)
        await asyncio.to_thread(seen.wait, "completed", delayed.job_id, 1, WITHIN_S)
        retried = SOON.send(broker, "retried", backoff="fixed", backoff_ms=100, jitter=False)
        await asyncio.to_thread(seen.wait, "completed", retried.job_id, 1, WITHIN_S)
    finally:
        worker.stop()
    assert runs == ["delayed", "retried", "retried"]
