"""The gateway against the fake Messages API: retries, timeouts, untrusted answers, limits.

Each case goes through the real SDK over HTTP and then through an agent, so
the outcome asserted is what a customer would get, not just "no exception".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta

import pytest
import redis

from actors.agents import recommendation as reco
from actors.agents.deps import AgentDeps
from actors.agents.limits import AgentLimits
from actors.agents.llm import (
    DEFAULT_BACKOFF,
    LlmGateway,
    Tool,
    agent_limits,
    build_client,
    estimate_input_tokens,
    estimate_tokens,
    retry_after_hint_s,
)
from runtime.errors import LlmInvalidOutput, LlmLimited, LlmUnavailable
from runtime.jobs.context import JobContext, job_scope
from runtime.jobs.script import JobKeys, JobScript, events_stream
from runtime.service_actor import budget_s
from runtime.settings import Settings
from tests.actors.agents.conftest import NOON, Clock, MakeDeps, metric
from tests.actors.agents.fake_anthropic import (
    FakeAnthropic,
    Received,
    cut_text,
    cut_tool,
    hang,
    prose,
    status,
    tool,
)

pytestmark = pytest.mark.usefixtures("shop")

PING = Tool("submit_ping", "Answer the ping.", {
    "type": "object", "additionalProperties": False, "required": ["pong"],
    "properties": {"pong": {"type": "integer", "minimum": 0}},
})


async def test_429_is_retried_after_the_retry_after_delay(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps(llm_max_retries=2)
    fake_llm.push(status(429, "rate_limit_error", {"retry-after": "1"}), tool({"pong": 1}))
    reply = await deps.llm.ask("support", "sys", "ping", PING)
    assert reply.data == {"pong": 1}
    first, second = fake_llm.requests
    assert second.at_s - first.at_s >= 0.95  # the server asked for 1 s and got it
    assert metric(deps, "shopflow_agent_calls_total", agent="support", outcome="ok") == 1


async def test_529_overloaded_is_retried_after_the_retry_after_delay(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    deps = make_deps(llm_max_retries=2)
    # 1.2 s: longer than the SDK's own first backoff (at most 0.5 s), so only the header explains it
    fake_llm.push(status(529, "overloaded_error", {"retry-after-ms": "1200"}), tool({"pong": 2}))
    assert (await deps.llm.ask("support", "sys", "ping", PING)).data == {"pong": 2}
    first, second = fake_llm.requests
    assert second.at_s - first.at_s >= 1.15  # the server asked for 1.2 s and got it
    assert metric(deps, "shopflow_agent_calls_total", agent="support", outcome="ok") == 1


async def test_529_that_persists_falls_back_and_is_counted(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps(llm_max_retries=1)
    fake_llm.default = status(529, "overloaded_error", {"retry-after-ms": "20"})
    answer = await reco.recommend(deps, 1)
    assert answer.source == "fallback" and answer.fallback_reason == "api_error"
    assert answer.items[0].product_id == 2  # the SQL ranking answered
    assert len(fake_llm.requests) == 2  # one try plus the SDK's one retry
    assert metric(deps, "shopflow_agent_calls_total", agent="recommendation", outcome="api_error") == 1
    assert metric(deps, "shopflow_agent_fallbacks_total", agent="recommendation", reason="api_error") == 1


async def test_a_job_with_attempts_left_raises_instead_of_falling_back(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    deps = make_deps()
    fake_llm.default = status(529, "overloaded_error")
    with pytest.raises(LlmUnavailable) as info:
        await reco.recommend(deps, 1, prefer_retry=True)
    assert info.value.reason == "api_error"
    assert await reco.cached_recommendations(deps, 1) is None


def _input_estimate(sent: Received) -> int:
    """The gateway's input estimate of a request, from what the server received."""
    spec = sent.body["tools"][0]
    return estimate_input_tokens(sent.body["system"], sent.user_text,
                                 Tool(spec["name"], spec["description"], spec["input_schema"]))


async def test_hang_past_the_timeout_falls_back(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps(llm_timeout_s=0.3)
    fake_llm.default = hang()
    answer = await reco.recommend(deps, 1)
    assert answer.source == "fallback" and answer.fallback_reason == "timeout"
    assert metric(deps, "shopflow_agent_calls_total", agent="recommendation", outcome="timeout") == 1
    # the request was sent and may have been billed: its input stays charged, the output cap does not
    [sent] = fake_llm.requests
    assert await deps.limits.budget_used("recommendation", deps.clock()) == _input_estimate(sent)
    assert await deps.limits.consecutive_failures("recommendation") == 1


async def test_a_hanging_model_falls_back_before_the_ask_timeout_at_default_proportions(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    # The default durations divided by 20: a 60 s ask timeout, 20 s per attempt, 2 retries,
    # up to 20 s waiting for a rate slot, the SDK's 0.5 s backoff, a 40 s request deadline.
    scale = 1 / 20
    s = Settings()
    deps = make_deps(
        actor_ask_timeout_s=s.actor_ask_timeout_s * scale, llm_timeout_s=s.llm_timeout_s * scale,
        llm_max_retries=s.llm_max_retries, llm_max_wait_s=s.llm_max_wait_s * scale,
        llm_deadline_s=s.llm_deadline_s * scale, recommendation_rpm=120,
    )
    backoff = replace(DEFAULT_BACKOFF, base_backoff_s=DEFAULT_BACKOFF.base_backoff_s * scale,
                      max_backoff_s=DEFAULT_BACKOFF.max_backoff_s * scale)
    deps = replace(deps, llm=LlmGateway(deps.settings, build_client(deps.settings), deps.limits,
                                        deps.metrics, deps.clock, backoff=backoff))
    fake_llm.default = hang()
    # an empty requests bucket: the call first waits for a rate slot (0.5 s at 120 a minute)
    while await deps.limits.take_rate("recommendation", agent_limits(deps.settings, "recommendation"), 0) == 0:
        pass

    # what the agents' actor does: the handler gets the ask timeout, not a second more
    async with asyncio.timeout(deps.settings.actor_ask_timeout_s):
        answer = await reco.recommend(deps, 1)

    assert answer.source == "fallback" and answer.fallback_reason == "timeout" and answer.items
    assert len(fake_llm.requests) == 2  # one attempt timed out; the deadline cut the retry short
    assert metric(deps, "shopflow_agent_calls_total", agent="recommendation", outcome="timeout") == 1
    assert await deps.limits.consecutive_failures("recommendation") == 1  # one failed request
    assert await deps.limits.budget_used("recommendation", deps.clock()) == _input_estimate(
        fake_llm.requests[0])


async def test_a_job_with_a_time_limit_under_the_llm_deadline_still_reaches_the_fallback(
    make_deps: MakeDeps, fake_llm: FakeAnthropic, settings: Settings
) -> None:
    """A job sent with a ``timeout_ms`` shorter than the request deadline (40 s by default):
    the model call must give up in time for the fallback, before the job's limit cuts the
    handler (the actor's budget, as runtime.service_actor applies it)."""
    deps = make_deps(llm_timeout_s=30.0)  # the defaults otherwise: a 40 s deadline, 60 s asks
    fake_llm.default = hang()
    limit_s = 2.0
    client = redis.Redis.from_url(settings.redis_url or "")
    keys = JobKeys(f"{settings.namespace}-jobs", events_stream(settings.namespace))
    job = JobContext("short-job", "recommendations", "recommend", 1, 1, client, keys,
                     JobScript(client, keys), deadline_s=time.monotonic() + limit_s)
    try:
        with job_scope(job):
            async with asyncio.timeout(budget_s(deps.settings.actor_ask_timeout_s)):
                answer = await reco.recommend(deps, 1)
    finally:
        client.close()
    assert answer.source == "fallback" and answer.fallback_reason == "timeout" and answer.items
    assert metric(deps, "shopflow_agent_calls_total", agent="recommendation", outcome="timeout") == 1


async def test_an_ask_cancelled_mid_call_settles_its_reservations_and_counts_a_failure(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    deps = make_deps(llm_timeout_s=30.0)
    fake_llm.default = hang()
    asking = asyncio.create_task(deps.llm.ask("support", "sys", "ping", PING))
    await asyncio.wait_for(fake_llm.arrived.wait(), 5)
    asking.cancel()  # the asker gave up (its ask timeout, a shutdown)
    with pytest.raises(asyncio.CancelledError):
        await asking
    [sent] = fake_llm.requests
    assert await deps.limits.budget_used("support", deps.clock()) == _input_estimate(sent)
    assert await deps.limits.consecutive_failures("support") == 1
    assert metric(deps, "shopflow_agent_calls_total", agent="support", outcome="cancelled") == 1


async def test_a_retry_after_past_the_deadline_is_left_to_the_job(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    deps = make_deps(llm_max_retries=2, llm_deadline_s=5.0)
    fake_llm.default = status(529, "overloaded_error", {"retry-after": "30"})
    async with asyncio.timeout(5):  # the gateway does not sit out the 30 s itself
        with pytest.raises(LlmUnavailable) as info:
            await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == "api_error" and info.value.retry_after_s == 30
    assert len(fake_llm.requests) == 1
    assert await deps.limits.budget_used("support", deps.clock()) == 0  # an error answer is not billed


@pytest.mark.parametrize("headers, hint_s", [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": "Thu, 03 Dec 2026 15:00:12 GMT"}, 12.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "0"}, None),
    ({}, None),
])
def test_retry_after_hints(headers: dict[str, str], hint_s: float | None) -> None:
    assert retry_after_hint_s(headers, now_s=NOON.timestamp()) == hint_s


async def test_tool_call_cut_at_max_tokens_is_not_trusted(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    # the part that arrived is even schema-valid: it must still not be used
    fake_llm.push(cut_tool({"picks": [{"product_id": 6, "reason": "Because"}]}))
    answer = await reco.recommend(deps, 1)
    assert answer.source == "fallback" and answer.fallback_reason == "invalid_output:truncated"
    assert metric(deps, "shopflow_agent_invalid_outputs_total", agent="recommendation", reason="truncated") == 1


async def test_text_cut_at_max_tokens_is_not_trusted(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(cut_text('{"picks": [{"product_id": 6, "reason": "Beca'))
    with pytest.raises(LlmInvalidOutput) as info:
        await deps.llm.ask("recommendation", "sys", "x", reco.recommendations_tool(5))
    assert info.value.reason == "truncated"


async def test_prose_is_not_trusted(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(prose('Sure! {"pong": 3}'))
    with pytest.raises(LlmInvalidOutput) as info:
        await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == "no_tool_call"


@pytest.mark.parametrize("bad, reason", [
    ("pong=3", "not_json"),
    ({"pong": "three"}, "schema"),
    ({"pong": -1}, "schema"),
    ({"pong": 3, "extra": True}, "schema"),
    ({}, "schema"),
])
async def test_tool_input_that_is_not_json_or_out_of_schema_is_not_trusted(
    make_deps: MakeDeps, fake_llm: FakeAnthropic, bad: object, reason: str
) -> None:
    deps = make_deps()
    fake_llm.push(tool(bad))
    with pytest.raises(LlmInvalidOutput) as info:
        await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == reason
    assert metric(deps, "shopflow_agent_invalid_outputs_total", agent="support", reason=reason) == 1


async def test_budget_running_out_mid_day_falls_back_until_the_shop_day_ends(
    make_deps: MakeDeps, fake_llm: FakeAnthropic, clock: Clock
) -> None:
    deps = make_deps(recommendation_daily_tokens=5_000, llm_max_output_tokens=500)
    fake_llm.default = tool({"picks": [{"product_id": 7, "reason": "r"}]}, input_tokens=2_000,
                            output_tokens=300)
    first = await reco.recommend(deps, 1)  # noon in São Paulo
    assert first.source == "model"
    assert await deps.limits.budget_used("recommendation", clock()) == 2_300  # estimate replaced by usage
    second = await reco.recommend(deps, 2)
    assert second.source == "model", second
    # 4,600 used: the next call's estimate (its input plus 500 output tokens) no longer fits
    third = await reco.recommend(deps, 3)
    assert third.source == "fallback" and third.fallback_reason == "budget"
    assert len(fake_llm.requests) == 2
    assert metric(deps, "shopflow_agent_fallbacks_total", agent="recommendation", reason="budget") == 1
    clock.now += timedelta(hours=11, minutes=30)  # 02:30 UTC = 23:30 in São Paulo: same shop day
    assert (await reco.recommend(deps, 3, refresh=True)).fallback_reason == "budget"
    clock.now += timedelta(hours=1)  # 00:30 in São Paulo: a new day, a new budget
    assert (await reco.recommend(deps, 3, refresh=True)).source == "model"
    # other agents have budgets of their own
    assert await deps.limits.budget_used("support", clock()) == 0


async def test_over_the_rate_limit_falls_back_when_set_to(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps(support_rpm=2, llm_on_limit="fallback")
    fake_llm.default = tool({"pong": 1})
    for _ in range(2):
        await deps.llm.ask("support", "sys", "ping", PING)
    with pytest.raises(LlmLimited) as info:
        await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == "rate"
    assert len(fake_llm.requests) == 2
    # the refused call gave its budget reservation back
    assert await deps.limits.budget_used("support", deps.clock()) == 2 * 160


async def test_over_the_rate_limit_waits_for_the_next_slot(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    # 120 requests per minute: a slot every 0.5 s; each call waits for the next one
    deps = make_deps(support_rpm=120, llm_on_limit="wait", llm_max_wait_s=5.0)
    fake_llm.default = tool({"pong": 1})
    # drain the bucket until it refuses (however long the draining took, it is empty now)
    while await deps.limits.take_rate("support", _limits(deps), 0) == 0:
        pass
    await asyncio.wait_for(deps.llm.ask("support", "sys", "ping", PING), timeout=5)
    await asyncio.wait_for(deps.llm.ask("support", "sys", "ping", PING), timeout=5)
    first, second = fake_llm.requests
    assert second.at_s - first.at_s >= 0.3


def _tpm_for_one_call(make: MakeDeps, short_tokens: int, tpm: int) -> tuple[AgentDeps, int]:
    """Deps whose tokens bucket, after one call reporting the returned usage, is ``short_tokens`` short.

    Requests per minute are plentiful, so only the tokens bucket can refuse.
    """
    estimate = estimate_tokens("sys", "ping", PING, 400)
    used = tpm - estimate + short_tokens
    return make(support_rpm=1_000, support_tpm=tpm, llm_max_output_tokens=400), used


async def test_over_the_tokens_per_minute_limit_falls_back_when_set_to(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    deps, used = _tpm_for_one_call(lambda **kw: make_deps(llm_on_limit="fallback", **kw), 600, 6_000)
    fake_llm.default = tool({"pong": 1}, input_tokens=used - 40, output_tokens=40)
    await deps.llm.ask("support", "sys", "ping", PING)
    with pytest.raises(LlmLimited) as info:
        await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == "rate"
    assert len(fake_llm.requests) == 1  # the second call never reached the API
    # the refused call gave its budget reservation back: only the reported usage counts
    assert await deps.limits.budget_used("support", deps.clock()) == used


async def test_over_the_tokens_per_minute_limit_waits_for_the_tokens(
    make_deps: MakeDeps, fake_llm: FakeAnthropic
) -> None:
    # 12,000 tokens a minute refill 200 a second: 120 tokens short is a 0.6 s wait
    deps, used = _tpm_for_one_call(
        lambda **kw: make_deps(llm_on_limit="wait", llm_max_wait_s=5.0, **kw), 120, 12_000)
    fake_llm.default = tool({"pong": 1}, input_tokens=used - 40, output_tokens=40)
    await deps.llm.ask("support", "sys", "ping", PING)
    await asyncio.wait_for(deps.llm.ask("support", "sys", "ping", PING), timeout=5)
    first, second = fake_llm.requests
    assert second.at_s - first.at_s >= 0.45


async def test_rate_limits_are_shared_by_every_process(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    # two gateways (two worker processes) on one Redis share one limit
    a, b = make_deps(support_rpm=3, llm_on_limit="fallback"), make_deps(support_rpm=3, llm_on_limit="fallback")
    fake_llm.default = tool({"pong": 1})
    results = []
    for gateway in (a.llm, b.llm, a.llm, b.llm):
        try:
            await gateway.ask("support", "sys", "ping", PING)
            results.append("ok")
        except LlmLimited:
            results.append("limited")
    assert results == ["ok", "ok", "ok", "limited"]


async def test_repeated_failures_open_the_circuit(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps(llm_circuit_failures=2)
    fake_llm.default = status(500, "api_error")
    for _ in range(2):
        with pytest.raises(LlmUnavailable):
            await deps.llm.ask("support", "sys", "ping", PING)
    with pytest.raises(LlmUnavailable) as info:
        await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == "circuit_open"
    assert len(fake_llm.requests) == 2


async def test_without_a_key_nothing_is_sent(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps(anthropic_api_key=None)
    with pytest.raises(LlmUnavailable) as info:
        await deps.llm.ask("support", "sys", "ping", PING)
    assert info.value.reason == "no_api_key" and not fake_llm.requests


def _limits(deps: AgentDeps) -> AgentLimits:
    return agent_limits(deps.settings, "support")
