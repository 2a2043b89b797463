"""Metric values after known workloads, with real worker processes on real Redis."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

import dramatiq
import pytest
import redis

from runtime.broker import QUEUE_INVENTORY, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker
from runtime.jobs.context import current_job
from runtime.jobs.worker import make_worker
from runtime.logs import JsonFormatter
from runtime.metrics import get_metrics, metrics_dir, prepare_metrics_dir, render_metrics
from runtime.metrics_middleware import MetricsMiddleware, consumers_key, outcomes_key
from runtime.observability import count_sweeps
from runtime.settings import Settings
from tests.runtime.metrics_helpers import (
    kill_process,
    process_env,
    scrape,
    start_process,
    stop_process,
    total,
    value,
    wait_until,
)
from tests.runtime.metrics_worker import FLAKY, OK, PERMANENT

WORKER = ["-m", "tests.runtime.metrics_worker"]
CORRELATION_ID = "3f0c7c4e-0000-4000-8000-000000000000"
GAUGES = ["-m", "tests.runtime.metrics_gauge_process"]


def _outcomes(settings: Settings, queue: str) -> dict[str, int]:
    client = redis.Redis.from_url(settings.redis_url or "")
    bucket = int(time.time()) // 60
    counts: dict[str, int] = {}
    for b in (bucket - 1, bucket):
        for k, v in client.hgetall(outcomes_key(settings.namespace, queue, b)).items():
            name = k.decode() if isinstance(k, bytes) else k
            counts[name] = counts.get(name, 0) + int(v)
    client.close()
    return counts


@pytest.mark.slow
def test_job_outcomes_and_counters_survive_a_crash(settings: Settings) -> None:
    """20 ok, 4 always failing (1 retry each), 3 permanent; then a crash and a new worker."""
    settings = replace(settings, job_attempts=2, job_backoff_ms=20)
    prepare_metrics_dir(settings)
    producer = setup_broker(settings)
    worker = start_process(WORKER, process_env(settings))
    try:
        for n in range(20):
            OK.send(producer, n)
        for n in range(4):
            FLAKY.send(producer, n)
        for n in range(3):
            PERMANENT.send(producer, n)

        def done() -> bool:
            s = scrape(settings)
            return (value(s, "shopflow_jobs_total", queue="inventory", actor="obs_ok",
                          outcome="completed") == 20
                    and total(s, "shopflow_jobs_total", outcome="failed") == 7)

        wait_until(done, what="27 jobs to end")
        s = scrape(settings)
        assert value(s, "shopflow_jobs_total", queue="inventory", actor="obs_always_fails",
                     outcome="failed") == 4
        assert value(s, "shopflow_jobs_total", queue="emails", actor="obs_permanent",
                     outcome="failed") == 3
        assert value(s, "shopflow_job_retries_total", queue="inventory",
                     actor="obs_always_fails") == 4
        assert value(s, "shopflow_job_retries_total", queue="emails", actor="obs_permanent") is None
        assert total(s, "shopflow_job_dead_letters_total") == 7
        assert value(s, "shopflow_job_duration_seconds_count", queue="inventory",
                     actor="obs_ok") == 20
        assert value(s, "shopflow_job_duration_seconds_count", queue="inventory",
                     actor="obs_always_fails") == 8
        assert total(s, "shopflow_jobs_in_progress") == 0
        assert _outcomes(settings, "inventory") == {"completed": 20, "retried": 4, "failed": 4}
        client = redis.Redis.from_url(settings.redis_url or "")
        assert len(client.hgetall(consumers_key(settings.namespace))) == 1

        crashed_pid = worker.pid
        kill_process(worker)
        live_file = metrics_dir(settings) / f"gauge_livesum_{worker.pid}.db"
        assert live_file.exists()
        after_crash = scrape(settings)
        assert not live_file.exists(), "the dead worker's live gauges were swept"
        assert value(after_crash, "shopflow_jobs_total", queue="inventory", actor="obs_ok",
                     outcome="completed") == 20

        worker = start_process(WORKER, process_env(settings))
        for n in range(10):
            OK.send(producer, n)
        wait_until(lambda: value(scrape(settings), "shopflow_jobs_total", queue="inventory",
                                 actor="obs_ok", outcome="completed") == 30,
                   what="counters to add up across the restart")
        assert stop_process(worker) == 0
        assert total(scrape(settings), "shopflow_jobs_total", outcome="failed") == 7
        left = [json.loads(v)["pid"] for v in client.hvals(consumers_key(settings.namespace))]
        assert left == [crashed_pid], "a clean stop withdraws; a crash leaves it to the monitor"
        client.close()
    finally:
        if worker.poll() is None:
            kill_process(worker)
        producer.close()


def test_live_gauges_leave_with_their_process_counters_stay(settings: Settings) -> None:
    prepare_metrics_dir(settings)
    env = process_env(settings)
    first = start_process([*GAUGES, "5"], env)
    second = start_process([*GAUGES, "7"], env)
    try:
        s = scrape(settings)
        assert value(s, "shopflow_mailbox_depth", actor="emailer") == 12
        assert value(s, "shopflow_actor_restarts_total", actor="emailer") == 2

        kill_process(first)  # a crash: no exit hook, the scrape sweeps it
        s = scrape(settings)
        assert value(s, "shopflow_mailbox_depth", actor="emailer") == 7
        assert value(s, "shopflow_actor_restarts_total", actor="emailer") == 2

        assert stop_process(second) == 0  # a clean exit forgets its own live gauges
        s = scrape(settings)
        assert value(s, "shopflow_mailbox_depth", actor="emailer") is None
        assert value(s, "shopflow_actor_restarts_total", actor="emailer") == 2
        assert value(s, "shopflow_cron_last_success_timestamp_seconds",
                     schedule="cleanup_carts") == 1_700_000_000, "max gauges outlive the writer"
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                kill_process(proc)


def test_prepare_empties_the_directory(settings: Settings) -> None:
    path = prepare_metrics_dir(settings)
    (path / "counter_12345.db").write_bytes(b"stale")
    prepare_metrics_dir(settings)
    assert list(path.iterdir()) == []
    body, content_type = render_metrics(settings)
    assert content_type.startswith("text/plain")
    assert body == b""


@pytest.mark.slow
def test_the_scrape_counts_10000_jobs_across_restarts(settings: Settings) -> None:
    """Six processes in turn (five restarts) record 10,002 jobs over 24 actors: the sum is
    exact and no dead process's live gauge lingers. (How long the scrape takes is measured
    by ops/bench/metrics_scrape.py over HTTP on a real api: BENCHMARKS.md.)"""
    prepare_metrics_dir(settings)
    env = process_env(settings)
    for _ in range(6):
        proc = start_process([*GAUGES, "1", "1667"], env)
        kill_process(proc)
    s = scrape(settings)
    assert total(s, "shopflow_jobs_total") == 6 * 1667
    assert total(s, "shopflow_jobs_total", outcome="failed") == 6 * 34  # every 50th of 1667
    assert total(s, "shopflow_job_duration_seconds_count") == 6 * 1667
    assert value(s, "shopflow_actor_restarts_total", actor="emailer") == 6
    assert value(s, "shopflow_mailbox_depth", actor="emailer") is None


def test_log_lines_inside_a_job_carry_its_ids(settings: Settings) -> None:
    """The middleware puts job id, queue, actor, the order the actor takes and the order's
    correlation id on every log line the job writes."""
    lines: list[dict[str, object]] = []
    logged = threading.Event()

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    logger = logging.getLogger("tests.job")
    logger.addHandler(handler := Capture())
    broker = setup_broker(settings, [MetricsMiddleware(settings)])

    def speaks(order_id: int) -> None:
        logger.warning("reserving stock")
        logged.set()

    spec = JobSpec(QUEUE_INVENTORY, "obs_speaks")
    declare_actor(broker, spec, speaks)
    worker = dramatiq.Worker(broker, queues={QUEUE_INVENTORY}, worker_threads=1,
                             worker_timeout=50)
    worker.start()
    try:
        message = spec.send(broker, 42, correlation_id=CORRELATION_ID)
        assert logged.wait(20)
    finally:
        worker.stop()
        broker.close()
        logger.removeHandler(handler)
    keys = ("job_id", "queue", "actor", "retries", "order_id", "correlation_id", "msg")
    assert {k: lines[0].get(k) for k in keys} == {
        "job_id": message.message_id, "queue": "inventory", "actor": "obs_speaks", "retries": 0,
        "order_id": 42, "correlation_id": CORRELATION_ID, "msg": "reserving stock"}


def _in_process_worker(settings: Settings, threads: int = 2) -> tuple[JobBroker, dramatiq.Worker]:
    """A job broker measured by a MetricsMiddleware, and a worker on it (not started)."""
    prepare_metrics_dir(settings)
    broker = setup_broker(settings, [MetricsMiddleware(settings)])
    count_sweeps(broker, get_metrics(settings))
    return broker, make_worker(broker, {QUEUE_INVENTORY}, threads)


def test_a_cancelled_job_ends_once_as_cancelled_and_hand_backs_are_counted_apart(
        settings: Settings) -> None:
    """A cancelled run is `cancelled` (not a retry); a job a limit holds back 3+ times ends once."""
    settings = replace(settings, job_limit_wait_ms=20)
    broker, worker = _in_process_worker(settings)
    started, release = threading.Event(), threading.Event()

    def cancellable() -> None:
        job = current_job()
        assert job is not None
        started.set()
        while True:
            job.check_cancelled()
            time.sleep(0.01)

    def blocker(tag: str) -> None:
        if tag == "first":
            assert release.wait(20)

    cancel_spec = JobSpec(QUEUE_INVENTORY, "obs_cancellable")
    limited_spec = JobSpec(QUEUE_INVENTORY, "obs_limited")
    declare_actor(broker, cancel_spec, cancellable)
    declare_actor(broker, limited_spec, blocker, concurrency=1)
    worker.start()
    try:
        cancelled = cancel_spec.send(broker)
        assert started.wait(20)
        assert broker.jobs("cancel", cancelled.job_id)[0] == "requested"
        first = limited_spec.send(broker, "first")
        second = limited_spec.send(broker, "second")
        wait_until(lambda: (value(scrape(settings), "shopflow_job_requeues_total",
                                  queue="inventory", reason="limited") or 0) >= 3,
                   what="the second limited job to be handed back three times")
        release.set()
        wait_until(lambda: value(scrape(settings), "shopflow_jobs_total", queue="inventory",
                                 actor="obs_limited", outcome="completed") == 2,
                   what="both limited jobs to complete")
        wait_until(lambda: value(scrape(settings), "shopflow_jobs_total", queue="inventory",
                                 actor="obs_cancellable", outcome="cancelled") == 1,
                   what="the cancelled job to end")
    finally:
        release.set()
        worker.stop()
        broker.close()
    s = scrape(settings)
    assert first.job_id != second.job_id
    assert value(s, "shopflow_job_retries_total", queue="inventory",
                 actor="obs_cancellable") is None, "a cancelled job is not a retry"
    assert value(s, "shopflow_jobs_total", queue="inventory", actor="obs_limited",
                 outcome="skipped") is None, "a hand-back is not an end"
    assert total(s, "shopflow_jobs_total") == 3, "three jobs, three ends"
    assert _outcomes(settings, "inventory") == {"completed": 2, "cancelled": 1}


def test_a_job_held_by_a_dead_worker_counts_one_stall(settings: Settings) -> None:
    """A worker that fetched and started a job, then stopped beating: the keeper's sweep
    reports the job stalled once (shopflow_job_stalls_total) and it runs again."""
    settings = replace(settings, broker_heartbeat_timeout_ms=1_000, job_sweep_interval_s=0.2,
                       job_backoff_ms=50)
    broker, worker = _in_process_worker(settings, threads=1)
    ran = threading.Event()
    spec = JobSpec(QUEUE_INVENTORY, "obs_stalls")
    declare_actor(broker, spec, lambda: ran.set())
    sent = spec.send(broker)
    rid = sent.message.options["redis_message_id"]
    dead = "dead-worker"
    assert broker.jobs("fetch", QUEUE_INVENTORY, dead, 1)[1] == rid
    assert broker.jobs("start", QUEUE_INVENTORY, rid, sent.job_id, spec.actor, dead, 1, "",
                       "")[0] == "run"
    broker.client.zadd(broker.keys.heartbeats, {dead: 0})
    worker.start()
    try:
        assert ran.wait(20), "the stalled job ran again"
        wait_until(lambda: value(scrape(settings), "shopflow_job_stalls_total",
                                 queue="inventory") == 1, what="the stall to be counted")
    finally:
        worker.stop()
        broker.close()
