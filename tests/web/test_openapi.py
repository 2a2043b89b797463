"""The OpenAPI document is true (every route documented, every operation routed), and
schemathesis fuzzing against it finds no 5xx."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Self

import aiohttp
import hypothesis
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given

from runtime.settings import Settings
from tests.web.conftest import ServerFactory, build_full_app, seed
from web.auth import TokenSigner
from web.openapi import OPENAPI_PATH, OPERATIONS, routed_operations

# Owned by web/app.py (create_app): documented here, routed there.
APP_PY_OPERATIONS = {("GET", "/health"), ("POST", "/api/v1/orders"),
                     ("POST", "/api/v1/orders/{order_id}/payment"),
                     ("GET", "/api/v1/orders/{order_id}")}
# Fuzzing budget: small, so the whole fuzz stays well under a minute on 2 shared cores.
FUZZ_EXAMPLES_PER_OPERATION = 8


def _full_app(settings: Settings, signer: TokenSigner) -> web.Application:
    """create_app with the whole web face (added here until create_app calls setup_* itself)."""
    from web.api_extra import setup_api
    from web.app import create_app
    from web.auth import SIGNER_KEY
    from web.dashboard import setup_dashboard
    from web.realtime import setup_realtime

    app = create_app(settings)
    if ("GET", "/api/v1/carts") not in routed_operations(app):
        app[SIGNER_KEY] = signer
        setup_realtime(app, settings)
        setup_api(app, settings)
        setup_dashboard(app)
    return app


def test_every_route_is_documented_and_every_operation_routed(web_settings: Settings,
                                                              signer: TokenSigner) -> None:
    app = _full_app(web_settings, signer)
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

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner = web.AppRunner(app)

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


@pytest.fixture
def fuzz_server(web_settings: Settings, signer: TokenSigner) -> Iterator[ThreadedServer]:
    asyncio.run(seed(web_settings))
    with ThreadedServer(build_full_app(web_settings, signer)) as server:
        yield server


@pytest.mark.slow
def test_fuzz_with_schemathesis_finds_no_server_errors(fuzz_server: ThreadedServer,
                                                       signer: TokenSigner) -> None:
    base_url = f"http://127.0.0.1:{fuzz_server.port}"
    schema = schemathesis.openapi.from_url(base_url + OPENAPI_PATH)
    tokens = {"staff": signer.issue("staff", None, 3600),
              "customer": signer.issue("customer", 1, 3600)}
    failures: list[str] = []
    runs = [("staff", schemathesis.GenerationMode.POSITIVE),
            ("customer", schemathesis.GenerationMode.POSITIVE),
            ("staff", schemathesis.GenerationMode.NEGATIVE)]
    for result in schema.get_all_operations():
        operation = result.ok()
        for role, mode in runs:
            fuzz = _fuzzer(operation, mode, role, tokens[role], base_url, failures)
            fuzz()
    assert failures == []


def _fuzzer(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, role: str,
            token: str, base_url: str, failures: list[str]) -> Callable[[], None]:
    """A Hypothesis test of one operation, as one role, in one generation mode."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES_PER_OPERATION, deadline=None,
                         database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        response = case.call(base_url=base_url)
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

    return fuzz  # type: ignore[no-any-return]
