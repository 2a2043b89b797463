"""``shopflow jobs remove``, ``watch``, ``pause`` and ``resume`` do what they say, not just exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from runtime.broker import QUEUE_ANALYTICS, QUEUE_EMAILS, JobSpec, declare_actor
from runtime.cli import main
from runtime.jobs.broker import JobBroker
from runtime.jobs.cli import queues_table
from runtime.jobs.store import JobStore, QueueCounts
from runtime.settings import Settings
from tests.support import queues_table_rows

from .conftest import Seen
from .procs import ROOT

pytestmark = pytest.mark.slow

ECHO = JobSpec(QUEUE_EMAILS, "jtm_cli_echo")
OTHER = JobSpec(QUEUE_ANALYTICS, "jtm_cli_other")


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``shopflow jobs ...`` in this process reads the test's settings from the environment, as the command does."""
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    return settings


async def cli(*args: str) -> int:
    """``shopflow ARGS`` in this process (off the test's loop: the command runs its own)."""
    return await asyncio.to_thread(main, list(args))


def watch(settings: Settings, *args: str) -> subprocess.Popen[str]:
    """``shopflow jobs watch ARGS`` as its own process (it blocks until the job ends)."""
    return subprocess.Popen(
        [sys.executable, "-c", ("import sys; from runtime.cli import main; "
                                "sys.exit(main(sys.argv[1:]))"), "jobs", "watch", *args],
        cwd=ROOT, env={**os.environ, **settings.to_env()}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)


async def test_remove_deletes_a_waiting_job_so_it_never_runs_and_a_finished_record(
        cli_env: Settings, broker: JobBroker, seen: Seen, store: JobStore,
        running: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    declare_actor(broker, ECHO, calls.append)
    doomed = ECHO.send(broker, "doomed")
    assert await cli("jobs", "remove", doomed.job_id) == 0
    assert f"job {doomed.job_id}: removed" in capsys.readouterr().out
    assert await store.get(doomed.job_id) is None
    assert (await store.counts([QUEUE_EMAILS]))[0].waiting == 0
    canary = ECHO.send(broker, "canary")
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", canary.job_id)
    assert calls == ["canary"], "the removed job ran anyway"
    assert await cli("jobs", "remove", canary.job_id) == 0
    assert await store.get(canary.job_id) is None
    assert await store.list_jobs(QUEUE_EMAILS, "completed") == []
    assert await cli("jobs", "remove", canary.job_id) == 1
    assert "no job" in capsys.readouterr().err


async def test_watch_prints_a_jobs_events_and_returns_when_it_ends(
        settings: Settings, broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    declare_actor(broker, ECHO, lambda tag: f"{tag} done")
    sent = ECHO.send(broker, "watched")
    proc = watch(settings, sent.job_id, "--timeout-s", "60")
    try:
        assert proc.stdout is not None
        # A watch that never says it began fails here (the kill below ends the read).
        first = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert json.loads(first) == {"job_id": sent.job_id, "state": "waiting"}
        with running({QUEUE_EMAILS}):  # only now can the job run: the watch has begun
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["job_id"] for e in events} == {sent.job_id}
    assert [e["event"] for e in events] == ["active", "completed"]
    assert events[-1]["type"] == "job.completed"


async def test_watch_of_an_ended_job_returns_at_once_and_of_a_stuck_one_times_out(
        settings: Settings, broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    declare_actor(broker, ECHO, lambda tag: tag)
    done = ECHO.send(broker, "done")
    with running({QUEUE_EMAILS}):
        await asyncio.to_thread(seen.wait, "completed", done.job_id)
    stuck = ECHO.send(broker, "nobody runs me")
    ended = watch(settings, done.job_id)  # no timeout: it must return by itself
    waiting = watch(settings, stuck.job_id, "--timeout-s", "0.5")
    out, _ = await asyncio.to_thread(ended.communicate, timeout=30)
    assert ended.returncode == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"job_id": done.job_id, "state": "completed"}]
    out, err = await asyncio.to_thread(waiting.communicate, timeout=30)
    assert waiting.returncode == 1
    assert json.loads(out.splitlines()[0])["state"] == "waiting"
    assert f"job {stuck.job_id} did not end within 0.5 s" in err


async def test_pause_stops_a_queues_consumption_and_resume_restarts_it(
        cli_env: Settings, broker: JobBroker, seen: Seen, store: JobStore,
        running: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    declare_actor(broker, ECHO, calls.append)
    declare_actor(broker, OTHER, calls.append)
    with running({QUEUE_EMAILS, QUEUE_ANALYTICS}):
        assert await cli("jobs", "pause", QUEUE_EMAILS) == 0
        held = ECHO.send(broker, "held")
        # One proof after another: by the last, an unpaused consumer (woken by the send)
        # would long have run the held job.
        for n in range(3):
            proof = OTHER.send(broker, f"proof-{n}")
            await asyncio.to_thread(seen.wait, "completed", proof.job_id)
        assert calls == ["proof-0", "proof-1", "proof-2"]
        assert seen.kinds(held.job_id) == ["waiting"]
        capsys.readouterr()
        assert await cli("jobs", "queues") == 0
        rows = queues_table_rows(capsys.readouterr().out)
        assert (rows[QUEUE_EMAILS]["waiting"], rows[QUEUE_EMAILS]["paused"]) == ("1", "yes")
        assert rows[QUEUE_ANALYTICS]["paused"] == "no"
        assert await cli("jobs", "resume", QUEUE_EMAILS) == 0
        assert f"queue {QUEUE_EMAILS} running" in capsys.readouterr().out
        await asyncio.to_thread(seen.wait, "completed", held.job_id)
    assert calls[-1] == "held"
    assert not (await store.counts([QUEUE_EMAILS]))[0].paused


async def test_queues_shows_the_totals_so_sent_equals_ended_and_deleting_a_record_is_no_end(
        cli_env: Settings, broker: JobBroker, seen: Seen, store: JobStore,
        running: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    """One job removed before it ran, one run to its end and its record then deleted:
    two sent, two ended (the deletion of an ended job's record is not a second end)."""
    declare_actor(broker, ECHO, lambda tag: None)
    doomed = ECHO.send(broker, "doomed")
    assert await store.remove(doomed.job_id) == "removed"
    with running({QUEUE_EMAILS}):
        done = ECHO.send(broker, "done")
        await asyncio.to_thread(seen.wait, "completed", done.job_id)
    assert await store.remove(done.job_id) == "removed"
    capsys.readouterr()
    assert await cli("jobs", "queues") == 0
    emails = queues_table_rows(capsys.readouterr().out)[QUEUE_EMAILS]
    assert {k: emails[k] for k in ("waiting", "sent", "ended", "completed", "removed")} == {
        "waiting": "0", "sent": "2", "ended": "2", "completed": "1", "removed": "1"}


def test_the_queues_table_labels_totals_apart_from_the_jobs_kept() -> None:
    """370 e-mails sent, 100 completed ones kept (keep-last-N): the table says 370."""
    kept = QueueCounts(QUEUE_EMAILS, waiting=0, active=0, delayed=0, completed=100, failed=2,
                       dead=0, cancelled=0, paused=False,
                       totals={"enqueued": 370, "completed": 368, "failed": 2, "retried": 5})
    held = QueueCounts(QUEUE_ANALYTICS, waiting=3, active=1, delayed=2, completed=0, failed=0,
                       dead=0, cancelled=0, paused=True, totals={"enqueued": 6})
    text = queues_table([kept, held])
    rows = queues_table_rows(text)
    assert rows[QUEUE_EMAILS] == {
        "paused": "no", "waiting": "0", "active": "0", "delayed": "0", "sent": "370",
        "ended": "370", "completed": "368", "skipped": "0", "failed": "2", "dead": "0",
        "cancelled": "0", "removed": "0"}
    assert (rows[QUEUE_ANALYTICS]["paused"], rows[QUEUE_ANALYTICS]["sent"],
            rows[QUEUE_ANALYTICS]["ended"]) == ("yes", "6", "0")
    assert "100" not in text
    assert "sent = ended" in text
