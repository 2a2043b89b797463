"""Job control from outside a worker: what the record says, a retried job, paging lists."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from runtime.broker import QUEUE_ANALYTICS, QUEUE_EMAILS, JobSpec, declare_actor
from runtime.cli import main
from runtime.errors import TransientJobError
from runtime.jobs.broker import JobBroker
from runtime.jobs.context import current_job
from runtime.jobs.store import JobStore
from runtime.settings import Settings
from web.adapters import StoreJobsAdmin

from .conftest import Seen

PATIENT = JobSpec(QUEUE_EMAILS, "jobs_test_patient")
FAILS = JobSpec(QUEUE_EMAILS, "jobs_test_fails_once_done")
OTHER = JobSpec(QUEUE_ANALYTICS, "jobs_test_other_queue")


async def test_a_job_sent_through_the_store_records_its_actors_attempts(
        broker: JobBroker, store: JobStore, running: Callable[..., Any]) -> None:
    """The HTTP endpoint and ``shopflow jobs send`` know the actor only by name: the
    attempts its workers resolve (its options over the settings) are registered in Redis."""
    declare_actor(broker, PATIENT, lambda: None, attempts=7)
    with running({QUEUE_EMAILS}, threads=1):
        pass  # a worker booted: it registered its actors
    by_actor = await store.send(QUEUE_EMAILS, PATIENT.actor)
    by_message = await store.send(QUEUE_EMAILS, PATIENT.actor, options={"attempts": 2})
    for sent, attempts in ((by_actor, 7), (by_message, 2)):
        job = await store.get(sent.job_id)
        assert job is not None and (job["state"], job["max_attempts"]) == ("waiting", attempts)


async def test_a_retried_job_waits_without_its_old_runs_error_result_or_progress(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    def fails() -> None:
        job = current_job()
        assert job is not None
        job.progress({"done": 1, "of": 2})
        raise TransientJobError("halfway")

    declare_actor(broker, FAILS, fails)
    sent = FAILS.send(broker, attempts=1)
    with running({QUEUE_EMAILS}, threads=1):
        await asyncio.to_thread(seen.wait, "failed", sent.job_id)
    failed = await store.get(sent.job_id)
    assert failed is not None and failed["error"] and failed["progress"]
    broker.client.hset(broker.keys.job(sent.job_id), "isolate", 1)  # as if it died in company
    await store.retry(sent.job_id)
    assert broker.client.hget(broker.keys.job(sent.job_id), "isolate") is None, \
        "a fresh run with fresh deaths runs alongside others again"
    waiting = await store.get(sent.job_id)
    assert waiting is not None and waiting["state"] == "waiting"
    stale = {k: waiting[k] for k in ("error", "reason", "result", "progress", "worker")
             if k in waiting}
    assert stale == {}
    assert waiting["started_at"] is None and waiting["finished_at"] is None
    assert waiting["history"][0]["event"] == "waiting", "the old run stays in the history"


async def test_job_lists_page_with_an_offset_one_queue_and_all_queues_merged(
        broker: JobBroker, store: JobStore) -> None:
    sent = [PATIENT.send(broker, n) for n in range(4)] + [OTHER.send(broker, n) for n in range(3)]
    for s in sent:
        assert await store.cancel(s.job_id) == "cancelled"
    admin = StoreJobsAdmin(store)
    one_queue = await admin.list_jobs("cancelled", QUEUE_EMAILS, 10)
    assert await admin.list_jobs("cancelled", QUEUE_EMAILS, 2, 1) == one_queue[1:3]
    merged = await admin.list_jobs("cancelled", None, 10)
    assert len(merged) == 7
    assert await admin.list_jobs("cancelled", None, 3, 2) == merged[2:5]
    assert await admin.list_jobs("cancelled", None, 3, 7) == []


async def test_the_command_line_lists_a_page_from_an_offset(
        settings: Settings, broker: JobBroker, store: JobStore,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    sent = [PATIENT.send(broker, n) for n in range(3)]
    assert await asyncio.to_thread(main, ["jobs", "list", QUEUE_EMAILS, "--state", "waiting",
                                          "--offset", "1", "--limit", "1", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in listed] == [sent[1].job_id]
