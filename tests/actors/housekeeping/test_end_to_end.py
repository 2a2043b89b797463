"""The whole path with real time: `run_scheduler` (two instances) sends the heartbeat and the
housekeeping jobs, a worker with the housekeeping and reports concerns runs them through the
scheduler middleware, and /health's view turns healthy."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from actors.housekeeping import actor as housekeeping
from actors.housekeeping.command import render_schedules, run_scheduler
from actors.housekeeping.schedules import shop_schedules
from actors.reports import actor as reports
from actors.reports.messages import BUILD_DAILY_SALES_REPORT, SEND_DAILY_REPORT_TO_TEAM
from runtime.process import ProcessContext
from runtime.scheduling import (
    IntervalTrigger,
    Schedule,
    ScheduledRunMiddleware,
    Scheduler,
    SchedulerStore,
    connect_redis,
)
from runtime.scheduling.health import scheduler_health
from runtime.settings import Settings
from runtime.worker import build_root


class Finished(Middleware):
    """Probe: sets an event when every wanted actor has run once successfully."""

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = set(wanted)
        self.done = threading.Event()
        self.lock = threading.Lock()

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy,
                              *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if exception is None:
            with self.lock:
                self.wanted.discard(message.actor_name)
                if not self.wanted:
                    self.done.set()


class Meter:
    def __init__(self) -> None:
        self.carts: list[int] = []
        self.released: list[int] = []

    def carts_deleted(self, count: int) -> None:
        self.carts.append(count)

    def reservations_released(self, count: int) -> None:
        self.released.append(count)


class Observer:
    def __init__(self) -> None:
        self.runs: list[tuple[str, str, float | None]] = []

    def run_finished(self, schedule: str, outcome: str, duration_s: float | None) -> None:
        self.runs.append((schedule, outcome, duration_s))

    def run_started_late(self, schedule: str) -> None:
        pass


@pytest.mark.slow
async def test_scheduler_to_worker_heartbeat_and_housekeeping(settings: Settings) -> None:
    fast = replace(settings, cron_heartbeat_every_s=1, cart_cleanup_every_s=1,
                   reservation_release_every_s=2, scheduler_tick_s=0.1, scheduler_lease_s=1.0)
    probe = Finished({"cron_heartbeat", "clean_expired_carts", "release_expired_reservations"})
    meter, observer = Meter(), Observer()

    def start_worker() -> tuple[ProcessContext, Any, dramatiq.Worker]:
        ctx = ProcessContext.start(fast, pool_size=3)
        ctx.broker.add_middleware(probe)
        concerns = [housekeeping.concern(ctx, meter=meter, observer=observer),
                    reports.concern(ctx)]
        root = build_root("flow-worker", concerns).start()
        for c in concerns:  # declare adds the ScheduledRunMiddleware (once)
            c.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 30))
        assert sum(isinstance(m, ScheduledRunMiddleware) for m in ctx.broker.middleware) == 1
        worker = dramatiq.Worker(ctx.broker, queues={"maintenance", "analytics"},
                                 worker_threads=2, worker_timeout=100)
        worker.start()
        return ctx, root, worker

    ctx, root, worker = await asyncio.to_thread(start_worker)
    stop = asyncio.Event()
    schedulers = [asyncio.create_task(run_scheduler(fast, stop)) for _ in range(2)]
    try:
        assert await asyncio.to_thread(probe.done.wait, 60)
    finally:
        stop.set()
        assert await asyncio.gather(*schedulers) == [0, 0]
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(root.stop)
        await asyncio.to_thread(ctx.stop)

    redis = connect_redis(fast.redis_url or "")
    try:
        health = await scheduler_health(redis, fast.namespace, datetime.now(UTC))
        assert health.heartbeat_at is not None and health.heartbeat_age_s is not None
        assert health.heartbeat_age_s < 10
        store = SchedulerStore(redis, fast.namespace)
        state = await store.state("cron-heartbeat")
        assert state.last_status == "succeeded" and state.last_result
        assert not state.running
        carts = await store.state("expired-carts")
        assert carts.last_result == '{"carts": 0, "items": 0}'
        schedules = shop_schedules(fast)
        text = render_schedules(schedules, {s.name: await store.state(s.name) for s in schedules},
                                await store.lease(), datetime.now(UTC), fast.timezone)
        assert "cron-heartbeat  [builtin]  every 1s" in text
        assert "succeeded" in text
        assert 0 in meter.carts and 0 in meter.released
        assert any(name == "cron-heartbeat" and outcome == "succeeded" and (d or 0) > 0
                   for name, outcome, d in observer.runs)
    finally:
        await redis.aclose()


async def test_report_jobs_use_their_slot_as_now(settings: Settings, pool: asyncpg.Pool) -> None:
    """A report message for the 08:00 slot of 3 December, run days later, still reports on
    2 December; the 09:00 job hands it to the emailer once; both results are recorded."""
    probe = Finished({"build_daily_sales_report", "send_daily_report_to_team"})
    slot = datetime(2026, 11, 3, 11, 0, tzinfo=UTC)  # 08:00 in Sao Paulo, a month ago

    def run() -> None:
        ctx = ProcessContext.start(settings, pool_size=2)
        ctx.broker.add_middleware(probe)
        concern = reports.concern(ctx)
        root = build_root("flow-worker", [concern]).start()
        concern.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 30))
        for name, spec in (("daily-sales-report", BUILD_DAILY_SALES_REPORT),
                           ("daily-report", SEND_DAILY_REPORT_TO_TEAM)):
            message = Scheduler._message(Schedule(name, IntervalTrigger(60), spec), slot)
            ctx.broker.enqueue(message)
        worker = dramatiq.Worker(ctx.broker, queues={"analytics"}, worker_threads=1,
                                 worker_timeout=100)
        worker.start()
        try:
            assert probe.done.wait(60)
        finally:
            worker.stop()
            root.stop()
            ctx.stop()

    await asyncio.to_thread(run)
    dates = [r["report_date"].isoformat() for r in
             await pool.fetch("SELECT report_date FROM daily_sales_reports")]
    assert dates == ["2026-11-02"]
    jobs = await pool.fetch("SELECT job FROM outbox WHERE job IS NOT NULL")
    assert [j["job"]["args"] for j in jobs] == [["2026-11-02"]]
    redis = connect_redis(settings.redis_url or "")
    try:
        store = SchedulerStore(redis, settings.namespace)
        built = await store.state("daily-sales-report")
        assert built.last_status == "succeeded"
        assert built.last_result == '{"report_date": "2026-11-02", "orders": 0, "revenue_cents": 0}'
        sent = await store.state("daily-report")
        assert sent.last_result == '{"handed_off": true}'
    finally:
        await redis.aclose()
