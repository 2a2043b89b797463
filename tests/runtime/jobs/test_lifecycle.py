"""The job model with a real worker on real Redis: lifecycle, retries, options, control."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis

from runtime.broker import QUEUE_ANALYTICS, QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.errors import JobCancelled, PermanentJobError, QueueFull, TransientJobError
from runtime.jobs.broker import JobBroker
from runtime.jobs.context import current_job
from runtime.jobs.store import JobStore
from runtime.settings import Settings

from .conftest import Seen

ECHO = JobSpec(QUEUE_EMAILS, "jobs_test_echo")
FLAKY = JobSpec(QUEUE_EMAILS, "jobs_test_flaky")
OTHER = JobSpec(QUEUE_ANALYTICS, "jobs_test_other")


def stream_types(settings: Settings, job_id: str) -> list[str]:
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        entries = client.xrange(f"{settings.namespace}:events:jobs")
    finally:
        client.close()
    return [f[b"type"].decode() for _, f in entries
            if json.loads(f[b"payload"]).get("job_id") == job_id]


async def test_a_job_runs_once_and_its_record_and_events_tell_its_story(
        settings: Settings, broker: JobBroker, seen: Seen, store: JobStore,
        running: Callable[..., Any]) -> None:
    calls: list[int] = []

    def echo(n: int) -> dict[str, int]:
        calls.append(n)
        return {"doubled": 2 * n}

    declare_actor(broker, ECHO, echo)
    sent = ECHO.send(broker, 21)
    assert (sent.state, sent.duplicate) == ("waiting", False)
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", sent.job_id)
    job = await store.get(sent.job_id)
    assert job is not None
    assert (job["state"], job["attempt"], job["result"], job["args"]) == (
        "completed", 1, {"doubled": 42}, [21])
    assert job["started_at"] <= job["finished_at"]
    assert [h["event"] for h in job["history"]] == ["completed", "active", "waiting"]
    assert stream_types(settings, sent.job_id) == ["job.waiting", "job.active", "job.completed"]
    assert calls == [21]
    counts = {c.name: c for c in await store.counts([QUEUE_EMAILS])}[QUEUE_EMAILS]
    assert (counts.waiting, counts.active, counts.completed) == (0, 0, 1)
    assert counts.totals["completed"] == 1


async def test_a_failing_job_retries_with_its_backoff_then_fails_for_good(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    started: list[float] = []

    def flaky() -> None:
        started.append(time.monotonic())
        raise TransientJobError(f"attempt {len(started)} failed")

    declare_actor(broker, FLAKY, flaky)
    sent = FLAKY.send(broker, attempts=3, backoff="fixed", backoff_ms=150, jitter=False)
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "failed", sent.job_id)
    assert len(started) == 3
    assert all(b - a >= 0.14 for a, b in itertools.pairwise(started)), started
    job = await store.get(sent.job_id)
    assert job is not None
    assert (job["state"], job["attempt"]) == ("failed", 3)
    assert job["error"] == "TransientJobError: attempt 3 failed"
    assert [h["event"] for h in job["history"]].count("retrying") == 2
    assert [j["id"] for j in await store.list_jobs(QUEUE_EMAILS, "failed")] == [sent.job_id]


async def test_a_permanent_error_fails_at_once(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    def never() -> None:
        raise PermanentJobError("bad address")

    declare_actor(broker, FLAKY, never)
    sent = FLAKY.send(broker)
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "failed", sent.job_id)
    job = await store.get(sent.job_id)
    assert job is not None and (job["attempt"], job["state"]) == (1, "failed")


async def test_only_the_last_n_completed_jobs_are_kept(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    declare_actor(broker, ECHO, lambda n: n)
    sent = [ECHO.send(broker, n, keep_completed=3) for n in range(5)]
    with running({QUEUE_EMAILS}, threads=1):
        await asyncio.to_thread(seen.wait, "completed", None, 5)
    kept = [j["id"] for j in await store.list_jobs(QUEUE_EMAILS, "completed")]
    assert kept == [s.job_id for s in reversed(sent[2:])]
    assert await store.get(sent[0].job_id) is None


async def test_concurrent_sends_with_one_job_id_enqueue_one_job(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    calls: list[int] = []
    declare_actor(broker, ECHO, calls.append)
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def send(n: int) -> None:
        barrier.wait()
        results.append(ECHO.send(broker, n, job_id="confirm-order-7"))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    assert {r.job_id for r in results} == {"confirm-order-7"}
    assert (await store.counts([QUEUE_EMAILS]))[0].waiting == 1
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", "confirm-order-7")
        again = ECHO.send(broker, 99, job_id="confirm-order-7")
    assert (again.duplicate, again.state) == (True, "completed")
    assert len(calls) == 1


async def test_a_job_id_whose_run_failed_may_be_sent_again(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    outcomes = iter([PermanentJobError("first run fails"), None])

    def once_then_ok() -> None:
        error = next(outcomes)
        if error is not None:
            raise error

    declare_actor(broker, FLAKY, once_then_ok)
    with running({QUEUE_EMAILS}):
        FLAKY.send(broker, job_id="report-2026-12-02")
        await asyncio.to_thread(seen.wait, "failed", "report-2026-12-02")
        second = FLAKY.send(broker, job_id="report-2026-12-02")
        assert not second.duplicate
        await asyncio.to_thread(seen.wait, "completed", "report-2026-12-02")


async def test_a_high_priority_job_overtakes_a_backlog_of_five_thousand(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    order: list[str] = []
    ready = threading.Event()

    def work(tag: str) -> None:
        order.append(tag)
        if len(order) == 20:
            ready.set()
        time.sleep(0.002)

    declare_actor(broker, ECHO, work)
    pipe_tags = [f"low-{n}" for n in range(5000)]
    for tag in pipe_tags:
        ECHO.send(broker, tag)
    with running({QUEUE_EMAILS}, threads=2):
        assert await asyncio.to_thread(ready.wait, 30)
        started_before = len(order)
        urgent = ECHO.send(broker, "urgent", priority=10)
        await asyncio.to_thread(seen.wait, "completed", urgent.job_id)
    position = order.index("urgent")
    # At most what the two busy threads hold and what one fetch already had in hand.
    assert position - started_before <= 6, (started_before, position)
    assert len(order) < 1000, "the worker drained the backlog first"


async def test_equal_priorities_keep_their_order(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    order: list[str] = []
    declare_actor(broker, ECHO, order.append)
    for tag in ("lo-1", "lo-2"):
        ECHO.send(broker, tag, priority=-5)
    for tag in ("plain-1", "plain-2"):
        ECHO.send(broker, tag)
    for tag in ("hi5-1", "hi9", "hi5-2"):
        ECHO.send(broker, tag, priority=9 if tag == "hi9" else 5)
    with running({QUEUE_EMAILS}, threads=1):
        await asyncio.to_thread(seen.wait, "completed", None, 7)
    assert order == ["hi9", "hi5-1", "hi5-2", "plain-1", "plain-2", "lo-1", "lo-2"]


def _bounded(settings: Settings, policy: str, timeout_s: float) -> JobBroker:
    return setup_broker(replace(settings, queue_max_lengths=((QUEUE_EMAILS, 3.0),),
                                queue_full_policy=policy, queue_full_timeout_s=timeout_s))


async def test_a_full_queue_refuses_with_queue_full_and_drops_nothing(
        settings: Settings, store: JobStore) -> None:
    broker = _bounded(settings, "fail", 5.0)
    try:
        for n in range(3):
            ECHO.send(broker, n)
        with pytest.raises(QueueFull, match="queue 'emails' is full"):
            ECHO.send(broker, 3)
        OTHER.send(broker, "other queues are not bounded")
    finally:
        broker.close()
    assert [j["args"] for j in await store.list_jobs(QUEUE_EMAILS, "waiting")] == [[0], [1], [2]]


async def test_a_producer_blocks_until_the_full_queue_has_room(
        settings: Settings, seen: Seen, running: Callable[..., Any]) -> None:
    broker = _bounded(settings, "block", 20.0)
    broker.hooks.subscribe(None, seen)
    declare_actor(broker, ECHO, lambda n: n)
    try:
        for n in range(3):
            ECHO.send(broker, n)
        sent: list[Any] = []
        producer = threading.Thread(target=lambda: sent.append(ECHO.send(broker, 3)))
        producer.start()
        producer.join(0.3)
        assert producer.is_alive() and not sent, "the fourth send must wait for room"
        from runtime.jobs.worker import make_worker
        worker = make_worker(broker, {QUEUE_EMAILS}, 1)
        worker.start()
        try:
            producer.join(20)
            assert sent and not sent[0].duplicate
            await asyncio.to_thread(seen.wait, "completed", sent[0].job_id)
        finally:
            worker.stop()
        started = time.monotonic()
        for n in range(3):
            ECHO.send(broker, n)
        short = _bounded(settings, "block", 0.3)
        try:
            with pytest.raises(QueueFull):
                ECHO.send(short, 4)
        finally:
            short.close()
        assert time.monotonic() - started >= 0.3
    finally:
        broker.close()


async def test_a_delayed_job_runs_after_its_delay(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    declare_actor(broker, ECHO, lambda n: n)
    with running({QUEUE_EMAILS}):
        sent = ECHO.send(broker, 1, delay_ms=400)
        assert sent.state == "delayed"
        assert (await store.counts([QUEUE_EMAILS]))[0].delayed == 1
        await asyncio.to_thread(seen.wait, "completed", sent.job_id)
    job = await store.get(sent.job_id)
    assert job is not None
    started = job["started_at"]
    enqueued = job["enqueued_at"]
    from datetime import datetime
    gap_s = (datetime.fromisoformat(started) - datetime.fromisoformat(enqueued)).total_seconds()
    assert gap_s >= 0.39


async def test_waiting_and_delayed_jobs_can_be_cancelled_before_they_run(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    calls: list[str] = []
    declare_actor(broker, ECHO, calls.append)
    waiting = ECHO.send(broker, "waiting")
    delayed = ECHO.send(broker, "delayed", delay_ms=60_000)
    assert await store.cancel(waiting.job_id) == "cancelled"
    assert await store.cancel(delayed.job_id) == "cancelled"
    canary = ECHO.send(broker, "canary")
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", canary.job_id)
    assert calls == ["canary"]
    for sent in (waiting, delayed):
        job = await store.get(sent.job_id)
        assert job is not None and job["state"] == "cancelled"
    counts = (await store.counts([QUEUE_EMAILS]))[0]
    assert (counts.waiting, counts.delayed, counts.cancelled) == (0, 0, 2)


async def test_a_running_job_stops_when_asked_and_cleans_up(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    started, cleaned = threading.Event(), threading.Event()

    def long_job() -> None:
        job = current_job()
        assert job is not None
        started.set()
        try:
            for _ in range(2000):
                job.check_cancelled()
                time.sleep(0.01)
        except JobCancelled:
            cleaned.set()
            raise

    declare_actor(broker, ECHO, long_job)
    sent = ECHO.send(broker)
    with running({QUEUE_EMAILS}):
        assert await asyncio.to_thread(started.wait, 20)
        assert await store.cancel(sent.job_id) == "requested"
        await asyncio.to_thread(seen.wait, "cancelled", sent.job_id)
    assert cleaned.is_set()
    job = await store.get(sent.job_id)
    assert job is not None and (job["state"], job["attempt"]) == ("cancelled", 1)


async def test_progress_is_recorded_and_streamed_to_subscribers(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    go = threading.Event()

    def report() -> None:
        job = current_job()
        assert job is not None
        go.wait(20)
        for done in (25, 50, 100):
            job.progress({"done": done, "of": 100})

    declare_actor(broker, ECHO, report)
    sent = ECHO.send(broker)
    seen_progress: list[Any] = []

    async def follow() -> None:
        async for event in store.events(since="0", job_id=sent.job_id):
            if event["event"] == "progress":
                seen_progress.append(event["progress"])
                if len(seen_progress) == 3:
                    return

    with running({QUEUE_EMAILS}):
        follower = asyncio.create_task(follow())
        go.set()
        await asyncio.wait_for(follower, 20)
        await asyncio.to_thread(seen.wait, "completed", sent.job_id)
    assert seen_progress == [{"done": 25, "of": 100}, {"done": 50, "of": 100},
                             {"done": 100, "of": 100}]
    job = await store.get(sent.job_id)
    assert job is not None and job["progress"] == {"done": 100, "of": 100}


async def test_a_paused_queue_accepts_jobs_and_runs_none_until_resumed(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    calls: list[str] = []
    declare_actor(broker, ECHO, calls.append)
    declare_actor(broker, OTHER, calls.append)
    assert await store.pause(QUEUE_EMAILS)
    with running({QUEUE_EMAILS, QUEUE_ANALYTICS}):
        held = ECHO.send(broker, "held")
        proof = OTHER.send(broker, "the worker is running")
        await asyncio.to_thread(seen.wait, "completed", proof.job_id)
        assert calls == ["the worker is running"]
        counts = (await store.counts([QUEUE_EMAILS]))[0]
        assert counts.paused and counts.waiting == 1
        assert await store.resume(QUEUE_EMAILS)
        await asyncio.to_thread(seen.wait, "completed", held.job_id)
    assert calls == ["the worker is running", "held"]


async def test_a_failed_job_can_be_retried_and_a_finished_one_removed(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    broken = [True]

    def fixed_later() -> str:
        if broken[0]:
            raise PermanentJobError("carrier rejected the label")
        return "labelled"

    declare_actor(broker, FLAKY, fixed_later)
    sent = FLAKY.send(broker)
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "failed", sent.job_id)
        broken[0] = False
        await store.retry(sent.job_id)
        await asyncio.to_thread(seen.wait, "completed", sent.job_id)
    job = await store.get(sent.job_id)
    assert job is not None and (job["state"], job["result"]) == ("completed", "labelled")
    assert await store.remove(sent.job_id) == "removed"
    assert await store.get(sent.job_id) is None
    assert await store.list_jobs(QUEUE_EMAILS, "completed") == []


async def test_garbage_and_unknown_actors_from_outside_producers_leave_a_record(
        settings: Settings, broker: JobBroker, seen: Seen, store: JobStore,
        running: Callable[..., Any]) -> None:
    declare_actor(broker, ECHO, lambda n: n)
    client = redis.Redis.from_url(settings.redis_url or "")
    ns = broker.namespace
    try:
        client.hset(f"{ns}:{QUEUE_EMAILS}.msgs", "garbage-1", b"\xff not json")
        client.rpush(f"{ns}:{QUEUE_EMAILS}", "garbage-1")
        unknown = {"queue_name": QUEUE_EMAILS, "actor_name": "no_such_actor", "args": [],
                   "kwargs": {}, "options": {"redis_message_id": "u-1"},
                   "message_id": "unknown-actor-1", "message_timestamp": 0}
        client.hset(f"{ns}:{QUEUE_EMAILS}.msgs", "u-1", json.dumps(unknown))
        client.rpush(f"{ns}:{QUEUE_EMAILS}", "u-1")
    finally:
        client.close()
    after = ECHO.send(broker, 1)
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", after.job_id)
        for _ in range(200):
            job = await store.get("unknown-actor-1")
            if job is not None and job["state"] == "failed":
                break
            await asyncio.sleep(0.05)
    assert job is not None and job["state"] == "failed"
    assert "no_such_actor" in job["error"]
    garbage = await store.get("garbage-1")
    assert garbage is not None and garbage["state"] == "failed"
    # Each message pushed straight onto the list counts as sent when first seen, so the
    # totals balance: 3 sent (the garbage, the unknown actor, ECHO), 3 ended.
    (counts,) = await store.counts([QUEUE_EMAILS])
    assert (counts.sent, counts.ended) == (3, 3), counts.totals


async def test_an_outside_message_without_its_redis_id_option_is_recorded_and_acked(
        settings: Settings, broker: JobBroker, seen: Seen, store: JobStore,
        running: Callable[..., Any]) -> None:
    """A producer in another language may leave ``options.redis_message_id`` out; the key
    the message was fetched by names it instead, so it runs once, recorded, and is done."""
    ran: list[int] = []
    declare_actor(broker, ECHO, ran.append)
    raw = {"queue_name": QUEUE_EMAILS, "actor_name": ECHO.actor, "args": [7], "kwargs": {},
           "options": {"job_id": "raw-no-rid"}, "message_id": "m-no-rid",
           "message_timestamp": 0}
    client = redis.Redis.from_url(settings.redis_url or "")
    ns = broker.namespace
    try:
        client.hset(f"{ns}:{QUEUE_EMAILS}.msgs", "rid-x", json.dumps(raw))
        client.rpush(f"{ns}:{QUEUE_EMAILS}", "rid-x")
        with running({QUEUE_EMAILS}):
            await asyncio.to_thread(seen.wait, "completed", "raw-no-rid")
        assert not client.hexists(f"{ns}:{QUEUE_EMAILS}.msgs", "rid-x")  # acked: not run again
        assert client.llen(f"{ns}:{QUEUE_EMAILS}") == 0
    finally:
        client.close()
    assert ran == [7]
    job = await store.get("raw-no-rid")
    assert job is not None and job["state"] == "completed"
    (counts,) = await store.counts([QUEUE_EMAILS])
    assert (counts.sent, counts.ended) == (1, 1), counts.totals


async def test_flushing_a_queue_keeps_its_totals_balanced(
        settings: Settings, broker: JobBroker, store: JobStore) -> None:
    """Dramatiq's flush (what its `flush_all` and tests call) drops waiting jobs: each counts
    as removed, and one another producer pushed with no record counts as sent too."""
    declare_actor(broker, ECHO, lambda n: n)
    ECHO.send(broker, 1)
    ECHO.send(broker, 2, delay_ms=60_000)
    client = redis.Redis.from_url(settings.redis_url or "")
    ns = broker.namespace
    try:
        raw = {"queue_name": QUEUE_EMAILS, "actor_name": ECHO.actor, "args": [3], "kwargs": {},
               "options": {"redis_message_id": "raw-1"}, "message_id": "raw-1",
               "message_timestamp": 0}
        client.hset(f"{ns}:{QUEUE_EMAILS}.msgs", "raw-1", json.dumps(raw))
        client.rpush(f"{ns}:{QUEUE_EMAILS}", "raw-1")
    finally:
        client.close()
    broker.flush(QUEUE_EMAILS)
    (counts,) = await store.counts([QUEUE_EMAILS])
    assert (counts.waiting, counts.sent, counts.ended) == (0, 3, 3), counts.totals
    assert counts.totals.get("removed") == 3


async def test_a_message_whose_fetch_reply_was_lost_is_handed_back_and_runs(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    """Redis moved it to this worker's list, but no thread got it (the reply was lost)."""
    calls: list[str] = []
    declare_actor(broker, ECHO, calls.append)
    sent = ECHO.send(broker, "stranded")
    # As a fetch whose reply never arrived: the id now sits among this worker's.
    reply = broker.jobs("fetch", QUEUE_EMAILS, broker.broker_id, 1)
    assert len(reply) == 3  # next due, the id, the body
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", sent.job_id)
    assert calls == ["stranded"]
