"""The seam adapters for concerns already on main, against real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from runtime.broker import setup_broker
from runtime.settings import Settings
from web.adapters import BrokerModeration, ScheduleOverview


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
