"""Plugging the concerns into the web seams of one api process.

The handlers in ``web/api_extra.py`` talk to small Protocols (``web/seams.py``);
this module gives each its real implementation on this process's pool, Redis
and broker. Concerns that are not there yet leave their seam empty and their
endpoints answer 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import asyncpg
import dramatiq
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from actors.agents.deps import AgentDeps, build_deps
from actors.agents.messages import RECOMMEND
from actors.agents.metrics import create_agent_metrics
from actors.agents.recommendation import recommendations_now
from actors.agents.support import answer_support
from runtime.broker import ALL_QUEUES
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.store import JobStore
from runtime.metrics import get_metrics
from runtime.settings import Settings
from runtime.tree import SupervisionTreeView
from web import seams
from web.adapters import BrokerModeration, ScheduleOverview, StoreJobsAdmin

JsonDict = dict[str, Any]


RefreshRequest = Callable[[int], Awaitable[Any]]


class BrokerRecommendationRefresh:
    """Queues the ``RECOMMEND`` job of a customer, once while one is waiting or running."""

    def __init__(self, broker: dramatiq.Broker, dedup_s: int) -> None:
        self._broker = broker
        self._dedup_s = dedup_s

    async def __call__(self, customer_id: int) -> Submitted:
        """Enqueue it (Dramatiq's enqueue blocks on Redis: run it off the loop)."""
        return await asyncio.to_thread(
            RECOMMEND.send, self._broker, customer_id, True,
            job_id=f"recommend:{customer_id}", dedup_s=self._dedup_s)


class AgentRecommender:
    """Recommendations over HTTP: never waits for the model.

    The cached answer if there is one; otherwise the SQL ranking at once,
    labelled ``fallback`` / ``pending``, while ``request_refresh`` queues the
    job that asks the model and fills the cache for the next request. A GET
    therefore answers in milliseconds even when the API is slow or hangs.
    """

    def __init__(self, deps: AgentDeps, request_refresh: RefreshRequest) -> None:
        self._deps = deps
        self._request_refresh = request_refresh

    async def recommend(self, customer_id: int, limit: int) -> JsonDict:
        result = await recommendations_now(self._deps, customer_id)
        if not result.cached:
            await self._request_refresh(customer_id)
        data: JsonDict = {
            "customer_id": result.customer_id, "source": result.source,
            "fallback_reason": result.fallback_reason, "generated_at": result.generated_at,
            "items": [asdict(item) for item in result.items[:limit]],
        }
        return data


class AgentSupportDesk:
    """Support answers; each interaction is logged by the agent."""

    def __init__(self, deps: AgentDeps) -> None:
        self._deps = deps

    async def ask(self, customer_id: int, question: str) -> JsonDict:
        answer = await answer_support(self._deps, customer_id, question)
        return {"id": answer.interaction_id, "answer": answer.answer, "source": answer.source,
                "source_detail": answer.source_detail}


def plug_seams(app: web.Application, settings: Settings, pool: asyncpg.Pool,
               redis: aioredis.Redis, broker: JobBroker) -> None:
    """Set every seam this process can serve (call once the resources are open)."""
    get_metrics(settings)  # multiprocess mode first, so the agents' metrics are summed too
    deps = build_deps(settings, pool, redis, create_agent_metrics(CollectorRegistry(auto_describe=False)))
    # one refresh job per customer at a time; a fallback answer is cached this long anyway
    refresh = BrokerRecommendationRefresh(broker, settings.recommendation_fallback_ttl_s)
    app[seams.RECOMMENDER] = AgentRecommender(deps, refresh)
    app[seams.SUPPORT_DESK] = AgentSupportDesk(deps)
    app[seams.SCHEDULES] = ScheduleOverview(redis, settings)
    app[seams.SUPERVISION] = SupervisionTreeView(settings)
    app[seams.REVIEW_MODERATION] = BrokerModeration(broker)
    app[seams.JOBS_ADMIN] = StoreJobsAdmin(
        JobStore(redis, broker.keys, sorted(broker.get_declared_queues() | set(ALL_QUEUES)),
                 broker.config.bounds, broker.hooks, keep_failed=broker.config.keep_failed))
