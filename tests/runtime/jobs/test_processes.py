"""The job model across real worker processes: SIGKILL, poison pills, limits, cancellation."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from runtime.broker import setup_broker
from runtime.jobs.store import JobStore
from runtime.settings import Settings
from tests.support import wait_until

from . import worker_process as wp
from .procs import Log, Workers, job, state_is

pytestmark = pytest.mark.slow


def test_a_job_whose_worker_is_killed_runs_again_and_completes_once(
        fast: Settings, workers: Workers) -> None:
    log = Log(fast)
    first = workers.start()
    sent = wp.BLOCK_FIRST.send(setup_broker(fast), "k1")
    wait_until(lambda: log.count("k1", "start") == 1, 20, "the job to start")
    first.kill()
    first.wait(10)
    workers.start()
    wait_until(state_is(fast, sent.job_id, "completed"), 30, "the job to run again and complete")
    assert (log.count("k1", "start"), log.count("k1", "end")) == (2, 1)
    found = job(fast, sent.job_id)
    assert found is not None and found["deaths"] == 1
    assert "stalled" in [h["event"] for h in found["history"]]


def test_a_poison_pill_is_quarantined_while_other_jobs_keep_flowing(
        fast: Settings, workers: Workers) -> None:
    log = Log(fast)
    broker = setup_broker(fast)
    pill = wp.POISON.send(broker, "pill")
    others = [wp.RECORD.send(broker, f"ok-{n}") for n in range(10)]
    quarantined = state_is(fast, pill.job_id, "dead")
    for _restart in range(8):
        # Play supervisord: start a worker; the pill may kill it, then start another.
        current = workers.start(wait_ready=False)
        wait_until(lambda p=current: p.poll() is not None or quarantined(), 30,  # type: ignore[misc]
                   "the pill to kill the worker or be quarantined")
        if quarantined():
            break
    found = job(fast, pill.job_id)
    assert found is not None and found["state"] == "dead", found
    assert found["deaths"] == 3
    assert "poison pill" in found["reason"]
    assert log.count("pill", "start") == 3
    wait_until(lambda: all(state_is(fast, s.job_id, "completed")() for s in others), 30,
               "every other job to complete")
    assert log.count(event="end") == 10

    async def empty() -> int:
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(fast.redis_url or "")
        try:
            store = JobStore(client, broker.keys, list(wp.QUEUES))
            [before] = await store.counts(["analytics"])
            assert before.dead == 1
            emptied = await store.empty_dead("analytics")
            [after] = await store.counts(["analytics"])
            # The pill ended once, as dead; deleting its record is not a second end.
            assert (after.dead, after.totals) == (0, before.totals)
            return emptied
        finally:
            await client.aclose()

    assert asyncio.run(empty()) == 1
    assert job(fast, pill.job_id) is None


def test_a_poison_pill_next_to_other_jobs_is_quarantined_and_its_bystanders_complete(
        fast: Settings, workers: Workers) -> None:
    """Two threads: the pill kills its worker while another job runs beside it. A death in
    company costs nobody an attempt or a death; after two, each job concerned runs alone,
    so the pill dies alone three times and is quarantined, and no bystander is charged."""
    log = Log(fast)
    broker = setup_broker(fast)
    # Deaths in company use no attempt: three attempts are all the pill needs to die alone
    # three times (each of those uses one), and the bystanders need one each.
    retry = {"attempts": 3, "backoff": "fixed", "backoff_ms": 200}
    pill = wp.POISON.send(broker, "pill", **retry)
    # Sent right after the pill: the first worker takes the pill and ok-0 at once.
    others = [wp.RECORD.send(broker, f"ok-{n}", 0.5, **retry) for n in range(8)]
    quarantined = state_is(fast, pill.job_id, "dead")
    failed = state_is(fast, pill.job_id, "failed")
    for _restart in range(50):
        current = workers.start(threads=2, wait_ready=False)
        wait_until(lambda p=current: p.poll() is not None or quarantined() or failed(),  # type: ignore[misc]
                   60, "the pill to kill the worker or be quarantined")
        if quarantined() or failed():
            break
    found = job(fast, pill.job_id)
    assert found is not None and found["state"] == "dead", found
    assert found["deaths"] == 3 and "poison pill" in found["reason"]
    wait_until(lambda: all(state_is(fast, s.job_id, "completed")() for s in others), 60,
               "every other job to complete")
    bystanders = [job(fast, s.job_id) for s in others]
    assert all(b is not None and (b["deaths"], b["attempt"]) == (0, 1) for b in bystanders), \
        bystanders
    assert any(b is not None and b.get("shared_deaths", 0) >= 1 for b in bystanders), \
        "a job died next to the pill (ok-0 on the first worker)"
    assert found.get("shared_deaths", 0) >= 1 and found["attempt"] == 3
    pill_end_s = datetime.fromisoformat(found["finished_at"]).timestamp()
    ends = [e["t"] for e in log.entries(event="end") if e["tag"].startswith("ok-")]
    assert len(ends) >= 8
    assert min(ends) < pill_end_s, "other jobs completed while the pill was still looping"


def test_a_slow_job_in_a_live_worker_is_not_run_twice(fast: Settings, workers: Workers) -> None:
    log = Log(fast)
    workers.start(threads=2)
    workers.start(threads=2)  # a second worker whose keeper sweeps, looking for stalls
    sent = wp.RECORD.send(setup_broker(fast), "slow", 4.0)  # over twice the heartbeat timeout
    wait_until(state_is(fast, sent.job_id, "completed"), 30, "the slow job to complete")
    assert (log.count("slow", "start"), log.count("slow", "end")) == (1, 1)
    found = job(fast, sent.job_id)
    assert found is not None and found["deaths"] == 0


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans],
                   key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def _spans(log: Log, prefix: str) -> dict[str, tuple[float, float]]:
    starts = {e["tag"]: e["t"] for e in log.entries(event="start") if e["tag"].startswith(prefix)}
    ends = {e["tag"]: e["t"] for e in log.entries(event="end") if e["tag"].startswith(prefix)}
    return {tag: (starts[tag], ends[tag]) for tag in ends}


def test_a_concurrency_limit_holds_across_worker_processes(
        fast: Settings, workers: Workers) -> None:
    log = Log(fast)
    broker = setup_broker(fast)
    workers.start(threads=3)
    workers.start(threads=3)
    sent = [wp.LIMITED.send(broker, f"lim-{n}", 0.2) for n in range(12)]
    wait_until(lambda: all(state_is(fast, s.job_id, "completed")() for s in sent), 60,
               "every limited job to complete")
    spans = _spans(log, "lim-")
    assert len(spans) == 12
    assert _max_overlap(list(spans.values())) == wp.LIMITED_CONCURRENCY
    assert len({e["pid"] for e in log.entries(event="start")}) == 2, "both workers ran jobs"


def test_a_per_key_limit_holds_per_key_and_lets_other_keys_run(
        fast: Settings, workers: Workers) -> None:
    log = Log(fast)
    broker = setup_broker(fast)
    workers.start(threads=3)
    workers.start(threads=3)
    sent = [wp.KEYED.send(broker, f"key-{customer}-{n}", 0.2, limit_key=f"customer:{customer}")
            for n in range(4) for customer in ("a", "b")]
    wait_until(lambda: all(state_is(fast, s.job_id, "completed")() for s in sent), 60,
               "every keyed job to complete")
    spans = _spans(log, "key-")
    for customer in ("a", "b"):
        mine = [span for tag, span in spans.items() if tag.startswith(f"key-{customer}-")]
        assert len(mine) == 4
        assert _max_overlap(mine) == 1, f"customer {customer} ran two jobs at once"
    assert _max_overlap(list(spans.values())) == 2, "different keys ran side by side"


def test_a_running_job_is_cancelled_from_another_process(
        fast: Settings, workers: Workers) -> None:
    import redis.asyncio as aioredis

    log = Log(fast)
    broker = setup_broker(fast)
    workers.start()
    sent = wp.CANCELLABLE.send(broker, "c1")
    wait_until(lambda: log.count("c1", "start") == 1, 20, "the job to start")

    async def cancel() -> str:
        client = aioredis.Redis.from_url(fast.redis_url or "")
        try:
            return await JobStore(client, broker.keys, list(wp.QUEUES)).cancel(sent.job_id)
        finally:
            await client.aclose()

    assert asyncio.run(cancel()) == "requested"
    wait_until(state_is(fast, sent.job_id, "cancelled"), 20, "the job to stop")
    assert log.count("c1", "cleaned") == 1
