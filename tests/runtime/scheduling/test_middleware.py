"""The worker side with a real Dramatiq worker: one run per slot, outcomes recorded, the
in-flight marker cleared when a run is over (and only then)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from runtime.broker import QUEUE_MAINTENANCE, JobSpec, declare_actor, setup_broker
from runtime.errors import PermanentJobError
from runtime.jobs.worker import make_worker
from runtime.scheduling import IntervalTrigger, Schedule, ScheduledRunMiddleware
from runtime.scheduling.scheduler import Scheduler
from runtime.scheduling.store import Keys
from runtime.settings import Settings

JOB = JobSpec(QUEUE_MAINTENANCE, "scheduled_job")
SLOT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class Signals(Middleware):
    """Test probe: counts finished and skipped messages and wakes waiters."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done: list[str] = []

    def _note(self, what: str) -> None:
        with self.cond:
            self.done.append(what)
            self.cond.notify_all()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._note(f"skip:{message.message_id}")

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy,
                              *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        self._note(f"{'ok' if exception is None else 'err'}:{message.message_id}")

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._note(f"nack:{message.message_id}")

    def wait_for(self, *events: str, timeout_s: float = 60) -> list[str]:
        """Block until every one of ``events`` happened (in any order)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: all(e in self.done for e in events), timeout_s)
            assert ok, (events, self.done)
            return list(self.done)


@pytest.fixture
def probe() -> Signals:
    return Signals()


@pytest.fixture
def worker_broker(settings: Settings, probe: Signals) -> Iterator[dramatiq.Broker]:
    middleware = ScheduledRunMiddleware(settings.redis_url or "", settings.namespace)
    broker = setup_broker(settings, extra_middleware=[middleware, probe])
    yield broker
    broker.close()


def run_worker(broker: dramatiq.Broker) -> dramatiq.Worker:
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    return worker


def message(slot: datetime, name: str = "job") -> dramatiq.Message[Any]:
    return Scheduler._message(Schedule(name, IntervalTrigger(60), JOB), slot)


def state(settings: Settings, name: str = "job") -> tuple[dict[str, str], dict[str, str], bool]:
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    keys = Keys(settings.namespace)
    try:
        raw: dict[str, str] = client.hgetall(keys.state(name))  # type: ignore[assignment]
        stats: dict[str, str] = client.hgetall(keys.stats(name))  # type: ignore[assignment]
        return raw, stats, bool(client.exists(keys.inflight(name)))
    finally:
        client.close()


def set_inflight(settings: Settings, message_id: str, name: str = "job") -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        client.set(Keys(settings.namespace).inflight(name), message_id, px=60_000)
    finally:
        client.close()


def test_a_second_message_for_the_same_slot_is_skipped(
    settings: Settings, worker_broker: dramatiq.Broker, probe: Signals
) -> None:
    calls: list[str] = []

    def job() -> str:
        calls.append("ran")
        return "done"

    declare_actor(worker_broker, JOB, job)
    # Under the slot's own job id the broker refuses the second message while it knows the
    # first; this one gets past it (as one does once the first job's record is gone, or
    # from a producer that sets another id), and the worker's guard must refuse it.
    first = message(SLOT)
    duplicate = message(SLOT).copy(options={"job_id": "another-producer"})
    set_inflight(settings, first.message_id)
    worker_broker.enqueue(first)
    worker_broker.enqueue(duplicate)
    worker = run_worker(worker_broker)
    try:
        probe.wait_for(f"ok:{first.message_id}", f"skip:{duplicate.message_id}")
    finally:
        worker.stop()
    assert calls == ["ran"]
    raw, stats, running = state(settings)
    assert raw["last_status"] == "succeeded" and raw["last_msg"] == first.message_id
    assert raw["last_result"] == '"done"'
    assert stats["duplicates"] == "1" and stats["succeeded"] == "1"
    assert stats["started_late"] == "1"  # SLOT is in the past: logged and counted, still run
    assert not running


def test_retries_of_the_same_message_run_and_the_outcome_is_recorded(
    settings: Settings, worker_broker: dramatiq.Broker, probe: Signals
) -> None:
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")

    declare_actor(worker_broker, JOB, flaky)
    msg = message(SLOT)
    set_inflight(settings, msg.message_id)
    worker_broker.enqueue(msg)
    worker = run_worker(worker_broker)
    try:
        events = probe.wait_for(f"ok:{msg.message_id}")
    finally:
        worker.stop()
    assert len(attempts) == 2 and events.count(f"err:{msg.message_id}") == 1
    raw, stats, running = state(settings)
    assert raw["last_status"] == "succeeded"
    assert stats["errored"] == "1" and stats["succeeded"] == "1"
    assert not running


def test_a_permanent_failure_is_recorded_and_ends_the_run(
    settings: Settings, worker_broker: dramatiq.Broker, probe: Signals
) -> None:
    def broken() -> None:
        raise PermanentJobError("bad input")

    declare_actor(worker_broker, JOB, broken)
    msg = message(SLOT)
    set_inflight(settings, msg.message_id)
    worker_broker.enqueue(msg)
    worker = run_worker(worker_broker)
    try:
        probe.wait_for(f"nack:{msg.message_id}")
    finally:
        worker.stop()
    raw, stats, running = state(settings)
    assert raw["last_status"] == "failed" and "bad input" in raw["last_error"]
    assert stats["failed"] == "1"
    assert not running


def test_unscheduled_messages_pass_untouched(
    settings: Settings, worker_broker: dramatiq.Broker, probe: Signals
) -> None:
    calls: list[int] = []
    declare_actor(worker_broker, JOB, lambda x: calls.append(x))
    sent = JOB.send(worker_broker, 7)
    worker = run_worker(worker_broker)
    try:
        probe.wait_for(f"ok:{sent.message_id}")
    finally:
        worker.stop()
    assert calls == [7]


class Runs:
    """A RunObserver that records what it is told and wakes waiters."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []
        self.late: list[str] = []
        self.changed = threading.Event()

    def run_finished(self, schedule: str, outcome: str, duration_s: float | None) -> None:
        self.finished.append((schedule, outcome))
        self.changed.set()

    def run_started_late(self, schedule: str) -> None:
        self.late.append(schedule)


def test_a_run_the_stall_sweep_ends_is_finished_as_failed(settings: Settings) -> None:
    """A worker died running a scheduled job on its last attempt: no worker ever nacks it, the
    job keeper's sweep ends it. The run is recorded failed and its overlap marker cleared, so
    the schedule's next slot is not held back until the marker expires."""
    settings = replace(settings, broker_heartbeat_timeout_ms=1_000, job_sweep_interval_s=0.2,
                       job_attempts=1)
    runs = Runs()
    middleware = ScheduledRunMiddleware(settings.redis_url or "", settings.namespace,
                                        observer=runs)
    broker = setup_broker(settings, extra_middleware=[middleware])
    declare_actor(broker, JOB, lambda: None)
    msg = message(SLOT)
    set_inflight(settings, msg.message_id)
    sent = broker.submit(msg)
    rid = sent.message.options["redis_message_id"]
    dead = "dead-worker"  # fetched and started the run, then its process was killed
    assert broker.jobs("fetch", QUEUE_MAINTENANCE, dead, 1)[1] == rid
    assert broker.jobs("start", QUEUE_MAINTENANCE, rid, sent.job_id, JOB.actor, dead, 1, "",
                       "")[0] == "run"
    middleware.before_process_message(broker, MessageProxy(sent.message))  # what it recorded
    assert state(settings)[0]["last_status"] == "running"
    broker.client.zadd(broker.keys.heartbeats, {dead: 0})
    worker = make_worker(broker, {QUEUE_MAINTENANCE}, 1)
    worker.start()
    try:
        assert runs.changed.wait(30), "the sweep's end of the run was never recorded"
    finally:
        worker.stop()
        broker.close()
    raw, stats, running = state(settings)
    assert raw["last_status"] == "failed" and "stalled" in raw["last_error"]
    assert stats["failed"] == "1"
    assert not running
    assert runs.finished == [("job", "failed")]


def test_runs_of_repeatable_jobs_share_one_metric_label(
    settings: Settings, probe: Signals
) -> None:
    runs = Runs()
    middleware = ScheduledRunMiddleware(settings.redis_url or "", settings.namespace,
                                        observer=runs)
    broker = setup_broker(settings, extra_middleware=[middleware, probe])
    declare_actor(broker, JOB, lambda: None)
    builtin = Scheduler._message(Schedule("nightly", IntervalTrigger(60), JOB), SLOT)
    added = Scheduler._message(
        Schedule("promo-for-bob", IntervalTrigger(60), JOB, source="repeatable"), SLOT)
    for msg in (builtin, added):
        broker.enqueue(msg)
    worker = run_worker(broker)
    try:
        probe.wait_for(f"ok:{builtin.message_id}", f"ok:{added.message_id}")
    finally:
        worker.stop()
        broker.close()
    assert sorted(runs.finished) == [("nightly", "succeeded"), ("repeatable", "succeeded")]
    assert sorted(runs.late) == ["nightly", "repeatable"]  # SLOT is long past
