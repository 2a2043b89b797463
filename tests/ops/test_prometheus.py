"""ops/prometheus: promtool checks it, and a real Prometheus scrapes real metrics.

Both need Debian's ``prometheus`` package (promtool and the server); without it
these tests skip.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from runtime.metrics import prepare_metrics_dir
from runtime.observability import metrics_handler
from runtime.settings import Settings
from tests.runtime.metrics_helpers import kill_process, process_env, start_process
from tests.support import free_port

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
    shutil.copy(OPS / "alerts.yml", tmp_path / "alerts.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: shopflow-api\n"
        f"    static_configs: [{{targets: ['{metrics_endpoint}']}}]\n")
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        PROMETHEUS or "", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
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
            assert len([r for g in rules["data"]["groups"] for r in g["rules"]]) == 14
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
