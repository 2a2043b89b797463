"""Helpers for the scheduler tests: read what actually landed on the broker."""

from __future__ import annotations

from collections import Counter
from typing import Any

import dramatiq
import redis

from runtime.settings import Settings


def enqueued(settings: Settings, queue: str) -> list[dramatiq.Message[Any]]:
    """Every message waiting on ``queue`` in the test's broker namespace (read from Redis)."""
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        raw = client.hvals(f"{settings.namespace}-jobs:{queue}.msgs")
    finally:
        client.close()
    return [dramatiq.Message.decode(value if isinstance(value, bytes) else value.encode())
            for value in raw]


def slots_sent(settings: Settings, queue: str) -> Counter[tuple[str, str]]:
    """How many messages each (schedule, slot) got on ``queue``."""
    return Counter(
        (m.options["sched_name"], m.options["sched_slot"]) for m in enqueued(settings, queue)
    )
