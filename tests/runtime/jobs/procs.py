"""Worker processes for the job tests, and reading what their actors noted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from runtime.broker import setup_broker
from runtime.jobs.store import JobStore
from runtime.settings import Settings

from . import worker_process as wp

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Workers:
    """Worker processes of one test; every one still running is stopped at the end."""

    settings: Settings
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, threads: int = 1, wait_ready: bool = True) -> subprocess.Popen[bytes]:
        """Start a worker; wait until it has booted unless ``wait_ready`` is False
        (a poison pill may end it before it can say so)."""
        env = {**os.environ, **self.settings.to_env()}
        log = (self.settings.var_dir / f"worker-{len(self.procs)}.log")
        self.settings.var_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.runtime.jobs.worker_process", "--threads",
             str(threads)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=log.open("ab"), start_new_session=True)
        assert proc.stdout is not None
        if wait_ready:
            assert proc.stdout.readline().strip() == b"ready", f"worker did not start: see {log}"
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


class Log:
    """The actors' notes, read from Redis."""

    def __init__(self, settings: Settings) -> None:
        self._client = redis.Redis.from_url(settings.redis_url or "")
        self._key = wp.log_key(settings.namespace)

    def entries(self, tag: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        items = [json.loads(raw) for raw in self._client.lrange(self._key, 0, -1)]
        return [e for e in items if (tag is None or e["tag"] == tag)
                and (event is None or e["event"] == event)]

    def count(self, tag: str | None = None, event: str | None = None) -> int:
        return len(self.entries(tag, event))


def job(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """A job as the store shows it (a fresh client and loop per call: tests are sync)."""
    import redis.asyncio as aioredis

    async def read() -> dict[str, Any] | None:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        broker_keys = setup_broker(settings).keys
        try:
            return await JobStore(client, broker_keys, list(wp.QUEUES)).get(job_id)
        finally:
            await client.aclose()

    return asyncio.run(read())


def state_is(settings: Settings, job_id: str, state: str) -> Callable[[], bool]:
    def check() -> bool:
        found = job(settings, job_id)
        return found is not None and found["state"] == state
    return check
