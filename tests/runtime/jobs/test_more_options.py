"""Per-job options that had no test able to fail: ``timeout_ms`` and keep-last-N failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.errors import PermanentJobError
from runtime.jobs.broker import JobBroker
from runtime.jobs.options import DEFAULT_KEEP_FAILED
from runtime.jobs.store import JobStore
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

from .conftest import Seen

pytestmark = pytest.mark.slow

ENDLESS = JobSpec(QUEUE_EMAILS, "jtm_endless")
BROKEN = JobSpec(QUEUE_EMAILS, "jtm_broken")
# Far beyond every wait below: a job that ends did not end by itself.
ENDLESS_S = 120


def _endless(finished: list[str]) -> Callable[[str], None]:
    def run(tag: str) -> None:
        deadline = time.monotonic() + ENDLESS_S
        while time.monotonic() < deadline:
            time.sleep(0.01)  # short sleeps: Dramatiq's time limit interrupts between them
        finished.append(tag)
    return run


def _broken(tag: str) -> None:
    raise PermanentJobError(f"{tag} cannot work")


async def test_timeout_ms_interrupts_a_running_job_which_retries_then_fails_with_the_reason(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    finished: list[str] = []
    declare_actor(broker, ENDLESS, _endless(finished))
    sent = ENDLESS.send(broker, "t-1", timeout_ms=300, attempts=2, backoff="fixed",
                        backoff_ms=50, jitter=False)
    with running({QUEUE_EMAILS}):
        retrying = await asyncio.to_thread(seen.wait, "retrying", sent.job_id, 1, 30)
        await asyncio.to_thread(seen.wait, "failed", sent.job_id, 1, 30)
    assert finished == []
    assert "TimeLimitExceeded" in retrying[0].detail["error"]
    found = await store.get(sent.job_id)
    assert found is not None
    assert (found["state"], found["attempt"]) == ("failed", 2)
    assert found["error"].startswith("TimeLimitExceeded"), found["error"]
    assert [h["event"] for h in found["history"]].count("retrying") == 1


async def _fail_all(broker: JobBroker, seen: Seen, count: int, threads: int = 1,
                    **options: Any) -> list[str]:
    """Send ``count`` jobs that fail for good and run them; their ids in send order
    (with one thread, also the order they fail in)."""
    declare_actor(broker, BROKEN, _broken)
    ids = [BROKEN.send(broker, f"f-{n}", **options).job_id for n in range(count)]
    worker = make_worker(broker, {QUEUE_EMAILS}, threads)
    worker.start()
    try:
        await asyncio.to_thread(seen.wait, "failed", None, count, 60)
    finally:
        worker.stop(timeout=10_000)
    return ids


async def test_a_messages_keep_failed_keeps_only_the_last_n_failed_jobs(
        broker: JobBroker, seen: Seen, store: JobStore) -> None:
    ids = await _fail_all(broker, seen, 5, keep_failed=3)
    kept = [j["id"] for j in await store.list_jobs(QUEUE_EMAILS, "failed")]
    assert kept == list(reversed(ids[-3:]))
    assert (await store.counts([QUEUE_EMAILS]))[0].failed == 3
    for job_id in ids[:-3]:
        assert await store.get(job_id) is None, "a trimmed failed job leaves no record"


async def test_the_keep_failed_setting_bounds_the_failed_list(
        settings: Settings, store: JobStore) -> None:
    broker = setup_broker(replace(settings, job_keep_failed=2))
    try:
        events = Seen()
        broker.hooks.subscribe(None, events)
        ids = await _fail_all(broker, events, 4)
    finally:
        broker.close()
    assert (await store.counts([QUEUE_EMAILS]))[0].failed == 2
    assert [j["id"] for j in await store.list_jobs(QUEUE_EMAILS, "failed")] == ids[:1:-1]


async def test_by_default_the_last_500_failed_jobs_are_kept(
        broker: JobBroker, seen: Seen, store: JobStore) -> None:
    assert DEFAULT_KEEP_FAILED == 500
    ids = await _fail_all(broker, seen, DEFAULT_KEEP_FAILED + 3, threads=4)
    assert (await store.counts([QUEUE_EMAILS]))[0].failed == DEFAULT_KEEP_FAILED
    kept = {j["id"] for j in await store.list_jobs(QUEUE_EMAILS, "failed", DEFAULT_KEEP_FAILED)}
    gone = [job_id for job_id in ids if job_id not in kept]
    assert len(gone) == 3
    for job_id in gone:
        assert await store.get(job_id) is None
