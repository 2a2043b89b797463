"""Helpers shared by the observability tests: parse a scrape, run helper processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import render_metrics
from runtime.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(settings: Settings) -> Samples:
    """Every sample of a /metrics render, keyed by (name, labels)."""
    body, _ = render_metrics(settings)
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the series is absent."""
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a helper process needs to rebuild ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOPFLOW_", "PROMETHEUS"))}
    env.update({
        "REDIS_URL": settings.redis_url or "", "DATABASE_URL": settings.database_url or "",
        "SHOPFLOW_VAR_DIR": str(settings.var_dir), "SHOPFLOW_NAMESPACE": settings.namespace,
        "SHOPFLOW_JOB_ATTEMPTS": str(settings.job_attempts),
        "SHOPFLOW_JOB_BACKOFF_MS": str(settings.job_backoff_ms),
        "PYTHONPATH": str(REPO_ROOT),
    })
    if settings.alert_webhook_url:
        env["ALERT_WEBHOOK_URL"] = settings.alert_webhook_url
    env.update(extra)
    return env


def start_process(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start a helper process and wait for its ``ready`` line."""
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, cwd=REPO_ROOT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise AssertionError(f"helper process did not start: {line!r}")
    return proc


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> int:
    """Close stdin (the helper's signal to stop cleanly) and wait for the exit code."""
    assert proc.stdin is not None
    proc.stdin.close()
    return proc.wait(timeout_s)


def kill_process(proc: subprocess.Popen[str]) -> None:
    """SIGKILL: no exit hooks run, as in a crash; reaped so its pid is gone."""
    proc.kill()
    proc.wait(10)


def iter_lines(proc: subprocess.Popen[str]) -> Iterator[str]:
    """The helper's further output lines."""
    assert proc.stdout is not None
    yield from proc.stdout
