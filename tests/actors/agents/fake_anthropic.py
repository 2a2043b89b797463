"""A local HTTP server that speaks the Anthropic Messages API, scripted per test.

The real ``anthropic`` SDK is pointed at it with ``base_url``. Each request to
``POST /v1/messages`` is recorded (body, headers, arrival time) and answered by
the next scripted step: a tool call, prose, an error status with headers, a
response cut at ``max_tokens``, an answer after a delay, or a hang that
outlasts the client's timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    body: dict[str, Any]
    headers: dict[str, str]
    at_s: float  # time.monotonic() on arrival

    @property
    def user_text(self) -> str:
        """The text of the (single) user message."""
        content = self.body["messages"][0]["content"]
        return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)

    @property
    def raw(self) -> str:
        """The whole request body as JSON text, for "is X anywhere in it" checks."""
        return json.dumps(self.body, ensure_ascii=False)


@dataclass(frozen=True)
class Step:
    """What the server answers to one request."""

    kind: str  # tool | text | status | hang | cut_tool
    payload: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    input_tokens: int = 120
    output_tokens: int = 40
    stop_reason: str | None = None
    delay_s: float = 0.0  # the server takes this long before answering


def slow(step: Step, delay_s: float) -> Step:
    """``step``, answered only after ``delay_s`` (a model that takes its time)."""
    return replace(step, delay_s=delay_s)


def tool(input_: Any, input_tokens: int = 120, output_tokens: int = 40) -> Step:
    """A normal answer: one tool_use block, stop_reason tool_use."""
    return Step("tool", input_, input_tokens=input_tokens, output_tokens=output_tokens)


def prose(text: str) -> Step:
    """The model answers in text instead of calling the tool."""
    return Step("text", text, stop_reason="end_turn")


def cut_text(text: str) -> Step:
    """Text cut at max_tokens (half a JSON document)."""
    return Step("text", text, stop_reason="max_tokens", output_tokens=1024)


def cut_tool(input_: Any) -> Step:
    """A tool call whose input parsed but whose response was cut at max_tokens."""
    return Step("tool", input_, stop_reason="max_tokens", output_tokens=1024)


def status(code: int, error_type: str, headers: dict[str, str] | None = None) -> Step:
    """An API error response in the Messages API's error shape."""
    return Step("status", error_type, status=code, headers=headers or {})


def hang() -> Step:
    """Accept the request and never answer (until the server closes)."""
    return Step("hang")


class FakeAnthropic:
    """The scripted server; ``start()`` gives its base URL."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: deque[Step | Callable[[dict[str, Any]], Step]] = deque()
        self.default: Step | Callable[[dict[str, Any]], Step] | None = None
        self._ids = itertools.count(1)
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.arrived = asyncio.Event()

    def push(self, *steps: Step | Callable[[dict[str, Any]], Step]) -> None:
        """Queue the answers to the next requests, in order."""
        self.script.extend(steps)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Received(body, dict(request.headers), time.monotonic()))
        self.arrived.set()
        step = self.script.popleft() if self.script else self.default
        if step is None:
            return _error(500, "api_error", "no scripted answer left")
        if callable(step):
            step = step(body)
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.kind == "hang":
            await self._release.wait()
            return _error(500, "api_error", "released")
        if step.kind == "status":
            return _error(step.status, step.payload, "scripted error", step.headers)
        return web.json_response(self._message(body, step))

    def _message(self, body: dict[str, Any], step: Step) -> dict[str, Any]:
        if step.kind == "tool":
            name = body["tools"][0]["name"]
            content = [{"type": "tool_use", "id": f"toolu_{next(self._ids):04d}", "name": name,
                        "input": step.payload}]
            stop = step.stop_reason or "tool_use"
        else:
            content = [{"type": "text", "text": step.payload}]
            stop = step.stop_reason or "end_turn"
        return {
            "id": f"msg_{next(self._ids):06d}", "type": "message", "role": "assistant",
            "model": body["model"], "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": step.input_tokens, "output_tokens": step.output_tokens},
        }


def _error(code: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"type": "error", "error": {"type": error_type, "message": message}}, status=code, headers=headers
    )
