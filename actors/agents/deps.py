"""The collaborators every agent function takes, built once per process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from actors.agents.limits import SharedLimits
from actors.agents.llm import LlmGateway, build_client
from actors.agents.metrics import AgentMetrics, create_agent_metrics
from runtime import db
from runtime.loop import LoopBridge
from runtime.settings import Settings


def utc_now() -> datetime:
    """The real clock; tests pass their own."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class AgentDeps:
    """What the agent functions need: settings, database, Redis, the model gateway, metrics.

    ``bridge`` is the process's event-loop bridge that owns ``pool`` and
    ``redis``; only the Dramatiq actors (which run in worker threads) use it.
    """

    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    llm: LlmGateway
    limits: SharedLimits
    metrics: AgentMetrics
    clock: Callable[[], datetime] = field(default=utc_now)
    bridge: LoopBridge | None = None


def build_deps(
    settings: Settings, pool: asyncpg.Pool, redis: Redis, metrics: AgentMetrics,
    clock: Callable[[], datetime] = utc_now, bridge: LoopBridge | None = None,
) -> AgentDeps:
    """Deps from resources the caller owns (the caller closes them)."""
    limits = SharedLimits(redis, settings.namespace, settings.zone)
    llm = LlmGateway(settings, build_client(settings), limits, metrics, clock)
    return AgentDeps(settings, pool, redis, llm, limits, metrics, clock, bridge)


@asynccontextmanager
async def open_deps(
    settings: Settings, registry: CollectorRegistry, bridge: LoopBridge | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> AsyncIterator[AgentDeps]:
    """Open a pool and a Redis client for the agents, create their metrics, close on exit.

    Run it on the loop that will run the agent functions (the bridge's loop in
    a worker process).
    """
    redis_url, database_url = settings.require_urls()
    pool = await db.create_pool(database_url)
    redis = Redis.from_url(redis_url)
    deps = build_deps(settings, pool, redis, create_agent_metrics(registry), clock, bridge)
    try:
        yield deps
    finally:
        await deps.llm.aclose()
        await redis.aclose()
        await pool.close()
