"""A job's context reaches the pykka actor that does its work, in a real worker process.

The thin Dramatiq actor asks a supervised actor (a thread ServiceActor and an
AsyncServiceActor), whose handler runs on the process's loop. There, too,
``current_job()`` must report progress that anyone reads through the JobStore
and see a cancel request sent from another process (this test's).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from runtime.broker import ALL_QUEUES, setup_broker
from runtime.jobs.broker import Submitted
from runtime.jobs.store import JobStore
from runtime.settings import Settings
from tests.support import wait_until

from . import actor_worker_process as awp
from .procs import ROOT, Log

pytestmark = pytest.mark.slow


@pytest.fixture
def actor_worker(fast: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """The worker process of :mod:`actor_worker_process`, stopped with SIGTERM at the end."""
    fast.var_dir.mkdir(parents=True, exist_ok=True)
    log = fast.var_dir / "actor-worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.jobs.actor_worker_process"],
                            cwd=ROOT, env={**os.environ, **fast.to_env()},
                            stderr=log.open("ab"), start_new_session=True)
    yield proc
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def test_a_handler_in_a_pykka_actor_reports_progress_and_sees_a_cancel_from_elsewhere(
        fast: Settings, actor_worker: subprocess.Popen[bytes]) -> None:
    broker = setup_broker(fast)
    client = aioredis.Redis.from_url(fast.redis_url or "")
    store = JobStore(client, broker.keys, ALL_QUEUES)
    log = Log(fast)
    try:
        sent: dict[str, Submitted] = {
            "thread": awp.IN_THREAD_ACTOR.send(broker, "thread"),
            "async": awp.IN_ASYNC_ACTOR.send(broker, "async"),
        }

        async def progressed(tag: str) -> dict[str, Any] | None:
            found = await store.get(sent[tag].job_id)
            return found if found is not None and "progress" in found else None

        for tag in sent:
            found = None
            for _ in range(600):  # the worker process boots meanwhile
                found = await progressed(tag)
                if found is not None or log.count(tag, "no-job"):
                    break
                await asyncio.sleep(0.05)
            assert log.count(tag, "no-job") == 0, f"the {tag} actor ran without its job"
            assert found is not None, f"no progress from the {tag} actor"
            assert (found["state"], found["progress"]) == ("active", awp.PROGRESS)
        for tag, s in sent.items():
            assert await store.cancel(s.job_id) == "requested"
        def cleaned(tag: str) -> Callable[[], bool]:
            return lambda: log.count(tag, "cleaned") == 1

        for tag, s in sent.items():
            await asyncio.to_thread(wait_until, cleaned(tag), 20,
                                    f"the {tag} actor to see the cancel request")
            for _ in range(400):
                found = await store.get(s.job_id)
                if found is not None and found["state"] == "cancelled":
                    break
                await asyncio.sleep(0.05)
            assert found is not None and found["state"] == "cancelled", found
        for tag in sent:
            assert log.count(tag, "deadline:True") == 1, "the job's time limit reached the actor"
    finally:
        await client.aclose()
        broker.close()
