"""Thin Dramatiq actors around the agent functions.

They run in Dramatiq worker threads and hand the work to the process's event
loop through the deps' :class:`LoopBridge`. While a job has attempts left, an
API failure raises (Dramatiq retries it with backoff); on the last attempt the
agent answers from its fallback. Bad input and unknown ids are permanent.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import dramatiq
from dramatiq.middleware import CurrentMessage

from actors.agents.deps import AgentDeps
from actors.agents.messages import (
    ANSWER_SUPPORT,
    MODERATE_REVIEW,
    RECOMMEND,
    REFRESH_RECOMMENDATIONS,
)
from actors.agents.moderation import moderate_review
from actors.agents.recommendation import active_customer_ids, recommend
from actors.agents.support import answer_support
from runtime.broker import declare_actor
from runtime.errors import NotFound, PermanentJobError, ValidationError

T = TypeVar("T")


def _attempts_left(max_retries: int) -> bool:
    """Whether the current message will be retried if this attempt fails."""
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message is not None else max_retries
    return retries < max_retries


def register_actors(broker: dramatiq.Broker, deps: AgentDeps) -> dict[str, dramatiq.Actor[Any, Any]]:
    """Bind the agents' actors on ``broker``; ``deps.bridge`` must be a started LoopBridge."""
    bridge = deps.bridge
    if bridge is None:
        raise ValueError("register_actors needs deps.bridge (the process's LoopBridge)")
    max_retries = deps.settings.job_attempts - 1
    timeout_s = deps.settings.actor_ask_timeout_s

    def run(coro: Coroutine[Any, Any, T]) -> T:
        try:
            return bridge.run(coro, timeout_s)
        except (NotFound, ValidationError) as exc:
            raise PermanentJobError(str(exc)) from exc

    def recommend_job(customer_id: int, refresh: bool = True) -> None:
        run(recommend(deps, int(customer_id), refresh=bool(refresh),
                      prefer_retry=_attempts_left(max_retries)))

    def refresh_job() -> None:
        for customer_id in run(active_customer_ids(deps)):
            RECOMMEND.send(broker, customer_id, True)

    def support_job(customer_id: int, question: str) -> None:
        run(answer_support(deps, int(customer_id), str(question), prefer_retry=_attempts_left(max_retries)))

    def moderate_job(review_id: int) -> None:
        run(moderate_review(deps, int(review_id), prefer_retry=_attempts_left(max_retries)))

    return {
        RECOMMEND.actor: declare_actor(broker, RECOMMEND, recommend_job),
        REFRESH_RECOMMENDATIONS.actor: declare_actor(broker, REFRESH_RECOMMENDATIONS, refresh_job),
        ANSWER_SUPPORT.actor: declare_actor(broker, ANSWER_SUPPORT, support_job),
        MODERATE_REVIEW.actor: declare_actor(broker, MODERATE_REVIEW, moderate_job),
    }
