"""``shopflow agents``: ask an agent by hand and see its limits, for operators.

``status`` prints each agent's budget used today (shop day), its limits and
whether its circuit is open; ``recommend``, ``ask`` and ``moderate`` run one
request exactly as a job would (same limits, same fallback) and print the
answer as JSON, with its source.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry

from actors.agents.deps import AgentDeps, open_deps
from actors.agents.llm import agent_limits
from actors.agents.moderation import moderate_review
from actors.agents.recommendation import recommend
from actors.agents.support import answer_support
from runtime import embedded
from runtime.cli import add_command
from runtime.settings import Settings

AGENTS = ("recommendation", "support", "moderation")


async def agents_status(deps: AgentDeps) -> dict[str, Any]:
    """Per agent: limits, tokens used on the current shop day, circuit state."""
    now = deps.clock()
    out: dict[str, Any] = {
        "model": deps.settings.llm_model, "online": deps.llm.online, "shop_day": deps.limits.day(now),
        "agents": {},
    }
    for agent in AGENTS:
        limits = agent_limits(deps.settings, agent)
        out["agents"][agent] = {
            "requests_per_min": limits.requests_per_min, "tokens_per_min": limits.tokens_per_min,
            "daily_tokens": limits.daily_tokens,
            "tokens_used_today": await deps.limits.budget_used(agent, now),
            "circuit_open": await deps.limits.circuit_open(agent, deps.settings.llm_circuit_failures),
        }
    return out


def _run(settings: Settings, work: Callable[[AgentDeps], Awaitable[Any]],
         start: bool = True) -> int:
    settings = embedded.services_for(settings, start, postgres=True)

    async def main() -> Any:
        async with open_deps(settings, CollectorRegistry()) as deps:
            return await work(deps)

    result = asyncio.run(main())
    print(json.dumps(result if isinstance(result, dict) else asdict(result), indent=2, default=str))
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    return _run(settings, agents_status, start=False)  # a look at the running runtime


def _cmd_recommend(args: argparse.Namespace, settings: Settings) -> int:
    return _run(settings, lambda d: recommend(d, args.customer_id, refresh=args.refresh))


def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    return _run(settings, lambda d: answer_support(d, args.customer_id, args.question))


def _cmd_moderate(args: argparse.Namespace, settings: Settings) -> int:
    return _run(settings, lambda d: moderate_review(d, args.review_id))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow agents ...`` into the command line."""
    parser = add_command(sub, "agents", lambda a, s: _usage(parser), "LLM agents: status and one-off requests")
    agents_sub = parser.add_subparsers(dest="agents_command", metavar="ACTION")
    add_command(agents_sub, "status", _cmd_status, "limits, today's token use and circuit state per agent")
    p = add_command(agents_sub, "recommend", _cmd_recommend, "recommend products for a customer")
    p.add_argument("customer_id", type=int)
    p.add_argument("--refresh", action="store_true", help="recompute instead of reading the cache")
    p = add_command(agents_sub, "ask", _cmd_ask, "ask the support agent as a customer (logged)")
    p.add_argument("customer_id", type=int)
    p.add_argument("question")
    p = add_command(agents_sub, "moderate", _cmd_moderate, "moderate a pending review")
    p.add_argument("review_id", type=int)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
