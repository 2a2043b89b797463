"""Thin Dramatiq actors around the agent functions, and the agents-worker concern.

Two ways to run them, one code path:

- :func:`concern` plugs the agents into the runtime's worker process (like the
  other concerns): three supervised pykka actors (one per agent) behind the
  thin Dramatiq actors; add it as the ``agents`` worker kind.
- :func:`register_actors` binds the same thin actors to call the agent
  functions directly on ``deps.bridge`` (no pykka), for tests and tools.

The thin actors run in Dramatiq worker threads. While a job has attempts
left, an API failure raises (Dramatiq retries it with backoff); on the last
attempt the agent answers from its fallback. Bad input and unknown ids are
permanent failures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
import pykka
from dramatiq.middleware import CurrentMessage
from prometheus_client import CollectorRegistry

from actors.agents.deps import AgentDeps, build_deps
from actors.agents.messages import (
    ANSWER_SUPPORT,
    MODERATE_REVIEW,
    RECOMMEND,
    REFRESH_RECOMMENDATIONS,
)
from actors.agents.metrics import create_agent_metrics
from actors.agents.moderation import moderate_review
from actors.agents.recommendation import active_customer_ids, recommend
from actors.agents.support import answer_support
from runtime.broker import QUEUE_MODERATION, QUEUE_RECOMMENDATIONS, QUEUE_SUPPORT, declare_actor
from runtime.errors import NotFound, PermanentJobError, ValidationError
from runtime.metrics import get_metrics
from runtime.process import ProcessContext
from runtime.service_actor import AsyncServiceActor, start_async_service_actor
from runtime.supervision import ChildSpec, Restart
from runtime.worker import Asker, Concern

# The supervised children of the agents-worker, one per agent.
RECOMMENDATION_AGENT = "recommendation-agent"
SUPPORT_AGENT = "support-agent"
MODERATION_AGENT = "moderation-agent"


async def handle(deps: AgentDeps, message: tuple[Any, ...]) -> Any:
    """Run one agent request; ``message`` is (kind, *args, prefer_retry). Runs on the loop."""
    kind, *args = message
    if kind == "recommend":
        customer_id, refresh, prefer_retry = args
        await recommend(deps, int(customer_id), refresh=bool(refresh), prefer_retry=prefer_retry)
        return None
    if kind == "active_customers":
        return await active_customer_ids(deps)
    if kind == "support":
        customer_id, question, prefer_retry, request_id = args
        answer = await answer_support(deps, int(customer_id), str(question), prefer_retry=prefer_retry,
                                      request_id=request_id)
        return answer.interaction_id
    if kind == "moderate":
        review_id, prefer_retry = args
        return (await moderate_review(deps, int(review_id), prefer_retry=prefer_retry)).status
    raise ValueError(f"the agents do not know the request {kind!r}")


def _message_id() -> str | None:
    """The current Dramatiq message's id: the same across retries and redeliveries."""
    message = CurrentMessage.get_current_message()
    return None if message is None else str(message.message_id)


def _attempts_left(max_retries: int) -> bool:
    """Whether the current message will be retried if this attempt fails (worker thread)."""
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message is not None else max_retries
    return retries < max_retries


def declare_jobs(broker: dramatiq.Broker, ask: Asker, max_retries: int) -> dict[str, dramatiq.Actor[Any, Any]]:
    """Bind the thin actors on ``broker``; ``ask(agent_id, message)`` runs a request."""

    def call(agent_id: str, message: tuple[Any, ...]) -> Any:
        try:
            return ask(agent_id, message)
        except (NotFound, ValidationError) as exc:
            raise PermanentJobError(str(exc)) from exc

    def recommend_job(customer_id: int, refresh: bool = True) -> None:
        """Compute and cache one customer's recommendations."""
        call(RECOMMENDATION_AGENT, ("recommend", customer_id, refresh, _attempts_left(max_retries)))

    def refresh_job() -> None:
        """Fan out a refresh for every recently active customer."""
        for customer_id in call(RECOMMENDATION_AGENT, ("active_customers",)):
            RECOMMEND.send(broker, customer_id, True)

    def support_job(customer_id: int, question: str) -> None:
        """Answer and log a support question."""
        call(SUPPORT_AGENT, ("support", customer_id, question, _attempts_left(max_retries), _message_id()))

    def moderate_job(review_id: int) -> None:
        """Moderate a new review."""
        call(MODERATION_AGENT, ("moderate", review_id, _attempts_left(max_retries)))

    return {
        RECOMMEND.actor: declare_actor(broker, RECOMMEND, recommend_job),
        REFRESH_RECOMMENDATIONS.actor: declare_actor(broker, REFRESH_RECOMMENDATIONS, refresh_job),
        ANSWER_SUPPORT.actor: declare_actor(broker, ANSWER_SUPPORT, support_job),
        MODERATE_REVIEW.actor: declare_actor(broker, MODERATE_REVIEW, moderate_job),
    }


def register_actors(broker: dramatiq.Broker, deps: AgentDeps) -> dict[str, dramatiq.Actor[Any, Any]]:
    """Bind the thin actors to run the agent functions on ``deps.bridge`` (a started LoopBridge)."""
    bridge = deps.bridge
    if bridge is None:
        raise ValueError("register_actors needs deps.bridge (the process's LoopBridge)")
    timeout_s = deps.settings.actor_ask_timeout_s

    def ask(agent_id: str, message: Any) -> Any:
        return bridge.run(handle(deps, message), timeout_s)

    return declare_jobs(broker, ask, deps.settings.job_attempts - 1)


def concern(ctx: ProcessContext, registry: CollectorRegistry | None = None) -> Concern:
    """The agents' part of a worker process: three supervised agents and their thin actors.

    The agents' metrics are created after the process's metrics switched
    prometheus-client to multiprocess mode (:func:`runtime.metrics.get_metrics`),
    so they land in the shared directory that ``/metrics`` adds up; ``registry``
    is only the object they are registered on. Call once per process.
    """
    if registry is None:
        get_metrics(ctx.settings)
        registry = CollectorRegistry(auto_describe=False)
    deps = build_deps(ctx.settings, ctx.pool, ctx.redis, create_agent_metrics(registry), bridge=ctx.bridge)
    timeout_s = ctx.settings.actor_ask_timeout_s

    async def serve(message: Any) -> Any:
        return await handle(deps, message)

    # Agents mostly wait on the Anthropic API: async actors on the loop, no parked threads.
    def starter(name: str) -> Callable[[], pykka.ActorRef[AsyncServiceActor]]:
        return lambda: start_async_service_actor(ctx, name, serve, timeout_s)

    children = [ChildSpec(name, starter(name), Restart.PERMANENT)
                for name in (RECOMMENDATION_AGENT, SUPPORT_AGENT, MODERATION_AGENT)]

    def declare(broker: Any, ask: Asker) -> None:
        declare_jobs(broker, ask, ctx.settings.job_attempts - 1)

    return Concern("agents", children, declare, (QUEUE_RECOMMENDATIONS, QUEUE_SUPPORT, QUEUE_MODERATION))
