"""Asking the model for one validated tool call, within the shared limits.

:class:`LlmGateway` is the only place that talks to the Anthropic API. A call
names one tool and forces the model to use it (``tool_choice``); the answer is
trusted only when the response stopped normally, holds exactly that tool call,
and its input validates against the tool's JSON schema. Everything else
raises a typed error the agent turns into its fallback (or, for moderation,
into manual review):

- :class:`LlmUnavailable`: no key, circuit open, timeout, API error after the
  gateway's retries (which honour ``retry-after`` on 429 and 529), or the
  request's deadline passed; it carries the API's ``retry-after`` so a retried
  job waits for it;
- :class:`LlmLimited`: over the daily budget, or over the rate limit when
  waiting is off or would take too long;

Everything one request does (waiting for a rate slot, its attempts, their
backoff) happens inside one deadline (:func:`request_deadline_s`) below the
actor's ask timeout and below what the handler has left (the job's time
limit, the asker's deadline), so the agent always has time left to answer
from its fallback.
- :class:`LlmInvalidOutput`: cut at ``max_tokens``, prose instead of the
  tool call, input that is not a JSON object or is out of schema.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import anthropic
import jsonschema
from anthropic import AsyncAnthropic
from anthropic.types import MessageParam, ToolChoiceToolParam, ToolParam

from actors.agents.limits import AgentLimits, SharedLimits
from actors.agents.metrics import AgentMetrics
from runtime.errors import LlmInvalidOutput, LlmLimited, LlmUnavailable
from runtime.http import RetryPolicy
from runtime.jobs.context import ask_time_left_s, current_job
from runtime.settings import Settings

log = logging.getLogger(__name__)

# A conservative chars-per-token ratio for estimating a request before it is sent.
_CHARS_PER_TOKEN = 3
# The deadline of one request leaves the agent a quarter of the actor's ask timeout
# for its database work and the fallback.
_ASK_TIMEOUT_SHARE = 0.75
# Backoff between the gateway's attempts: the SDK's own (0.5 s doubling up to 8 s, -25 % jitter).
DEFAULT_BACKOFF = RetryPolicy(base_backoff_s=0.5, max_backoff_s=8.0, jitter=0.25)


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
        # one attempt per call: LlmGateway retries itself, within the request's deadline
        max_retries=0,
    )


def agent_limits(settings: Settings, agent: str) -> AgentLimits:
    """The configured limits of ``agent`` (recommendation, support or moderation)."""
    return AgentLimits(
        requests_per_min=int(getattr(settings, f"{agent}_rpm")),
        tokens_per_min=int(getattr(settings, f"{agent}_tpm")),
        daily_tokens=int(getattr(settings, f"{agent}_daily_tokens")),
    )


def estimate_input_tokens(system: str, user: str, tool: Tool) -> int:
    """Input tokens a call is estimated to send (what a call that got no answer may still cost)."""
    chars = len(system) + len(user) + len(json.dumps(tool.as_param()))
    return math.ceil(chars / _CHARS_PER_TOKEN)


def estimate_tokens(system: str, user: str, tool: Tool, max_tokens: int) -> int:
    """Tokens a call may use at most, estimated before sending (input + output cap)."""
    return estimate_input_tokens(system, user, tool) + max_tokens


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


def request_deadline_s(settings: Settings, time_left_s: float | None = None) -> float:
    """How long one :meth:`LlmGateway.ask` may take in all: rate wait, attempts, backoff.

    ``SHOPFLOW_LLM_DEADLINE_S``, but never more than three quarters of the actor
    ask timeout, nor of ``time_left_s`` (what the handler has left, if it is
    bounded: :func:`handler_time_left_s`): the agent must still have time to
    answer from its fallback (SQL, a database write) before its handler is cut
    (the thin actor's ask, the job's own time limit).
    """
    deadline_s = min(settings.llm_deadline_s, settings.actor_ask_timeout_s * _ASK_TIMEOUT_SHARE)
    if time_left_s is not None:
        deadline_s = min(deadline_s, time_left_s * _ASK_TIMEOUT_SHARE)
    return deadline_s


def handler_time_left_s() -> float | None:
    """What the running handler has left before it is cut, when something bounds it here:
    the current job's time limit (a job sent with ``timeout_ms`` under the LLM deadline,
    say) or the time its asker's answer is due (its message waited in the mailbox).
    None when neither is known (a call outside a job and an ask)."""
    job = current_job()
    bounds = [left for left in (job.time_left_s() if job is not None else None,
                                ask_time_left_s()) if left is not None]
    return min(bounds) if bounds else None


def retry_after_hint_s(headers: Mapping[str, str] | None, now_s: float | None = None) -> float | None:
    """The API's ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date) in seconds, or None."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            hint = float(raw_ms) / 1000
        except ValueError:
            hint = 0.0
        if hint > 0:
            return hint
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    return seconds if seconds > 0 else None


def _retryable_status(exc: anthropic.APIStatusError) -> bool:
    """The statuses worth another attempt (the SDK's own rule, ``x-should-retry`` first)."""
    says = exc.response.headers.get("x-should-retry")
    if says in ("true", "false"):
        return says == "true"
    return exc.status_code in (408, 409, 429) or exc.status_code >= 500


@dataclass
class _Request:
    """One ask's reservations and how far it got, so they are settled exactly once."""

    agent: str
    limits: AgentLimits
    estimate: int  # tokens reserved: input estimate + max_tokens
    input_estimate: int
    day: datetime  # the budget day the reservation was made on
    rate_taken: bool = False
    started_s: float | None = None  # time.monotonic() of the first attempt
    in_flight: bool = False  # an attempt is on the wire right now
    maybe_billed: bool = False  # an attempt was sent and never answered (the API may bill it)
    last_error: anthropic.APIError | None = None
    retry_after_s: float | None = None

    def kept_tokens(self) -> int:
        """Tokens a failed ask still counts: the input estimate if the API may have billed it."""
        return self.input_estimate if (self.maybe_billed or self.in_flight) else 0


class LlmGateway:
    """Calls the model for the agents, within the shared limits, recording metrics.

    The SDK client makes a single attempt per call (``max_retries=0``); this
    gateway retries (``SHOPFLOW_LLM_MAX_RETRIES``, backoff or the API's
    ``retry-after``) inside one deadline (:func:`request_deadline_s`), so a
    slow, hanging or rate-limiting API always ends in a typed error the agent
    turns into its fallback, before the actor's ask times out.
    """

    def __init__(
        self,
        settings: Settings,
        client: AsyncAnthropic | None,
        limits: SharedLimits,
        metrics: AgentMetrics,
        clock: Callable[[], datetime],
        backoff: RetryPolicy = DEFAULT_BACKOFF,
    ) -> None:
        self._settings = settings
        self._client = client
        self._limits = limits
        self._metrics = metrics
        self._clock = clock
        self._backoff = backoff

    async def aclose(self) -> None:
        """Close the SDK client's connections (call on the loop that used it)."""
        if self._client is not None:
            await self._client.close()

    @property
    def online(self) -> bool:
        """Whether a client exists at all (an API key is configured)."""
        return self._client is not None

    async def ask(self, agent: str, system: str, user: str, tool: Tool) -> LlmReply:
        """One forced tool call for ``agent``; a trusted reply or a typed error, within the deadline.

        Runs on the process's loop. Whatever ends the request (an answer, an
        API error, the deadline, a cancellation by the asker) settles its
        budget and rate reservations, and a call that got no answer counts
        against the agent's circuit.
        """
        client = self._client
        if client is None:
            raise LlmUnavailable("no_api_key", "ANTHROPIC_API_KEY is not set")
        s = self._settings
        if await self._limits.circuit_open(agent, s.llm_circuit_failures):
            raise LlmUnavailable("circuit_open", "the API failed repeatedly; skipping it for now")
        limits = agent_limits(s, agent)
        estimate = estimate_tokens(system, user, tool, s.llm_max_output_tokens)
        req = _Request(agent, limits, estimate, estimate - s.llm_max_output_tokens, self._clock())
        if not await self._limits.reserve_budget(agent, limits, req.day, estimate):
            raise LlmLimited("budget", f"{agent}'s daily token budget is used up")
        deadline_s = request_deadline_s(s, handler_time_left_s())
        deadline_at = asyncio.get_running_loop().time() + deadline_s
        try:
            async with asyncio.timeout_at(deadline_at) as scope:
                await self._wait_for_rate(req, deadline_at)
                message = await self._attempts(client, req, system, user, tool, deadline_at)
        except TimeoutError as exc:
            if not scope.expired():
                await self._give_up(req, None)
                raise
            error = LlmUnavailable("timeout", f"no answer within the {deadline_s:g}s deadline")
            await self._give_up(req, error)
            raise error from exc
        except asyncio.CancelledError:
            # the asker gave up (its own timeout, a shutdown): settle even if cancelled again
            await asyncio.shield(self._give_up(req, None, cancelled=True))
            raise
        except anthropic.APIError as exc:
            reason = "timeout" if isinstance(exc, anthropic.APITimeoutError) else "api_error"
            error = LlmUnavailable(reason, f"model call failed: {exc}", retry_after_s=req.retry_after_s)
            await self._give_up(req, error)
            raise error from exc
        except BaseException:
            await self._give_up(req, None)
            raise
        return await self._accept(req, message, tool)

    async def _wait_for_rate(self, req: _Request, deadline_at: float) -> None:
        """Take from the rate buckets, waiting if the settings and the deadline allow it."""
        loop = asyncio.get_running_loop()
        waited_s = 0.0
        while True:
            wait_ms = await self._limits.take_rate(req.agent, req.limits, req.estimate)
            if wait_ms == 0:
                req.rate_taken = True
                return
            wait_s = wait_ms / 1000
            if (self._settings.llm_on_limit == "fallback" or waited_s + wait_s > self._settings.llm_max_wait_s
                    or loop.time() + wait_s >= deadline_at):
                raise LlmLimited("rate", f"{req.agent} is over its rate limit (next slot in {wait_ms} ms)")
            await asyncio.sleep(wait_s)
            waited_s += wait_s

    async def _attempts(self, client: AsyncAnthropic, req: _Request, system: str, user: str,
                        tool: Tool, deadline_at: float) -> Any:
        """The call, retried on transport errors and retryable statuses while the deadline allows.

        A wait (backoff, or the API's ``retry-after``) that would end past the
        deadline is not started: the last error goes up at once, carrying the
        API's hint so a retried job waits for it instead.
        """
        loop = asyncio.get_running_loop()
        messages: list[MessageParam] = [{"role": "user", "content": user}]
        choice: ToolChoiceToolParam = {"type": "tool", "name": tool.name}
        attempts = self._settings.llm_max_retries + 1
        for number in range(1, attempts + 1):
            if req.started_s is None:
                req.started_s = time.monotonic()
            req.in_flight = True
            try:
                return await client.messages.create(
                    model=self._settings.llm_model,
                    max_tokens=self._settings.llm_max_output_tokens,
                    system=system,
                    messages=messages,
                    tools=[tool.as_param()],
                    tool_choice=choice,
                )
            except anthropic.APIStatusError as exc:
                req.in_flight = False
                req.last_error, retryable = exc, _retryable_status(exc)
                req.retry_after_s = retry_after_hint_s(exc.response.headers)
            except anthropic.APIConnectionError as exc:
                req.in_flight = False
                req.last_error, retryable, req.retry_after_s = exc, True, None
                if isinstance(exc, anthropic.APITimeoutError):
                    req.maybe_billed = True
            wait_s = max(self._backoff.backoff_s(number), req.retry_after_s or 0.0)
            if not retryable or number == attempts or loop.time() + wait_s >= deadline_at:
                raise req.last_error
            log.info("agent %s: attempt %d failed (%s); retrying in %.2fs", req.agent, number,
                     req.last_error, wait_s, extra={"agent": req.agent, "attempt": number})
            await asyncio.sleep(wait_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _accept(self, req: _Request, message: Any, tool: Tool) -> LlmReply:
        """Account the answer's reported usage, then trust it only if it validates."""
        m = self._metrics
        req.in_flight = False
        latency_s = time.monotonic() - (req.started_s or time.monotonic())
        m.latency_s.labels(req.agent).observe(latency_s)
        input_tokens, output_tokens = _usage(message)
        await self._account(req, input_tokens, output_tokens)
        try:
            data = extract_tool_input(message, tool)
        except LlmInvalidOutput as exc:
            m.calls.labels(req.agent, "invalid").inc()
            m.invalid_outputs.labels(req.agent, exc.reason).inc()
            log.warning("agent %s: untrusted model answer (%s)", req.agent, exc, extra={"agent": req.agent})
            raise
        await self._limits.record_success(req.agent)
        m.calls.labels(req.agent, "ok").inc()
        return LlmReply(
            data=data, model=str(getattr(message, "model", self._settings.llm_model)),
            input_tokens=input_tokens, output_tokens=output_tokens,
            latency_ms=round(latency_s * 1000),
        )

    async def _give_up(self, req: _Request, error: LlmUnavailable | None, cancelled: bool = False) -> None:
        """Settle a request that got no answer; count it against the circuit if the API let us down.

        The budget and the tokens bucket get back what was reserved, except the
        input estimate of a call that was sent and never answered (a timeout, the
        deadline, the asker cancelling): the API may have billed it. ``error`` is
        what the caller will raise when the API failed; None when the request
        ended otherwise (over the rate limit, cancelled, an unexpected error).
        """
        keep = req.kept_tokens()
        await self._limits.correct_budget(req.agent, req.day, keep - req.estimate)
        if req.rate_taken:
            await self._limits.give_back_tokens(req.agent, req.limits, req.estimate - keep)
        api_failed = error is not None or (cancelled and req.in_flight)
        if req.started_s is None or not api_failed:
            return
        reason = error.reason if error is not None else "cancelled"
        self._metrics.latency_s.labels(req.agent).observe(time.monotonic() - req.started_s)
        self._metrics.calls.labels(req.agent, reason).inc()
        failures = await self._limits.record_failure(req.agent, self._settings.llm_circuit_cooldown_s)
        log.warning("agent %s: model call failed (%s: %s), %d in a row", req.agent, reason,
                    error if error is not None else "the asker gave up waiting", failures,
                    extra={"agent": req.agent})

    async def _account(self, req: _Request, input_tokens: int, output_tokens: int) -> None:
        """Replace the estimate by the reported usage in budget, rate bucket and metrics."""
        used = input_tokens + output_tokens
        await self._limits.correct_budget(req.agent, req.day, used - req.estimate)
        await self._limits.give_back_tokens(req.agent, req.limits, req.estimate - used)
        m, s = self._metrics, self._settings
        m.tokens.labels(req.agent, "input").inc(input_tokens)
        m.tokens.labels(req.agent, "output").inc(output_tokens)
        m.cost_usd.labels(req.agent).inc(
            input_tokens * s.llm_input_usd_per_mtok / 1e6 + output_tokens * s.llm_output_usd_per_mtok / 1e6
        )


def _usage(message: Any) -> tuple[int, int]:
    """Input and output tokens the API reported (0 when it reported none)."""
    usage = getattr(message, "usage", None)
    return int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0)
