"""The cron heartbeat job: proof that scheduler, broker and worker all work."""

from __future__ import annotations

from datetime import datetime

import redis.asyncio as aioredis

from runtime.scheduling.health import write_heartbeat


async def beat(redis: aioredis.Redis, namespace: str, now: datetime, ttl_s: int) -> str:
    """Write ``<namespace>:cron:heartbeat`` = ``now`` with a ``ttl_s`` expiry; return the value."""
    await write_heartbeat(redis, namespace, now, ttl_s)
    return now.isoformat()
