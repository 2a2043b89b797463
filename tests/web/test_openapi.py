"""The OpenAPI document is true (every route documented, every operation routed), and
schemathesis fuzzing against it finds no 5xx."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any, Self

import aiohttp
import hypothesis
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given
from requests.structures import CaseInsensitiveDict
from schemathesis.core.result import Err

from runtime.settings import Settings
from tests.web.conftest import ServerFactory, build_full_app, seed
from web import seams
from web.adapters import StoreJobsAdmin
from web.auth import TokenSigner
from web.openapi import OPENAPI_PATH, OPERATIONS, routed_operations

# Owned by web/app.py (create_app): documented here, routed there.
APP_PY_OPERATIONS = {("GET", "/health"), ("POST", "/api/v1/orders"),
                     ("POST", "/api/v1/orders/{order_id}/payment"),
                     ("GET", "/api/v1/orders/{order_id}")}
# Fuzzing budget: small, so the whole fuzz stays well under a minute on 2 shared cores.
FUZZ_EXAMPLES_PER_OPERATION = 8


def _create_app(settings: Settings) -> web.Application:
    """The production app (web/app.py) with every route; its start-up plugs the real seams
    (web/wiring.py), the jobs layer's StoreJobsAdmin on this test's Redis included."""
    from web.app import create_app

    return create_app(settings)


def test_every_route_is_documented_and_every_operation_routed(web_settings: Settings) -> None:
    app = _create_app(web_settings)
    routed = routed_operations(app)
    documented = set(OPERATIONS)
    assert routed - documented == set(), "routes missing from web/openapi.py"
    assert documented - routed == set(), "documented operations nobody routes"
    assert APP_PY_OPERATIONS <= routed


async def test_served_document_lists_the_routes(web_settings: Settings, signer: TokenSigner,
                                                start_server: ServerFactory,
                                                http: aiohttp.ClientSession) -> None:
    server: TestServer = await start_server(build_full_app(web_settings, signer))
    async with http.get(server.make_url(OPENAPI_PATH)) as resp:
        doc = await resp.json()
    served = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == routed_operations(server.app)
    assert doc["openapi"].startswith("3.")


class ThreadedServer:
    """The app on its own event loop in a thread, for synchronous clients like schemathesis."""

    def __init__(self, app: web.Application, name: str = "app") -> None:
        self.app = app
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        # No access log: the fuzzer's thousands of requests would only be noise, and the
        # server thread outlives pytest's per-test capture of stderr ("Logging error").
        self._runner = web.AppRunner(app, access_log=None)

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


APPS: dict[str, Callable[[Settings, TokenSigner], web.Application]] = {
    # Only the web face, other concerns' seams stubbed (tests/web/stubs.py).
    "web-face-with-stubs": build_full_app,
    # What `shopflow web` serves: orders, /health, every seam the real one.
    "create_app": lambda settings, signer: _create_app(settings),
}


@pytest.fixture(params=sorted(APPS))
def fuzz_server(request: pytest.FixtureRequest, web_settings: Settings,
                signer: TokenSigner) -> Iterator[ThreadedServer]:
    asyncio.run(seed(web_settings))
    with ThreadedServer(APPS[request.param](web_settings, signer), request.param) as server:
        yield server


@pytest.mark.slow
def test_fuzz_with_schemathesis_finds_no_server_errors(fuzz_server: ThreadedServer,
                                                       signer: TokenSigner) -> None:
    base_url = f"http://127.0.0.1:{fuzz_server.port}"
    schema = schemathesis.openapi.from_url(base_url + OPENAPI_PATH)
    tokens = {"staff": signer.issue("staff", None, 3600),
              "customer": signer.issue("customer", 1, 3600)}
    failures: list[str] = []
    answers: set[tuple[str, str, int]] = set()  # (role, operation, status)
    fuzzed: set[tuple[str, str]] = set()
    runs = [("staff", schemathesis.GenerationMode.POSITIVE),
            ("customer", schemathesis.GenerationMode.POSITIVE),
            ("staff", schemathesis.GenerationMode.NEGATIVE)]
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the served document itself is broken
        operation = result.ok()
        fuzzed.add((operation.method.upper(), operation.path))
        for role, mode in runs:
            fuzz = _fuzzer(operation, mode, role, tokens[role], base_url, failures, answers)
            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                # No parameters and no body (GET /health): there is nothing to make invalid.
                if mode is not schemathesis.GenerationMode.NEGATIVE:
                    raise
    assert failures == []
    # Every route, none left out (schemathesis does not fuzz the document it loaded from).
    assert fuzzed == routed_operations(fuzz_server.app) - {("GET", OPENAPI_PATH)}
    if fuzz_server.name == "create_app":
        assert APP_PY_OPERATIONS <= fuzzed
        # The jobs endpoints were fuzzed against the real job layer, not a stub.
        assert isinstance(fuzz_server.app[seams.JOBS_ADMIN], StoreJobsAdmin)
    # The tokens were honoured everywhere, orders included: nothing was refused as 401.
    assert {(role, op) for role, op, status in answers if status == 401} == set()


def _fuzzer(operation: schemathesis.APIOperation[Any, Any, Any, Any], mode: schemathesis.GenerationMode, role: str,
            token: str, base_url: str, failures: list[str],
            answers: set[tuple[str, str, int]]) -> Callable[[], None]:
    """A Hypothesis test of one operation, as one role, in one generation mode."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES_PER_OPERATION, deadline=None,
                         database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case[Any]) -> None:
        # Assigned, not mutated in place: schemathesis tracks assignments to a case.
        case.headers = CaseInsensitiveDict({**case.headers, "Authorization": f"Bearer {token}"})
        response = case.call(base_url=base_url)
        answers.add((role, f"{case.method} {operation.path}", response.status_code))
        if response.status_code >= 500:
            failures.append(f"{role} {case.method} {case.formatted_path} -> "
                            f"{response.status_code}: {response.text[:200]}")
        if mode is schemathesis.GenerationMode.NEGATIVE:
            return  # invalid input: any documented 4xx will do, only 5xx is a bug
        case.validate_response(response, checks=[
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.status_code_conformance,
            schemathesis.checks.content_type_conformance,
            schemathesis.checks.response_schema_conformance,
        ])

    return fuzz
