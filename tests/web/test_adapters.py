"""The seam adapters for concerns already on main, against real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from runtime.broker import ALL_QUEUES, setup_broker
from runtime.errors import NotFound
from runtime.jobs.store import JobStore
from runtime.settings import Settings
from web.adapters import BrokerModeration, ScheduleOverview, StoreJobsAdmin


async def test_schedule_overview_lists_builtin_schedules_with_next_runs(
        web_settings: Settings, redis: aioredis.Redis) -> None:
    schedules = await ScheduleOverview(redis, web_settings).schedules()
    by_name = {s["name"]: s for s in schedules}
    assert "expired-reservations" in by_name
    assert by_name["expired-reservations"]["next_run_at"] is not None
    assert isinstance(by_name["daily-report"]["cron"], str)


async def test_broker_moderation_enqueues_the_agents_message(
        web_settings: Settings, redis: aioredis.Redis) -> None:
    broker = setup_broker(web_settings)
    try:
        await BrokerModeration(broker).request_moderation(41)
    finally:
        broker.close()
    keys = [k async for k in redis.scan_iter(match=f"{web_settings.namespace}*moderation*")]
    assert keys, "no moderation queue key in Redis"


async def test_the_jobs_admin_answers_an_unknown_queue_as_the_seam_says(
        web_settings: Settings, redis: aioredis.Redis) -> None:
    """NotFound (web/seams.py), which POST /api/v1/jobs turns into a 422 on ``queue``."""
    broker = setup_broker(web_settings)
    try:
        admin = StoreJobsAdmin(JobStore(redis, broker.keys, ALL_QUEUES))
        with pytest.raises(NotFound, match="no queue 'emials'"):
            await admin.send_job("emials", "send_order_confirmation", [1], {})
    finally:
        broker.close()
