"""The HTTP enqueue endpoint on a full bounded queue: 503 ``queue_full``, nothing enqueued."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from runtime.broker import QUEUE_ANALYTICS, JobSpec, declare_actor
from runtime.jobs.broker import JobBroker
from runtime.settings import Settings
from web.app import create_app
from web.auth import TokenSigner

pytestmark = pytest.mark.slow

SECRET = "jobs-more-test-secret-0123456789ab"
TARGET = JobSpec(QUEUE_ANALYTICS, "jtm_http_target")
# The analytics queue's bound in this test.
BOUND = 2


@pytest.fixture
def bounded(fast: Settings) -> Settings:
    return replace(fast, token_secret=SECRET, queue_max_lengths=((QUEUE_ANALYTICS, float(BOUND)),))


@pytest.fixture
async def api(bounded: Settings) -> AsyncIterator[str]:
    """The real create_app on a real socket; yields its base URL."""
    server = TestServer(create_app(bounded), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_enqueueing_over_http_into_a_full_queue_answers_503_queue_full_and_adds_nothing(
        broker: JobBroker, running: Callable[..., Any], api: str) -> None:
    declare_actor(broker, TARGET, lambda tag: tag)
    with running({QUEUE_ANALYTICS}):
        pass  # a worker boots and declares the actor, so the API knows it; then it is gone
    token = TokenSigner(SECRET.encode()).issue("staff", None, 600)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, api + path, json=body) as response:
                text = await response.text()
                return response.status, json.loads(text) if text else None

        def job(n: int) -> dict[str, Any]:
            return {"queue": QUEUE_ANALYTICS, "actor": TARGET.actor, "args": [f"http-{n}"],
                    "options": {"job_id": f"http-{n}"}}

        for n in range(BOUND):
            assert (await call("POST", "/api/v1/jobs", job(n)))[0] == 201
        status, answer = await call("POST", "/api/v1/jobs", job(BOUND))
        assert status == 503, answer
        assert answer["error"]["code"] == "queue_full"
        assert "full" in answer["error"]["message"]
        _, listed = await call("GET", f"/api/v1/jobs?queue={QUEUE_ANALYTICS}&state=waiting")
        assert [j["id"] for j in listed["jobs"]] == [f"http-{n}" for n in range(BOUND)]
        assert (await call("GET", f"/api/v1/jobs/http-{BOUND}"))[0] == 404
        _, queues = await call("GET", "/api/v1/queues")
        analytics = {q["name"]: q for q in queues["queues"]}[QUEUE_ANALYTICS]
        assert (analytics["waiting"], analytics["totals"].get("enqueued")) == (BOUND, BOUND)
