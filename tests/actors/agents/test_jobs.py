"""The thin Dramatiq actors on a real Redis broker and worker."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import Middleware
from prometheus_client import CollectorRegistry

from actors.agents.deps import open_deps
from actors.agents.jobs import register_actors
from actors.agents.messages import (
    ANSWER_SUPPORT,
    MODERATE_REVIEW,
    RECOMMEND,
    REFRESH_RECOMMENDATIONS,
)
from runtime.broker import (
    QUEUE_MODERATION,
    QUEUE_RECOMMENDATIONS,
    QUEUE_SUPPORT,
    job_config,
    setup_broker,
)
from runtime.loop import LoopBridge
from runtime.settings import Settings
from tests.actors.agents.fake_anthropic import FakeAnthropic, status

pytestmark = pytest.mark.usefixtures("shop")


class Finished(Middleware):
    """Counts messages that finished for good (done, or failed with no retry left)."""

    def __init__(self) -> None:
        self.done: list[tuple[str, Any]] = []
        self.changed = threading.Condition()

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], *,
                              result: Any = None, exception: BaseException | None = None) -> None:
        if exception is not None and not message.failed:
            return  # will be retried
        with self.changed:
            self.done.append((message.actor_name, exception))
            self.changed.notify_all()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
        with self.changed:
            self.done.append((message.actor_name, "skipped"))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[tuple[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.done) >= count, timeout_s), self.done
            return list(self.done)


# Long enough that a retry without backoff could not pass for one with it.
BACKOFF_MS = 300


@pytest.fixture
def worker_env(settings: Settings, fake_llm: FakeAnthropic) -> Iterator[tuple[Finished, Any]]:
    settings = replace(settings, anthropic_api_key="sk-ant-test", anthropic_base_url=fake_llm.url,
                       llm_max_retries=0, job_backoff_ms=BACKOFF_MS)
    finished = Finished()
    broker = setup_broker(settings, [finished])
    bridge = LoopBridge("agents-test").start()
    opened = open_deps(settings, CollectorRegistry(), bridge=bridge)
    deps = bridge.run(opened.__aenter__())
    register_actors(broker, deps)
    worker = dramatiq.Worker(broker, queues={QUEUE_MODERATION, QUEUE_RECOMMENDATIONS, QUEUE_SUPPORT},
                             worker_threads=2,
                             worker_timeout=100)
    worker.start()
    yield finished, deps
    worker.stop()
    broker.close()
    bridge.run(opened.__aexit__(None, None, None))
    bridge.stop()


async def test_moderation_job_retries_on_api_failure_then_falls_back(
    worker_env: tuple[Finished, Any], fake_llm: FakeAnthropic, pool: Any
) -> None:
    finished, deps = worker_env
    fake_llm.default = status(529, "overloaded_error")
    rid = await pool.fetchval(
        "INSERT INTO reviews (customer_id, product_id, rating, body) VALUES (1, 1, 5, 'Superb.') RETURNING id")
    MODERATE_REVIEW.send(_broker(), rid)
    done = await asyncio.to_thread(finished.wait_for, 1)
    assert done == [(MODERATE_REVIEW.actor, None)]
    # attempts 1 and 2 raised (Dramatiq retried them); the last attempt used the fallback
    assert len(fake_llm.requests) == deps.settings.job_attempts
    # each retry waited for the job's backoff (exponential, jitter at most -25 %), above the
    # SDK's retries (none here): the gaps are the job layer's, not the SDK's
    policy = job_config(deps.settings).retry
    arrivals = [r.at_s for r in fake_llm.requests]
    gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    assert [policy.delay_ms(n, unit_random=0.0) for n in range(len(gaps_ms))] == [225, 450]
    for n, gap_ms in enumerate(gaps_ms):
        assert gap_ms >= policy.delay_ms(n, unit_random=0.0), gaps_ms
    row = await pool.fetchrow("SELECT status, moderation FROM reviews WHERE id = $1", rid)
    assert row["status"] == "approved" and row["moderation"]["source"] == "fallback"


async def test_a_job_retried_after_a_429_or_529_waits_for_the_apis_retry_after(
    worker_env: tuple[Finished, Any], fake_llm: FakeAnthropic, pool: Any
) -> None:
    finished, _ = worker_env
    # far above the job's own first backoff (225-300 ms): only the API's hint explains the wait
    fake_llm.push(status(529, "overloaded_error", {"retry-after-ms": "1500"}),
                  tool_answer("Your order #102 is on its way."))
    ANSWER_SUPPORT.send(_broker(), 1, "Where is my record?")
    assert await asyncio.to_thread(finished.wait_for, 1) == [(ANSWER_SUPPORT.actor, None)]
    first, second = fake_llm.requests
    assert second.at_s - first.at_s >= 1.5
    assert await pool.fetchval("SELECT source FROM support_interactions") == "model"


async def test_refresh_fans_out_recommend_jobs(
    worker_env: tuple[Finished, Any], fake_llm: FakeAnthropic, redis: Any
) -> None:
    finished, deps = worker_env
    fake_llm.default = status(529, "overloaded_error")
    REFRESH_RECOMMENDATIONS.send(_broker())
    done = await asyncio.to_thread(finished.wait_for, 5)
    assert sorted(name for name, _ in done) == [RECOMMEND.actor] * 4 + [REFRESH_RECOMMENDATIONS.actor]
    for customer_id in (1, 2, 3, 4):
        assert await redis.exists(f"{deps.settings.namespace}:agents:reco:{customer_id}")


async def test_support_job_logs_one_answer_keyed_by_its_message(
    worker_env: tuple[Finished, Any], fake_llm: FakeAnthropic, pool: Any
) -> None:
    finished, _ = worker_env
    fake_llm.push(tool_answer("Your order #102 is on its way."))
    message = ANSWER_SUPPORT.send(_broker(), 1, "Where is my record?")
    assert await asyncio.to_thread(finished.wait_for, 1) == [(ANSWER_SUPPORT.actor, None)]
    rows = await pool.fetch("SELECT answer, source, request_id FROM support_interactions")
    assert [tuple(r) for r in rows] == [("Your order #102 is on its way.", "model", message.message_id)]


def tool_answer(text: str) -> Any:
    from tests.actors.agents.fake_anthropic import tool

    return tool({"answer": text, "refused": False, "order_ids": [102]})


def _broker() -> dramatiq.Broker:
    return dramatiq.get_broker()


async def test_agents_concern_runs_under_the_root_supervisor(
    settings: Settings, fake_llm: FakeAnthropic, pool: Any
) -> None:
    """The wiring the agents-worker process uses: supervised pykka agents behind thin actors."""
    from actors.agents.jobs import MODERATION_AGENT, concern
    from runtime.process import ProcessContext
    from runtime.worker import build_root

    settings = replace(settings, anthropic_api_key="sk-ant-test", anthropic_base_url=fake_llm.url)
    fake_llm.push(tool_approve())
    rid = await pool.fetchval(
        "INSERT INTO reviews (customer_id, product_id, rating, body) VALUES (1, 1, 5, 'Superb.') RETURNING id")
    ctx = await asyncio.to_thread(ProcessContext.start, settings)
    finished = Finished()
    ctx.broker.add_middleware(finished)
    agents = concern(ctx, CollectorRegistry())
    root = build_root("agents-worker", [agents]).start()
    agents.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 10))
    worker = dramatiq.Worker(ctx.broker, queues=set(agents.queues), worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert MODERATION_AGENT in [c.id for c in root.snapshot()]
        MODERATE_REVIEW.send(ctx.broker, rid)
        assert await asyncio.to_thread(finished.wait_for, 1) == [(MODERATE_REVIEW.actor, None)]
        assert await pool.fetchval("SELECT status FROM reviews WHERE id = $1", rid) == "approved"
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(root.stop)
        await asyncio.to_thread(ctx.stop)


def tool_approve() -> Any:
    from tests.actors.agents.fake_anthropic import tool

    return tool({"approved": True, "confidence": 0.95, "categories": [], "reason": "Fine."})
