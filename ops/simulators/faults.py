"""Fault knobs shared by every simulator: latency, errors, hangs, malformed answers.

The knobs live in a :class:`Faults` object on the app; they are set by the
app factory's arguments or at run time through the admin endpoints:

- ``GET /_admin/faults``: the current knobs as JSON.
- ``POST /_admin/faults``: JSON with any of the knob fields; the rest stay.
- ``GET /_admin/stats``: requests seen per route and per outcome.

Faults apply to the API routes only, never to ``/_admin``. A hang waits until
``hang_s`` passes or the app shuts down, whichever comes first, so a test's
server stops at once. Randomness comes from a seeded generator: the same seed
and the same requests give the same faults.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from aiohttp import web

# A hang lasts an hour unless the app stops first: far past any client timeout.
DEFAULT_HANG_S = 3600.0


_INT_KNOBS = frozenset({"latency_ms", "error_status", "hang_next", "hang_after_next"})


@dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often (rates are probabilities per request, 0..1)."""

    latency_ms: int = 0
    error_rate: float = 0.0
    error_status: int = 503
    hang_rate: float = 0.0
    hang_s: float = DEFAULT_HANG_S
    malformed_rate: float = 0.0
    # Deterministic one-offs for tests: the next N requests hang before the
    # handler runs, or run the handler (the change happens) and then hang.
    hang_next: int = 0
    hang_after_next: int = 0

    def updated(self, changes: dict[str, Any]) -> Faults:
        """A copy with ``changes`` applied; unknown or badly typed fields are a ValueError."""
        known = {f.name: f.type for f in fields(self)}
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown fault knob {key!r}; known: {', '.join(known)}")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"fault knob {key!r} must be a number")  # noqa: TRY004 (a 422)
            clean[key] = int(value) if key in _INT_KNOBS else float(value)
        result = replace(self, **clean)
        for rate in (result.error_rate, result.hang_rate, result.malformed_rate):
            if not 0.0 <= rate <= 1.0:
                raise ValueError("rates must be between 0 and 1")
        return result


class FaultState:
    """The mutable holder of one app's knobs, its random generator and its counters."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()
        self.stopping = asyncio.Event()

    def take_one(self, knob: str) -> bool:
        """Consume one unit of a countdown knob (``hang_next``...); False when it is at 0."""
        left = getattr(self.faults, knob)
        if left <= 0:
            return False
        self.faults = replace(self.faults, **{knob: left - 1})
        return True

    async def hang(self) -> None:
        """Wait until ``hang_s`` passes or the app shuts down."""
        self.stats["hang"] += 1
        try:
            await asyncio.wait_for(self.stopping.wait(), self.faults.hang_s)
        except TimeoutError:
            pass

    def roll(self, rate: float) -> bool:
        """True with probability ``rate`` (never draws for 0 or 1, so those are exact)."""
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return self.rng.random() < rate


FAULTS_KEY = web.AppKey("faults", FaultState)
MalformedFactory = Callable[[FaultState], web.Response]
MALFORMED_KEY: web.AppKey[MalformedFactory] = web.AppKey("malformed")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply the knobs to every non-admin request: latency, hang, error, malformed, hang after."""
    state = request.app[FAULTS_KEY]
    if request.path.startswith("/_admin"):
        return await handler(request)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    state.stats[f"requests {route}"] += 1
    faults = state.faults
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    if state.take_one("hang_next") or state.roll(faults.hang_rate):
        await state.hang()
        raise web.HTTPServiceUnavailable(text="hung, then gave up")
    if state.roll(faults.error_rate):
        state.stats[f"error {faults.error_status}"] += 1
        return web.json_response({"error": "injected fault"}, status=faults.error_status)
    if state.roll(faults.malformed_rate):
        state.stats["malformed"] += 1
        garbage: web.StreamResponse = request.app[MALFORMED_KEY](state)
        return garbage
    response = await handler(request)
    state.stats[f"ok {route}"] += 1
    if state.take_one("hang_after_next"):
        await state.hang()
    return response


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[FAULTS_KEY].faults))


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[FAULTS_KEY]
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")  # noqa: TRY004 (answered as a 422)
        state.faults = state.faults.updated(body)
    except ValueError as exc:
        raise web.HTTPUnprocessableEntity(text=str(exc)) from None
    return web.json_response(asdict(state.faults))


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(dict(request.app[FAULTS_KEY].stats))


def install_faults(app: web.Application, faults: Faults, seed: int,
                   malformed: Callable[[FaultState], web.Response]) -> FaultState:
    """Give ``app`` the fault middleware and admin routes; ``malformed`` builds a garbage answer."""
    state = FaultState(faults, seed)
    app[FAULTS_KEY] = state
    app[MALFORMED_KEY] = malformed
    app.middlewares.append(fault_middleware)
    app.router.add_get("/_admin/faults", _get_faults)
    app.router.add_post("/_admin/faults", _set_faults)
    app.router.add_get("/_admin/stats", _get_stats)

    async def release_hangs(app: web.Application) -> None:
        state.stopping.set()

    app.on_shutdown.append(release_hangs)
    return state


@asynccontextmanager
async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` on the current loop for the block; yields its base URL (port 0 = any free port)."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server: Any = site._server
    assert server is not None and server.sockets
    bound_port = int(server.sockets[0].getsockname()[1])
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()
