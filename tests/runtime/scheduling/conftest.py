"""Fixtures shared by the scheduler's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from runtime.scheduling import connect_redis
from runtime.settings import Settings


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A client of the test session's Redis, made the way the scheduler makes its own."""
    client = connect_redis(settings.redis_url or "")
    yield client
    await client.aclose()
