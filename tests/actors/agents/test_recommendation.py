"""Recommendation agent against the fake Messages API with the real SDK."""

from __future__ import annotations

import json

import pytest

from actors.agents import recommendation as reco
from tests.actors.agents.conftest import NOON, MakeDeps, metric
from tests.actors.agents.fake_anthropic import FakeAnthropic, prose, tool

pytestmark = pytest.mark.usefixtures("shop")


async def test_candidates_rank_co_purchases_and_skip_bought_and_out_of_stock(make_deps: MakeDeps) -> None:
    deps = make_deps()
    hot = await reco.load_trending(deps.pool, NOON)
    assert hot[6] == 10  # Dan's ten copies this month
    candidates = await reco.load_candidates(deps.pool, 1, 30, hot)
    ids = [c.product_id for c in candidates]
    assert ids[0] == 2  # bought by both other Kind of Blue buyers
    assert {1, 4}.isdisjoint(ids)  # already Ana's
    assert 8 not in ids  # out of stock
    assert set(ids) == {2, 3, 5, 6, 7}


async def test_model_picks_are_used_with_their_reasons(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(tool({"picks": [{"product_id": 7, "reason": "Big horns, like you asked."},
                                  {"product_id": 2, "reason": "Coltrane after Miles."}]},
                       input_tokens=300, output_tokens=50))
    answer = await reco.recommend(deps, 1)
    assert answer.source == "model"
    assert [(i.product_id, i.name) for i in answer.items] == [(7, "Back to Black"), (2, "A Love Supreme")]
    assert answer.items[0].reason == "Big horns, like you asked."
    sent = fake_llm.requests[0]
    assert sent.body["tool_choice"] == {"type": "tool", "name": "submit_recommendations"}
    assert sent.body["model"] == deps.settings.llm_model
    # context without personal data: no name, no e-mail; candidates carry their ids
    assert "Ana" not in sent.raw and "@" not in sent.raw
    assert '"id": 7' in sent.user_text and "Abbey Road" in sent.user_text  # history
    assert metric(deps, "shopflow_agent_tokens_total", agent="recommendation", kind="input") == 300
    assert metric(deps, "shopflow_agent_estimated_cost_usd_total", agent="recommendation") == pytest.approx(
        300 * 3.0 / 1e6 + 50 * 15.0 / 1e6)
    assert metric(deps, "shopflow_agent_calls_total", agent="recommendation", outcome="ok") == 1


async def test_answer_is_cached_until_refreshed(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(tool({"picks": [{"product_id": 3, "reason": "r1"}]}),
                  tool({"picks": [{"product_id": 5, "reason": "r2"}]}))
    first = await reco.recommend(deps, 1)
    again = await reco.recommend(deps, 1)
    assert again.cached and again.items == first.items and len(fake_llm.requests) == 1
    ttl = await deps.redis.ttl(f"{deps.settings.namespace}:agents:reco:1")
    assert 0 < ttl <= deps.settings.recommendation_cache_ttl_s
    refreshed = await reco.recommend(deps, 1, refresh=True)
    assert [i.product_id for i in refreshed.items] == [5] and not refreshed.cached


async def test_ids_outside_the_candidates_are_dropped(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(tool({"picks": [{"product_id": 999, "reason": "made up"},
                                  {"product_id": 1, "reason": "already bought"},
                                  {"product_id": 8, "reason": "out of stock"},
                                  {"product_id": 6, "reason": "real"}]}))
    answer = await reco.recommend(deps, 1)
    assert answer.source == "model"
    assert [i.product_id for i in answer.items] == [6]
    assert answer.dropped_ids == [999, 1, 8]
    assert metric(deps, "shopflow_agent_invalid_outputs_total", agent="recommendation", reason="unknown_id") == 3


async def test_only_unknown_ids_means_fallback(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(tool({"picks": [{"product_id": 12345, "reason": "made up"}]}))
    answer = await reco.recommend(deps, 1)
    assert answer.source == "fallback" and answer.fallback_reason == "invalid_output:no_valid_picks"
    assert answer.items[0].product_id == 2


async def test_prose_instead_of_tool_call_is_not_trusted(make_deps: MakeDeps, fake_llm: FakeAnthropic) -> None:
    deps = make_deps()
    fake_llm.push(prose("I recommend product 999, it is great!"))
    answer = await reco.recommend(deps, 1)
    assert answer.source == "fallback"
    assert answer.fallback_reason == "invalid_output:no_tool_call"
    assert 999 not in [i.product_id for i in answer.items]
    assert metric(deps, "shopflow_agent_invalid_outputs_total", agent="recommendation", reason="no_tool_call") == 1
    assert metric(deps, "shopflow_agent_fallbacks_total", agent="recommendation", reason="invalid_output") == 1


async def test_fallback_answer_is_cached_briefly(make_deps: MakeDeps) -> None:
    deps = make_deps(anthropic_api_key=None)
    answer = await reco.recommend(deps, 1)
    assert answer.source == "fallback" and answer.fallback_reason == "no_api_key"
    # co-purchases first, then trending, then the preferred category
    assert [i.product_id for i in answer.items] == [2, 3, 5, 6, 7]
    assert answer.items[-1].reason == "From soul, a category you like."
    assert answer.items[0].reason.startswith("Customers who bought")
    ttl = await deps.redis.ttl(f"{deps.settings.namespace}:agents:reco:1")
    assert 0 < ttl <= deps.settings.recommendation_fallback_ttl_s
    stored = json.loads(await deps.redis.get(f"{deps.settings.namespace}:agents:reco:1"))
    assert stored["source"] == "fallback"


async def test_unknown_customer_is_not_found(make_deps: MakeDeps) -> None:
    from runtime.errors import NotFound

    with pytest.raises(NotFound):
        await reco.recommend(make_deps(), 77)


async def test_active_customers_for_the_refresh_job(make_deps: MakeDeps) -> None:
    deps = make_deps()
    assert set(await reco.active_customer_ids(deps)) == {1, 2, 3, 4}
