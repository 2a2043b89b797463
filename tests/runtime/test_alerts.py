"""Alerts page once per incident, resolve once, and reach a real webhook receiver."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from dramatiq import Worker

from runtime.alerts import (
    Alert,
    Alerter,
    Severity,
    alerts_stream,
    job_failure_pager,
    page_job_failed,
)
from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.errors import PermanentJobError
from runtime.loop import LoopBridge
from runtime.metrics_middleware import FailedJob
from runtime.observability import install_job_metrics
from runtime.process import ProcessContext
from runtime.settings import Settings
from tests.runtime.metrics_helpers import kill_process, process_env, start_process, stop_process
from tests.runtime.metrics_worker import CRITICAL, PERMANENT
from tests.runtime.webhook_receiver import Receiver, webhook_receiver
from tests.support import free_port

BACKLOG = Alert("QueueBacklog", Severity.WARNING, "1,234 jobs wait in emails",
                labels={"queue": "emails"}, details={"waiting": 1234})


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    yield client
    await client.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as r:
        yield r


def _statuses(receiver: Receiver) -> list[tuple[str, str]]:
    return [(b["status"], b["alerts"][0]["labels"]["alertname"]) for b in receiver.bodies]


async def test_pages_once_per_incident_and_resolves_once(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    settings = replace(settings, alert_webhook_url=receiver.url)
    other_client = aioredis.Redis.from_url(settings.redis_url or "")
    one, two = Alerter(settings, redis_client), Alerter(settings, other_client)  # two processes
    try:
        assert await one.fire(BACKLOG) is True
        assert await two.fire(BACKLOG) is False
        assert await one.fire(replace(BACKLOG, details={"waiting": 1500})) is False
        assert list(await one.open_incidents()) == [BACKLOG.fingerprint]
        results = await asyncio.gather(one.resolve(BACKLOG), two.resolve(BACKLOG))
        assert sorted(results) == [False, True], "exactly one process sends the resolve"
        assert await one.resolve(BACKLOG) is False
        assert await two.fire(BACKLOG) is True, "a new incident after the old one cleared"
    finally:
        await other_client.aclose()
    bodies = await receiver.wait_for(3)
    assert _statuses(receiver) == [("firing", "QueueBacklog"), ("resolved", "QueueBacklog"),
                                   ("firing", "QueueBacklog")]
    first = bodies[0]["alerts"][0]
    assert first["labels"] == {"alertname": "QueueBacklog", "severity": "warning",
                               "queue": "emails"}
    assert first["fingerprint"] == BACKLOG.fingerprint
    assert bodies[1]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
    events: Any = await redis_client.xrange(alerts_stream(settings.namespace))
    assert [e[1][b"type"] for e in events] == [b"alert.firing", b"alert.resolved",
                                              b"alert.firing"]


async def test_a_page_the_webhook_refused_is_retried_by_the_next_check(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    now_s = [1_000.0]
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    alerter = Alerter(settings, redis_client, clock=lambda: now_s[0])
    receiver.status = 503
    assert await alerter.fire(BACKLOG) is False
    receiver.status = 200
    assert await alerter.fire(BACKLOG) is False, "another delivery may still be under way"
    now_s[0] += 60
    assert await alerter.fire(BACKLOG) is True
    assert await alerter.fire(BACKLOG) is False
    await receiver.wait_for(1)
    assert _statuses(receiver) == [("firing", "QueueBacklog")]


async def test_without_a_webhook_the_log_and_dashboard_get_it(
    settings: Settings, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    alerter = Alerter(settings, redis_client)
    assert await alerter.fire(BACKLOG) is True
    assert await alerter.fire(BACKLOG) is False
    assert await redis_client.xlen(alerts_stream(settings.namespace)) == 1
    assert [r.message for r in caplog.records if r.name == "runtime.alerts"] == [
        "alert firing: 1,234 jobs wait in emails"]


async def test_page_job_failed_pages_once_per_job(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    settings = replace(settings, alert_webhook_url=receiver.url)
    alerter = Alerter(settings, redis_client)
    args = ("emails", "send_order_confirmation", "msg-1", "SendGrid said 503")
    assert await page_job_failed(alerter, *args, order_id=42) is True
    assert await page_job_failed(alerter, *args, order_id=42) is False
    assert await page_job_failed(alerter, "emails", "send_order_confirmation", "msg-2",
                                 "boom") is True
    bodies = await receiver.wait_for(2)
    alert = bodies[0]["alerts"][0]
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["alertname"] == "JobFailedForGood"
    assert "order 42" in alert["annotations"]["summary"]


@pytest.mark.slow
async def test_a_critical_actor_failing_for_good_pages_from_a_real_worker(
    settings: Settings, receiver: Receiver
) -> None:
    settings = replace(settings, alert_webhook_url=receiver.url, job_attempts=1)
    producer = setup_broker(settings)
    worker = await asyncio.to_thread(start_process, ["-m", "tests.runtime.metrics_worker"],
                                     process_env(settings))
    try:
        CRITICAL.send(producer, 7)
        PERMANENT.send(producer, 8)  # not critical: no page
        CRITICAL.send(producer, 9)
        bodies = await receiver.wait_for(2)
        assert {b["alerts"][0]["labels"]["actor"] for b in bodies} == {"obs_critical"}
        assert all(b["alerts"][0]["labels"]["severity"] == "critical" for b in bodies)
        assert await asyncio.to_thread(stop_process, worker) == 0
        assert len(receiver.bodies) == 2
    finally:
        if worker.poll() is None:
            kill_process(worker)
        producer.close()


async def test_a_flapping_condition_pages_once_and_resolves_once(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    now_s = [1_000.0]
    settings = replace(settings, alert_webhook_url=receiver.url, alert_resolve_after_s=120)
    other_client = aioredis.Redis.from_url(settings.redis_url or "")
    one = Alerter(settings, redis_client, clock=lambda: now_s[0])
    two = Alerter(settings, other_client, clock=lambda: now_s[0])  # another process
    try:
        notified = []
        for firing in (True, False, True, False, True, False):  # a check every 60 s, flapping
            notified.append(await one.update(BACKLOG, firing))
            now_s[0] += 60
        assert notified == [True, False, False, False, False, False], "one page, no resolve yet"
        assert list(await one.open_incidents()) == [BACKLOG.fingerprint]
        assert await one.update(BACKLOG, False) is False, "clear for 60 s of the 120"
        now_s[0] += 60
        results = await asyncio.gather(one.resolve(BACKLOG), two.resolve(BACKLOG))
        assert sorted(results) == [False, True], "clear for 120 s: exactly one resolve"
        assert await one.open_incidents() == {}
    finally:
        await other_client.aclose()
    await receiver.wait_for(2)
    assert _statuses(receiver) == [("firing", "QueueBacklog"), ("resolved", "QueueBacklog")]


FAILS_FOR_ORDER = JobSpec(QUEUE_EMAILS, "obs_fails_for_order")
CONSUMED = JobSpec(QUEUE_EMAILS, "obs_consumed")


async def test_a_slow_webhook_does_not_stall_consumption_and_the_page_names_the_order(
    settings: Settings, receiver: Receiver
) -> None:
    # The on-call webhook hangs until the test lets go, well inside the POST's timeout.
    settings = replace(settings, alert_webhook_url=receiver.url, job_attempts=1,
                       alert_webhook_timeout_s=120.0)
    receiver.hold = asyncio.Event()
    consumed = threading.Event()

    def fails_for_order(order_id: int) -> None:
        raise PermanentJobError(f"order {order_id} cannot be confirmed")

    def consume(n: int) -> None:
        consumed.set()

    ctx = await asyncio.to_thread(ProcessContext.start, settings, 2)
    install_job_metrics(ctx)
    declare_actor(ctx.broker, FAILS_FOR_ORDER, fails_for_order, critical=True)
    declare_actor(ctx.broker, CONSUMED, consume)
    # One worker thread: had the page held the thread that saw the failure, nothing would run.
    worker = Worker(ctx.broker, queues={QUEUE_EMAILS}, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        FAILS_FOR_ORDER.send(ctx.broker, 42)
        await asyncio.wait_for(receiver.arrived.wait(), 20)  # the page is at the webhook, hanging
        CONSUMED.send(ctx.broker, 1)
        assert await asyncio.to_thread(consumed.wait, 20), (
            "the next job ran while the page was still hanging")
        assert receiver.bodies == []
        receiver.hold.set()
        [body] = await receiver.wait_for(1)
    finally:
        receiver.hold.set()
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(ctx.stop)
    alert = body["alerts"][0]
    assert alert["labels"]["actor"] == "obs_fails_for_order"
    assert "(order 42)" in alert["annotations"]["summary"]
    assert '"order_id": 42' in alert["annotations"]["details"]


async def test_a_page_that_fails_is_logged_not_lost(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = LoopBridge("test-pager").start()
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}")
    pager = job_failure_pager(Alerter(settings, unreachable), bridge)
    job = FailedJob("emails", "send_order_confirmation", "msg-9", (7,), "boom", 2)
    try:
        await asyncio.to_thread(pager, job)  # returns at once: the page runs on the loop
        assert await asyncio.to_thread(pager.drain, 30)
    finally:
        await asyncio.to_thread(bridge.run, unreachable.aclose())
        await asyncio.to_thread(bridge.stop)
    [record] = [r for r in caplog.records if "page for job msg-9" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None


async def test_a_resolve_the_webhook_refused_is_delivered_later_once(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    """The incident closes while the webhook is down: its resolve is kept in Redis and
    delivered once the webhook is back, by any process, exactly once."""
    now_s = [1_000.0]
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    alerter = Alerter(settings, redis_client, clock=lambda: now_s[0])
    assert await alerter.fire(BACKLOG) is True
    receiver.status = 503
    assert await alerter.resolve(BACKLOG) is True, "the incident is closed all the same"
    assert await alerter.open_incidents() == {}
    assert list(await alerter.undelivered()) == [f"{BACKLOG.fingerprint}:resolved:"
                                                 + receiver.bodies[0]["alerts"][0]["startsAt"]]
    now_s[0] += 60
    assert await alerter.deliver_pending() == [], "still refused: kept"
    receiver.status = 200
    now_s[0] += 60
    other = Alerter(settings, redis_client, clock=lambda: now_s[0])  # another process
    assert len(await other.deliver_pending()) == 1
    assert await alerter.deliver_pending() == []
    assert await alerter.undelivered() == {}
    await receiver.wait_for(2)
    assert _statuses(receiver) == [("firing", "QueueBacklog"), ("resolved", "QueueBacklog")]


async def test_a_refused_page_and_its_resolve_arrive_later_in_order(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    now_s = [1_000.0]
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    alerter = Alerter(settings, redis_client, clock=lambda: now_s[0])
    receiver.status = 503
    assert await alerter.fire(BACKLOG) is False
    receiver.status = 200
    assert await alerter.resolve(BACKLOG) is True  # queued behind the page, not sent first
    assert receiver.bodies == []
    now_s[0] += 60
    assert len(await alerter.deliver_pending()) == 2
    await receiver.wait_for(2)
    assert _statuses(receiver) == [("firing", "QueueBacklog"), ("resolved", "QueueBacklog")]


async def test_a_job_failed_page_the_webhook_refused_is_delivered_later_once(
    settings: Settings, redis_client: aioredis.Redis, receiver: Receiver
) -> None:
    """A job fails for good once: its page cannot wait for a second report. Kept, it goes
    out when the webhook is back, once, however often the failure is reported."""
    now_s = [1_000.0]
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    alerter = Alerter(settings, redis_client, clock=lambda: now_s[0])
    args = ("emails", "send_order_confirmation", "msg-1", "SendGrid said 503")
    receiver.status = 503
    assert await page_job_failed(alerter, *args, order_id=42) is False
    receiver.status = 200
    assert await page_job_failed(alerter, *args, order_id=42) is False, "reported again"
    now_s[0] += 60
    assert len(await alerter.deliver_pending()) == 1
    assert await alerter.deliver_pending() == []
    assert await page_job_failed(alerter, *args, order_id=42) is False
    [body] = await receiver.wait_for(1)
    assert body["alerts"][0]["labels"]["alertname"] == "JobFailedForGood"
    assert "order 42" in body["alerts"][0]["annotations"]["summary"]
    assert len(receiver.bodies) == 1
