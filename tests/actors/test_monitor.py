"""The queue monitor's thresholds: pure rules, then real Dramatiq queues on real Redis."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import dramatiq
import pytest
import redis.asyncio as aioredis

from actors.monitor.queue_stats import QueueStats
from actors.monitor.rules import (
    BACKLOG,
    FAILURE_RATE,
    NO_CONSUMER,
    OLDEST_JOB_AGE,
    Thresholds,
    evaluate,
)
from actors.monitor.service import QueueMonitor
from runtime.alerts import Alerter, page_job_failed
from runtime.broker import (
    QUEUE_EMAILS,
    QUEUE_FULFILLMENT,
    QUEUE_INVENTORY,
    QUEUE_SUPPORT,
    JobSpec,
    declare_actor,
    setup_broker,
)
from runtime.cli import main
from runtime.errors import ConfigError, PermanentJobError
from runtime.metrics import get_metrics
from runtime.metrics_middleware import MetricsMiddleware
from runtime.settings import Settings
from tests.runtime.metrics_helpers import scrape, value
from tests.runtime.webhook_receiver import Receiver, webhook_receiver

ROOT = Path(__file__).resolve().parents[2]
LIMITS = Thresholds(backlog=1000, backlog_by_queue={"emails": 5}, oldest_age_s=300,
                    oldest_age_s_by_queue={}, failure_ratio=0.2, failure_min_attempts=20,
                    no_consumer_grace_s=60, failure_ratio_by_queue={"support": 0.5},
                    no_consumer_grace_s_by_queue={"inventory": 10})


def _stats(**changes: object) -> QueueStats:
    base = QueueStats(queue="emails", waiting=0, active=0, delayed=0, failed=0,
                      oldest_waiting_age_s=None, consumers=1, stalled=0, attempts_in_window=0,
                      failures_in_window=0)
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "fires"), [
    ({}, set()),
    ({"waiting": 5}, set()),
    ({"waiting": 6}, {BACKLOG}),
    ({"queue": "inventory", "waiting": 6}, set()),
    ({"queue": "inventory", "waiting": 1001}, {BACKLOG}),
    ({"waiting": 1, "oldest_waiting_age_s": 300.0}, set()),
    ({"waiting": 1, "oldest_waiting_age_s": 301.0}, {OLDEST_JOB_AGE}),
    ({"attempts_in_window": 19, "failures_in_window": 19}, set()),
    ({"attempts_in_window": 20, "failures_in_window": 4}, set()),
    ({"attempts_in_window": 20, "failures_in_window": 5}, {FAILURE_RATE}),
    ({"waiting": 1, "consumers": 0, "oldest_waiting_age_s": 59.0}, set()),
    ({"waiting": 1, "consumers": 0, "oldest_waiting_age_s": 60.0}, {NO_CONSUMER}),
    ({"waiting": 0, "consumers": 0, "oldest_waiting_age_s": None}, set()),
    # Per-queue overrides: support tolerates half its attempts failing, inventory no idle wait.
    ({"queue": "support", "attempts_in_window": 20, "failures_in_window": 10}, set()),
    ({"queue": "support", "attempts_in_window": 20, "failures_in_window": 11}, {FAILURE_RATE}),
    ({"queue": "inventory", "attempts_in_window": 20, "failures_in_window": 5}, {FAILURE_RATE}),
    ({"queue": "inventory", "waiting": 1, "consumers": 0, "oldest_waiting_age_s": 9.0}, set()),
    ({"queue": "inventory", "waiting": 1, "consumers": 0, "oldest_waiting_age_s": 10.0},
     {NO_CONSUMER}),
    ({"queue": "support", "waiting": 1, "consumers": 0, "oldest_waiting_age_s": 59.0}, set()),
])
def test_rules(changes: dict[str, object], fires: set[str]) -> None:
    assert {alert.name for alert, firing in evaluate(_stats(**changes), LIMITS) if firing} == fires


def test_thresholds_come_from_settings() -> None:
    settings = Settings.from_env({"SHOPFLOW_MONITOR_BACKLOG_THRESHOLDS": "emails=5,support=50",
                                  "SHOPFLOW_MONITOR_OLDEST_AGE_THRESHOLDS_S": "emails=30"})
    limits = Thresholds.from_settings(settings)
    assert (limits.backlog_for("emails"), limits.backlog_for("support"),
            limits.backlog_for("inventory")) == (5, 50, 1000)
    assert (limits.oldest_age_s_for("emails"), limits.oldest_age_s_for("support")) == (30, 300)


def test_failure_rate_and_no_consumer_overrides_come_from_settings() -> None:
    settings = Settings.from_env({"SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLDS": "support=0.5",
                                  "SHOPFLOW_MONITOR_NO_CONSUMER_GRACES_S": "emails=15,analytics=600",
                                  "SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLD": "0.1"})
    limits = Thresholds.from_settings(settings)
    assert (limits.failure_ratio_for("support"), limits.failure_ratio_for("emails")) == (0.5, 0.1)
    assert (limits.no_consumer_grace_s_for("emails"), limits.no_consumer_grace_s_for("analytics"),
            limits.no_consumer_grace_s_for("support")) == (15, 600, 60)
    alert, firing = next((a, f) for a, f in evaluate(
        _stats(queue="support", attempts_in_window=20, failures_in_window=8), limits)
        if a.name == FAILURE_RATE)
    assert not firing and "limit 50%" in alert.summary


@pytest.mark.parametrize(("variable", "raw"), [
    ("SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLDS", "support=1.5"),
    ("SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLDS", "support"),
    ("SHOPFLOW_MONITOR_NO_CONSUMER_GRACES_S", "emails=-1"),
    ("SHOPFLOW_MONITOR_NO_CONSUMER_GRACES_S", "emails=soon"),
])
def test_bad_per_queue_overrides_are_refused_with_the_variable_named(variable: str,
                                                                     raw: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: raw})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as r:
        yield r


def _names(alerts: object) -> set[tuple[str, str]]:
    return {(a.name, a.labels["queue"]) for a in alerts}  # type: ignore[attr-defined]


def _notified(report: object) -> set[tuple[str, str, bool]]:
    return {(a.name, a.labels["queue"], f) for a, f in report.notified}  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_monitor_reads_real_queues_and_pages_once(
    settings: Settings, receiver: Receiver
) -> None:
    settings = replace(settings, alert_webhook_url=receiver.url,
                       monitor_backlog_thresholds=(("emails", 5.0),),
                       monitor_failure_rate_min_jobs=1)
    release = threading.Event()
    broker = setup_broker(settings, [MetricsMiddleware(settings)])

    def blocks() -> None:
        release.wait(30)

    def fails() -> None:
        raise PermanentJobError("never works")

    block = JobSpec(QUEUE_SUPPORT, "obs_blocks")
    fail = JobSpec(QUEUE_SUPPORT, "obs_fails")
    declare_actor(broker, block, blocks)
    declare_actor(broker, fail, fails)
    for n in range(6):
        JobSpec(QUEUE_EMAILS, "send_email").send(broker, n)
    for n in range(3):
        JobSpec(QUEUE_INVENTORY, "reserve").send(broker, n)
    JobSpec(QUEUE_FULFILLMENT, "advance").send(broker, 1, delay_ms=600_000)
    worker = dramatiq.Worker(broker, queues={QUEUE_SUPPORT}, worker_threads=1, worker_timeout=50)
    worker.start()
    client = aioredis.Redis.from_url(settings.redis_url or "")
    now_s = [time.time()]
    metrics = get_metrics(settings)
    monitor = QueueMonitor(settings, client, Alerter(settings, client, metrics), metrics,
                           [QUEUE_EMAILS, QUEUE_INVENTORY, QUEUE_FULFILLMENT, QUEUE_SUPPORT],
                           clock=lambda: now_s[0])
    try:
        fail.send(broker)
        block.send(broker)

        async def support() -> QueueStats:
            now_s[0] = time.time()
            return {s.queue: s for s in (await monitor.check()).stats}[QUEUE_SUPPORT]

        deadline = time.monotonic() + 20
        while (s := await support()).failed < 1 or s.active < 1:
            assert time.monotonic() < deadline, s
            await asyncio.sleep(0.05)
        report = await monitor.check()
        stats = {s.queue: s for s in report.stats}
        assert (stats["emails"].waiting, stats["inventory"].waiting) == (6, 3)
        assert stats["fulfillment"].delayed == 1
        assert (stats["support"].failed, stats["support"].active,
                stats["support"].consumers, stats["support"].failure_ratio) == (1, 1, 1, 1.0)
        assert stats["emails"].consumers == 0
        assert _names(report.firing) == {(BACKLOG, "emails"), (FAILURE_RATE, "support")}
        assert report.notified == (), "the checks while waiting paged already"
        bodies = await receiver.wait_for(2)
        assert {(b["status"], b["alerts"][0]["labels"]["alertname"]) for b in bodies} == {
            ("firing", BACKLOG), ("firing", FAILURE_RATE)}

        now_s[0] += 400  # jobs now old; the worker's heartbeat and the failure window are past
        report = await monitor.check()
        assert _notified(report) == {
            (OLDEST_JOB_AGE, "emails", True), (OLDEST_JOB_AGE, "inventory", True),
            (NO_CONSUMER, "emails", True), (NO_CONSUMER, "inventory", True),
            (FAILURE_RATE, "support", False)}
        assert (await monitor.check()).notified == ()
        snap = scrape(settings)
        assert value(snap, "shopflow_queue_jobs", queue="emails", state="waiting") == 6
        assert (value(snap, "shopflow_queue_oldest_job_age_seconds", queue="emails") or 0) >= 400

        broker.flush(QUEUE_EMAILS)
        report = await monitor.check()
        assert {(BACKLOG, "emails", False), (OLDEST_JOB_AGE, "emails", False),
                (NO_CONSUMER, "emails", False)} <= _notified(report)
        await receiver.wait_for(10)
        assert len(receiver.bodies) == 10
    finally:
        release.set()
        worker.stop()
        broker.close()
        await client.aclose()


def test_monitor_once_command(settings: Settings, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``shopflow monitor --once`` prints every queue; exit 1 when an alert fires."""
    for key, val in replace(settings, monitor_backlog_thresholds=(("emails", 1.0),)).to_env(
    ).items():
        monkeypatch.setenv(key, val)
    assert main(["monitor", "--once"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["queue", "waiting", "active", "delayed", "failed",
                                           "oldest_s", "consumers", "fail%"]
    assert len(out.splitlines()) == 1 + 8
    producer = setup_broker(settings)
    for n in range(2):
        JobSpec(QUEUE_EMAILS, "send_email").send(producer, n)
    producer.close()
    assert main(["monitor", "--once"]) == 1
    assert "FIRING warning: QueueBacklog: 2 jobs wait in emails (limit 1)" in capsys.readouterr().out


async def test_each_check_delivers_what_the_webhook_refused_before(
    settings: Settings, receiver: Receiver
) -> None:
    """A worker's failed-job page met a webhook that was down; the monitor's next check,
    once the webhook is back, delivers it (once)."""
    now_s = [1_000.0]
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    metrics = get_metrics(settings)
    try:
        worker_side = Alerter(settings, client, clock=lambda: now_s[0])
        receiver.status = 503
        assert not await page_job_failed(worker_side, QUEUE_EMAILS, "send_order_confirmation",
                                         "msg-7", "boom", order_id=7)
        receiver.status = 200
        now_s[0] += 60
        monitor = QueueMonitor(settings, client,
                               Alerter(settings, client, metrics, clock=lambda: now_s[0]),
                               metrics, [QUEUE_EMAILS], clock=lambda: now_s[0])
        assert len((await monitor.check()).redelivered) == 1
        assert (await monitor.check()).redelivered == ()
    finally:
        await client.aclose()
    [body] = await receiver.wait_for(1)
    assert "order 7" in body["alerts"][0]["annotations"]["summary"]


def _shopflow(settings: Settings, *args: str) -> subprocess.Popen[str]:
    """``shopflow ARGS`` as its own process on the test's servers, output piped."""
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT,
                            env={**os.environ, **settings.to_env()}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_monitor_without_options_checks_once_and_returns(settings: Settings) -> None:
    """"Check every queue once" is what the bare command does: a table, then the prompt back."""
    proc = _shopflow(settings, "monitor")
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["queue", "waiting"] and len(lines) == 1 + 8


def test_monitor_every_prints_each_check_until_it_is_stopped(settings: Settings) -> None:
    """``--every S``: a stamped table per check as it happens; SIGTERM ends it with exit 0."""
    proc = _shopflow(settings, "monitor", "--every", "0.2")
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        checks: list[list[str]] = []
        while len(checks) < 2:
            line = lines.get(timeout=60)
            assert line is not None, f"monitor exited early: {proc.wait(10)}"
            if line.startswith("check at "):
                checks.append([line])
            elif checks and line:
                checks[-1].append(line)
        assert settings.zone.key in checks[0][0]
        assert checks[0][1].split()[:2] == ["queue", "waiting"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        reader.join(10)
