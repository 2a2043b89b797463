"""Asking the model for one validated tool call, within the shared limits.

:class:`LlmGateway` is the only place that talks to the Anthropic API. A call
names one tool and forces the model to use it (``tool_choice``); the answer is
trusted only when the response stopped normally, holds exactly that tool call,
and its input validates against the tool's JSON schema. Everything else
raises a typed error the agent turns into its fallback (or, for moderation,
into manual review):

- :class:`LlmUnavailable`: no key, circuit open, timeout, API error after the
  SDK's retries (which honour ``retry-after`` on 429 and 529);
- :class:`LlmLimited`: over the daily budget, or over the rate limit when
  waiting is off or would take too long;
- :class:`LlmInvalidOutput`: cut at ``max_tokens``, prose instead of the
  tool call, input that is not a JSON object or is out of schema.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anthropic
import jsonschema
from anthropic import AsyncAnthropic
from anthropic.types import MessageParam, ToolChoiceToolParam, ToolParam

from actors.agents.limits import AgentLimits, SharedLimits
from actors.agents.metrics import AgentMetrics
from runtime.errors import LlmInvalidOutput, LlmLimited, LlmUnavailable
from runtime.settings import Settings

log = logging.getLogger(__name__)

# A conservative chars-per-token ratio for estimating a request before it is sent.
_CHARS_PER_TOKEN = 3


@dataclass(frozen=True)
class Tool:
    """A tool the model must call: its name, what it is for, and its input schema."""

    name: str
    description: str
    input_schema: dict[str, Any]

    def as_param(self) -> ToolParam:
        """The tool as the Messages API takes it."""
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}


@dataclass(frozen=True)
class LlmReply:
    """A trusted answer: the validated tool input and what it cost."""

    data: dict[str, Any]
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int


def build_client(settings: Settings) -> AsyncAnthropic | None:
    """The SDK client from settings, or None without an API key (offline mode)."""
    if not settings.anthropic_api_key:
        return None
    return AsyncAnthropic(
        api_key=settings.anthropic_api_key,
        base_url=settings.anthropic_base_url,
        timeout=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
    )


def agent_limits(settings: Settings, agent: str) -> AgentLimits:
    """The configured limits of ``agent`` (recommendation, support or moderation)."""
    return AgentLimits(
        requests_per_min=int(getattr(settings, f"{agent}_rpm")),
        tokens_per_min=int(getattr(settings, f"{agent}_tpm")),
        daily_tokens=int(getattr(settings, f"{agent}_daily_tokens")),
    )


def estimate_tokens(system: str, user: str, tool: Tool, max_tokens: int) -> int:
    """Tokens a call may use at most, estimated before sending (input + output cap)."""
    chars = len(system) + len(user) + len(json.dumps(tool.as_param()))
    return math.ceil(chars / _CHARS_PER_TOKEN) + max_tokens


def extract_tool_input(message: Any, tool: Tool) -> dict[str, Any]:
    """The validated input of ``tool`` in ``message``, or :class:`LlmInvalidOutput`.

    The order of checks matters: a response cut at ``max_tokens`` is refused
    even when what arrived happens to parse and validate, because it may be a
    prefix of a different answer.
    """
    stop_reason = getattr(message, "stop_reason", None)
    if stop_reason == "max_tokens":
        raise LlmInvalidOutput("truncated", "the answer was cut at max_tokens")
    if stop_reason not in ("tool_use", "end_turn"):
        raise LlmInvalidOutput("stop_reason", f"unexpected stop_reason {stop_reason!r}")
    calls = [b for b in message.content if getattr(b, "type", None) == "tool_use"]
    if not calls:
        raise LlmInvalidOutput("no_tool_call", "the model answered in prose instead of calling the tool")
    if len(calls) != 1 or calls[0].name != tool.name:
        raise LlmInvalidOutput("wrong_tool", f"expected one call of {tool.name}")
    data = calls[0].input
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            raise LlmInvalidOutput("not_json", "the tool input is not JSON") from None
    if not isinstance(data, dict):
        raise LlmInvalidOutput("not_json", "the tool input is not a JSON object")
    try:
        jsonschema.validate(data, tool.input_schema)
    except jsonschema.ValidationError as exc:
        raise LlmInvalidOutput("schema", f"out of schema: {exc.message}") from None
    return data


class LlmGateway:
    """Calls the model for the agents, within the shared limits, recording metrics."""

    def __init__(
        self,
        settings: Settings,
        client: AsyncAnthropic | None,
        limits: SharedLimits,
        metrics: AgentMetrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._client = client
        self._limits = limits
        self._metrics = metrics
        self._clock = clock

    async def aclose(self) -> None:
        """Close the SDK client's connections (call on the loop that used it)."""
        if self._client is not None:
            await self._client.close()

    @property
    def online(self) -> bool:
        """Whether a client exists at all (an API key is configured)."""
        return self._client is not None

    async def ask(self, agent: str, system: str, user: str, tool: Tool) -> LlmReply:
        """One forced tool call for ``agent``; a trusted reply or a typed error."""
        client = self._client
        if client is None:
            raise LlmUnavailable("no_api_key", "ANTHROPIC_API_KEY is not set")
        s = self._settings
        if await self._limits.circuit_open(agent, s.llm_circuit_failures):
            raise LlmUnavailable("circuit_open", "the API failed repeatedly; skipping it for now")
        limits = agent_limits(s, agent)
        max_tokens = s.llm_max_output_tokens
        estimate = estimate_tokens(system, user, tool, max_tokens)
        day_of_call = self._clock()
        if not await self._limits.reserve_budget(agent, limits, day_of_call, estimate):
            raise LlmLimited("budget", f"{agent}'s daily token budget is used up")
        try:
            await self._wait_for_rate(agent, limits, estimate)
        except BaseException:
            await self._limits.correct_budget(agent, day_of_call, -estimate)
            raise
        return await self._call(client, agent, limits, system, user, tool, estimate, day_of_call)

    async def _wait_for_rate(self, agent: str, limits: AgentLimits, estimate: int) -> None:
        """Take from the rate buckets, waiting if the settings allow it."""
        waited_s = 0.0
        while True:
            wait_ms = await self._limits.take_rate(agent, limits, estimate)
            if wait_ms == 0:
                return
            wait_s = wait_ms / 1000
            if self._settings.llm_on_limit == "fallback" or waited_s + wait_s > self._settings.llm_max_wait_s:
                raise LlmLimited("rate", f"{agent} is over its rate limit (next slot in {wait_ms} ms)")
            await asyncio.sleep(wait_s)
            waited_s += wait_s

    async def _call(
        self, client: AsyncAnthropic, agent: str, limits: AgentLimits, system: str, user: str,
        tool: Tool, estimate: int, day_of_call: datetime,
    ) -> LlmReply:
        m = self._metrics
        started = time.monotonic()
        messages: list[MessageParam] = [{"role": "user", "content": user}]
        choice: ToolChoiceToolParam = {"type": "tool", "name": tool.name}
        try:
            message = await client.messages.create(
                model=self._settings.llm_model,
                max_tokens=self._settings.llm_max_output_tokens,
                system=system,
                messages=messages,
                tools=[tool.as_param()],
                tool_choice=choice,
            )
        except (anthropic.APITimeoutError, anthropic.APIConnectionError, anthropic.APIStatusError) as exc:
            raise await self._failed(agent, limits, estimate, day_of_call, started, exc) from exc
        latency_s = time.monotonic() - started
        m.latency_s.labels(agent).observe(latency_s)
        input_tokens, output_tokens = _usage(message)
        await self._account(agent, limits, estimate, day_of_call, input_tokens, output_tokens)
        try:
            data = extract_tool_input(message, tool)
        except LlmInvalidOutput as exc:
            m.calls.labels(agent, "invalid").inc()
            m.invalid_outputs.labels(agent, exc.reason).inc()
            log.warning("agent %s: untrusted model answer (%s)", agent, exc, extra={"agent": agent})
            raise
        await self._limits.record_success(agent)
        m.calls.labels(agent, "ok").inc()
        return LlmReply(
            data=data, model=str(getattr(message, "model", self._settings.llm_model)),
            input_tokens=input_tokens, output_tokens=output_tokens,
            latency_ms=round(latency_s * 1000),
        )

    async def _failed(
        self, agent: str, limits: AgentLimits, estimate: int, day_of_call: datetime,
        started: float, exc: Exception,
    ) -> LlmUnavailable:
        """Give back what a failed call reserved, count it; the error for the caller to raise."""
        self._metrics.latency_s.labels(agent).observe(time.monotonic() - started)
        reason = "timeout" if isinstance(exc, anthropic.APITimeoutError) else "api_error"
        self._metrics.calls.labels(agent, reason).inc()
        await self._limits.correct_budget(agent, day_of_call, -estimate)
        await self._limits.give_back_tokens(agent, limits, estimate)
        failures = await self._limits.record_failure(agent, self._settings.llm_circuit_cooldown_s)
        log.warning(
            "agent %s: model call failed (%s: %s), %d in a row", agent, reason, exc, failures,
            extra={"agent": agent},
        )
        return LlmUnavailable(reason, f"model call failed: {exc}")

    async def _account(
        self, agent: str, limits: AgentLimits, estimate: int, day_of_call: datetime,
        input_tokens: int, output_tokens: int,
    ) -> None:
        """Replace the estimate by the reported usage in budget, rate bucket and metrics."""
        used = input_tokens + output_tokens
        await self._limits.correct_budget(agent, day_of_call, used - estimate)
        await self._limits.give_back_tokens(agent, limits, estimate - used)
        m, s = self._metrics, self._settings
        m.tokens.labels(agent, "input").inc(input_tokens)
        m.tokens.labels(agent, "output").inc(output_tokens)
        m.cost_usd.labels(agent).inc(
            input_tokens * s.llm_input_usd_per_mtok / 1e6 + output_tokens * s.llm_output_usd_per_mtok / 1e6
        )


def _usage(message: Any) -> tuple[int, int]:
    """Input and output tokens the API reported (0 when it reported none)."""
    usage = getattr(message, "usage", None)
    return int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0)
