"""Jobs from outside Python and from operators: Node.js, the HTTP API, ``shopflow jobs``."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from runtime.broker import setup_broker
from runtime.cli import main
from runtime.settings import Settings
from tests.support import queues_table_rows, wait_until
from web.app import create_app
from web.auth import TokenSigner

from . import worker_process as wp
from .procs import Log, Workers, job, state_is

pytestmark = pytest.mark.slow

NODE_SCRIPT = Path(__file__).with_name("node_producer.js")
SECRET = "jobs-test-secret-0123456789abcdef"


@pytest.fixture
def api_settings(fast: Settings) -> Settings:
    return replace(fast, token_secret=SECRET)


@pytest.fixture
async def api(api_settings: Settings) -> AsyncIterator[str]:
    """The real create_app on a real socket; yields its base URL."""
    server = TestServer(create_app(api_settings), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def staff_token() -> str:
    return TokenSigner(SECRET.encode()).issue("staff", None, 600)


async def test_a_nodejs_producer_sends_jobs_through_redis_and_http(
        api_settings: Settings, api: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs)")
    workers = Workers(api_settings)
    workers.start()
    try:
        redis_url = urlparse(api_settings.redis_url or "")
        proc = await asyncio.create_subprocess_exec(
            node, str(NODE_SCRIPT), redis_url.hostname or "127.0.0.1", str(redis_url.port),
            api_settings.namespace, api, staff_token(), wp.RECORD.queue, wp.RECORD.actor,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        sent = json.loads(out)
        assert sent["http"] == {"job_id": "node-http-1", "state": "waiting", "duplicate": False}
        log = Log(api_settings)
        await asyncio.to_thread(wait_until, lambda: log.count(event="end") == 2, 30,
                                "both jobs from Node.js to run")
        assert {e["tag"] for e in log.entries(event="end")} == {"from-node-redis",
                                                               "from-node-http"}
        for job_id in (sent["redis_job_id"], "node-http-1"):
            await asyncio.to_thread(wait_until, state_is(api_settings, job_id, "completed"), 20,
                                    f"job {job_id} to be recorded completed")
    finally:
        workers.stop_all()


async def test_operators_control_jobs_over_http(api_settings: Settings, api: str) -> None:
    workers = Workers(api_settings)
    workers.start()  # declares the actors, so the API knows them
    workers.stop_all()
    headers = {"Authorization": f"Bearer {staff_token()}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, api + path, json=body) as response:
                text = await response.text()
                return response.status, json.loads(text) if text else None

        assert (await call("POST", "/api/v1/queues/analytics/pause"))[1]["changed"] is True
        status, sent = await call("POST", "/api/v1/jobs", {
            "queue": "analytics", "actor": wp.RECORD.actor, "args": ["via-http"],
            "options": {"job_id": "op-1", "priority": 3}})
        assert (status, sent["duplicate"]) == (201, False)
        assert (await call("POST", "/api/v1/jobs", {
            "queue": "analytics", "actor": wp.RECORD.actor, "args": ["again"],
            "options": {"job_id": "op-1"}}))[0] == 200
        status, error = await call("POST", "/api/v1/jobs", {
            "queue": "analytics", "actor": "no_such_actor"})
        assert (status, error["error"]["field"]) == (422, "actor")
        status, error = await call("POST", "/api/v1/jobs", {
            "queue": "analytics", "actor": wp.RECORD.actor, "options": {"retry": 3}})
        assert (status, error["error"]["field"]) == (422, "retry")
        _, queues = await call("GET", "/api/v1/queues")
        analytics = {q["name"]: q for q in queues["queues"]}["analytics"]
        assert (analytics["waiting"], analytics["paused"]) == (1, True)
        _, listed = await call("GET", "/api/v1/jobs?queue=analytics&state=waiting")
        assert [j["id"] for j in listed["jobs"]] == ["op-1"]
        status, shown = await call("GET", "/api/v1/jobs/op-1")
        assert (status, shown["args"], shown["priority"]) == (200, ["via-http"], 3)
        assert (await call("POST", "/api/v1/jobs/op-1/cancel"))[1]["status"] == "cancelled"
        assert (await call("POST", "/api/v1/jobs/op-1/retry"))[0] == 202
        assert (await call("DELETE", "/api/v1/jobs/op-1"))[0] == 204
        assert (await call("GET", "/api/v1/jobs/op-1"))[0] == 404
        assert (await call("DELETE", "/api/v1/queues/analytics/dead"))[1]["deleted"] == 0
        assert (await call("POST", "/api/v1/queues/nope/pause"))[0] == 404
        assert (await call("POST", "/api/v1/queues/analytics/resume"))[1]["changed"] is True
    async with aiohttp.ClientSession() as anonymous, anonymous.get(api + "/api/v1/queues") as r:
        assert r.status == 401


def test_shopflow_jobs_commands(fast: Settings, workers: Workers,
                                monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in fast.to_env().items():
        monkeypatch.setenv(key, value)
    workers.start()
    assert main(["jobs", "send", "analytics", wp.RECORD.actor, "from-cli",
                 "-o", "job_id=cli-1"]) == 0
    assert "job cli-1: waiting" in capsys.readouterr().out
    wait_until(state_is(fast, "cli-1", "completed"), 20, "the job sent from the CLI to run")
    assert main(["jobs", "queues"]) == 0
    rows = queues_table_rows(capsys.readouterr().out)
    assert (rows["analytics"]["sent"], rows["analytics"]["completed"]) == ("1", "1")
    assert main(["jobs", "list", "analytics", "--state", "completed", "--json"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["cli-1"]
    assert main(["jobs", "show", "cli-1"]) == 0
    assert json.loads(capsys.readouterr().out)["args"] == ["from-cli"]
    assert main(["jobs", "retry", "cli-1"]) == 1  # completed jobs are not retried
    assert "only failed, dead or cancelled" in capsys.readouterr().err
    sent = wp.CANCELLABLE.send(setup_broker(fast), "cli-cancel")
    log = Log(fast)
    wait_until(lambda: log.count("cli-cancel", "start") == 1, 20, "the job to start")
    assert main(["jobs", "cancel", sent.job_id]) == 0
    assert "asked to stop" in capsys.readouterr().out
    wait_until(state_is(fast, sent.job_id, "cancelled"), 20, "the job to stop")
    assert main(["jobs", "pause", "analytics"]) == 0
    assert main(["jobs", "resume", "analytics"]) == 0
    assert main(["jobs", "dead", "--empty"]) == 0
    assert "deleted 0 dead job(s)" in capsys.readouterr().out
    found = job(fast, "cli-1")
    assert found is not None and found["state"] == "completed"
