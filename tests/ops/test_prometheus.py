"""ops/prometheus: promtool checks it, and a real Prometheus scrapes real metrics.

Both need Debian's ``prometheus`` package (promtool and the server); without it
these tests skip. One end-to-end test scrapes a test endpoint fed by helper
processes; the other scrapes a real ``shopflow web`` process while real
``shopflow worker`` processes (one of them SIGKILLed) run jobs.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from actors.monitor.messages import CHECK_QUEUES
from runtime.broker import setup_broker
from runtime.metrics import prepare_metrics_dir
from runtime.observability import metrics_handler
from runtime.settings import Settings
from tests.runtime.metrics_helpers import (
    kill_process,
    process_env,
    scrape,
    start_process,
    value,
)
from tests.support import free_port, http_ready, spawn, stop, wait_until, with_http_port

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt package prometheus)")
@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "alerts.yml"],
    ["test", "rules", "alerts_test.yml"],
])
def test_promtool_accepts_the_ops_files(args: list[str]) -> None:
    result = subprocess.run([PROMTOOL or "", *args], cwd=OPS, capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def _rule_names() -> list[str]:
    groups = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_every_alert_rule_has_a_firing_and_a_quiet_unit_test() -> None:
    """alerts_test.yml (run by promtool above) covers each rule both ways."""
    tests = yaml.safe_load((OPS / "alerts_test.yml").read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in (c for test in tests for c in test.get("alert_rule_test", [])):
        (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    names = set(_rule_names())
    assert names - fires == set(), "rules never seen firing"
    assert names - quiet == set(), "rules never seen quiet"
    assert (fires | quiet) - names == set(), "tests of rules that do not exist"


@pytest.fixture
async def metrics_endpoint(settings: Settings) -> AsyncIterator[str]:
    """The runtime's /metrics on a loopback port (as the api serves it); yields host:port."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(settings))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


async def _query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, object]]:
    try:
        async with session.get(f"{base}/api/v1/query", params={"query": promql}) as resp:
            if resp.status != 200:
                return []
            body = await resp.json()
    except aiohttp.ClientError:
        return []
    result: list[dict[str, object]] = body["data"]["result"]
    return result


async def _start_prometheus(tmp_path: Path, target: str,
                            rules: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    """A real Prometheus scraping ``target`` every second; returns it and its base URL."""
    if rules:
        shutil.copy(OPS / "alerts.yml", tmp_path / "alerts.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        + ("rule_files: [alerts.yml]\n" if rules else "")
        + "scrape_configs:\n"
        "  - job_name: shopflow-api\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        PROMETHEUS or "", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return server, f"http://127.0.0.1:{port}"


async def _query_until(session: aiohttp.ClientSession, server: asyncio.subprocess.Process,
                       base: str, promql: str, want: float, timeout_s: float = 30.0) -> float:
    """Query ``promql`` until its first value is ``want`` (or the timeout); the last value seen."""
    seen = float("nan")
    async with asyncio.timeout(timeout_s):
        while server.returncode is None:
            result = await _query(session, base, promql)
            if result:
                seen = float(result[0]["value"][1])  # type: ignore[index]
                if seen == want:
                    break
            await asyncio.sleep(0.1)
    assert server.returncode is None, "prometheus exited early"
    return seen


def _maintenance_jobs(settings: Settings) -> float:
    """monitor_check_queues jobs completed, summed over every process (a local scrape)."""
    return value(scrape(settings), "shopflow_jobs_total", queue="maintenance",
                 actor="monitor_check_queues", outcome="completed") or 0.0


def _check_queues(settings: Settings, times: int) -> None:
    broker = setup_broker(settings)
    try:
        for _ in range(times):
            CHECK_QUEUES.send(broker)
    finally:
        broker.close()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt package prometheus)")
async def test_a_real_prometheus_scrapes_a_real_api_summing_real_workers(
    settings: Settings, tmp_path: Path
) -> None:
    """``shopflow web`` serves /metrics; two flow workers in turn (the first SIGKILLed) ran
    the queue monitor's job 3 + 2 times; Prometheus reads 5 from the api."""
    settings = with_http_port(settings)
    prepare_metrics_dir(settings)
    api = spawn(settings, "web", log_name="api")
    workers = [spawn(settings, "worker", "--kind", "flow", log_name="flow-1")]
    server = None
    try:
        await asyncio.to_thread(wait_until, lambda: http_ready(settings.http_port), 60,
                                "the api to listen")
        _check_queues(settings, 3)
        await asyncio.to_thread(wait_until, lambda: _maintenance_jobs(settings) == 3, 60,
                                "the first worker to run 3 jobs")
        workers[0].kill()  # SIGKILL: no exit hooks, as in a crash
        workers[0].wait(10)
        workers.append(spawn(settings, "worker", "--kind", "flow", log_name="flow-2"))
        _check_queues(settings, 2)
        await asyncio.to_thread(wait_until, lambda: _maintenance_jobs(settings) == 5, 60,
                                "the second worker to run 2 more jobs")
        server, base = await _start_prometheus(tmp_path, f"127.0.0.1:{settings.http_port}")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            promql = ('sum(shopflow_jobs_total{queue="maintenance",'
                      'actor="monitor_check_queues",outcome="completed"})')
            assert await _query_until(session, server, base, promql, 5) == 5
            assert await _query_until(session, server, base, 'up{job="shopflow-api"}', 1) == 1
            # The api's own series come from the same scrape: its WebSocket gauge, summed too.
            assert await _query_until(session, server, base,
                                      "sum(shopflow_websocket_connections)", 0) == 0
    finally:
        if server is not None:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)
        for proc in (*workers[1:], api):
            stop(proc)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt package prometheus)")
async def test_a_real_prometheus_scrapes_the_summed_metrics(
    settings: Settings, metrics_endpoint: str, tmp_path: Path
) -> None:
    prepare_metrics_dir(settings)
    # Two processes in turn, the first crashed: 2 x 100 jobs must come back summed.
    for _ in range(2):
        kill_process(start_process(["-m", "tests.runtime.metrics_gauge_process", "3", "100"],
                                   process_env(settings)))
    server, base = await _start_prometheus(tmp_path, metrics_endpoint, rules=True)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            result: list[dict[str, object]] = []
            for _ in range(600):
                result = await _query(session, base, 'sum(shopflow_jobs_total)')
                if result or server.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            assert server.returncode is None, "prometheus exited early"
            assert result, "Prometheus never returned the metric"
            value = result[0]["value"]
            assert isinstance(value, list) and float(value[1]) == 2 * 100
            up = await _query(session, base, 'up{job="shopflow-api"}')
            assert float(up[0]["value"][1]) == 1  # type: ignore[index]
            rules = await (await session.get(f"{base}/api/v1/rules")).json()
            loaded = [r["name"] for g in rules["data"]["groups"] for r in g["rules"]]
            assert sorted(loaded) == sorted(_rule_names())
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
