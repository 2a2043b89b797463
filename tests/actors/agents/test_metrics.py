"""The agents' metrics: latency values in one process, and every series in the summed /metrics.

The second test runs a real ``shopflow worker --kind agents`` process: its
metrics are only worth something if they reach the multiprocess directory
that the api's ``/metrics`` adds up.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest

from actors.agents.llm import Tool
from actors.agents.messages import MODERATE_REVIEW
from runtime.broker import setup_broker
from runtime.errors import LlmUnavailable
from runtime.settings import Settings
from tests.actors.agents.conftest import MakeDeps, metric
from tests.actors.agents.fake_anthropic import FakeAnthropic, slow, status, tool
from tests.runtime.metrics_helpers import scrape, value
from tests.support import spawn, stop

pytestmark = pytest.mark.usefixtures("shop")

PING = Tool("submit_ping", "Answer the ping.", {
    "type": "object", "additionalProperties": False, "required": ["pong"],
    "properties": {"pong": {"type": "integer", "minimum": 0}},
})
LATENCY = "shopflow_agent_call_latency_seconds"


async def test_latency_histogram_records_each_call_with_its_duration(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    deps = make_deps()
    fake_llm.push(slow(tool({"pong": 1}), 0.6), slow(status(500, "api_error"), 0.3))

    reply = await deps.llm.ask("support", "sys", "ping", PING)
    with pytest.raises(LlmUnavailable):  # a failed call is timed too
        await deps.llm.ask("support", "sys", "ping", PING)

    assert reply.latency_ms >= 600
    assert metric(deps, f"{LATENCY}_count", agent="support") == 2
    assert metric(deps, f"{LATENCY}_sum", agent="support") >= 0.9
    assert metric(deps, f"{LATENCY}_bucket", agent="support", le="0.25") == 0  # both were slower
    assert metric(deps, f"{LATENCY}_bucket", agent="support", le="0.5") <= 1  # the 0.6 s one is not here
    assert metric(deps, f"{LATENCY}_bucket", agent="support", le="15.0") == 2
    assert metric(deps, f"{LATENCY}_count", agent="moderation") == 0  # labelled per agent


@pytest.mark.slow
async def test_agent_series_reach_the_summed_multiprocess_metrics(
    settings: Settings, pool: asyncpg.Pool, fake_llm: FakeAnthropic
) -> None:
    settings = replace(settings, anthropic_api_key="sk-ant-test", anthropic_base_url=fake_llm.url,
                       llm_max_retries=0, metrics_dir=settings.var_dir / "agents-metrics")
    fake_llm.push(slow(tool({"approved": True, "confidence": 0.95, "categories": [],
                             "reason": "Fine."}, input_tokens=300, output_tokens=25), 0.3))
    rid = await pool.fetchval("INSERT INTO reviews (customer_id, product_id, rating, body) "
                              "VALUES (1, 1, 5, 'Superb.') RETURNING id")
    worker = await asyncio.to_thread(spawn, settings, "worker", "--kind", "agents",
                                     log_name="agents-worker")
    try:
        MODERATE_REVIEW.send(setup_broker(settings), rid)
        async with asyncio.timeout(60):
            while await pool.fetchval("SELECT status FROM reviews WHERE id = $1", rid) == "pending":
                assert worker.poll() is None, "the agents worker exited"
                await asyncio.sleep(0.1)
        samples = await asyncio.to_thread(scrape, settings)  # what the api's /metrics serves
    finally:
        assert await asyncio.to_thread(stop, worker) == 0

    assert await pool.fetchval("SELECT status FROM reviews WHERE id = $1", rid) == "approved"
    agent = {"agent": "moderation"}
    assert value(samples, "shopflow_agent_calls_total", **agent, outcome="ok") == 1
    assert value(samples, "shopflow_agent_tokens_total", **agent, kind="input") == 300
    assert value(samples, "shopflow_agent_tokens_total", **agent, kind="output") == 25
    assert value(samples, "shopflow_agent_estimated_cost_usd_total", **agent) == pytest.approx(
        300 * settings.llm_input_usd_per_mtok / 1e6 + 25 * settings.llm_output_usd_per_mtok / 1e6)
    assert value(samples, "shopflow_agent_answers_total", **agent, source="model") == 1
    assert value(samples, f"{LATENCY}_count", **agent) == 1
    assert (value(samples, f"{LATENCY}_sum", **agent) or 0) >= 0.3
    assert value(samples, f"{LATENCY}_bucket", **agent, le="0.25") == 0
    assert value(samples, f"{LATENCY}_bucket", **agent, le="+Inf") == 1
