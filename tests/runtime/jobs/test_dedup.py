"""De-duplication by job id follows its documented window, on real Redis with a real worker.

A second send with the same ``job_id`` is a no-op returning the existing job while
the first waits, runs, or completed less than ``dedup_s`` ago; after that it is a
new job. The script takes the time from its caller, so the test moves the clock
past the window instead of waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor
from runtime.jobs.broker import JobBroker
from runtime.jobs.script import JobScript

from .conftest import Seen

ONCE = JobSpec(QUEUE_EMAILS, "jobs_test_dedup")
WINDOW_S = 60


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


def with_clock(broker: JobBroker) -> Clock:
    clock = Clock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    return clock


def test_a_job_id_is_a_no_op_while_waiting_active_and_within_the_window_then_a_new_job(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    clock = with_clock(broker)
    entered, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def once(tag: str) -> None:
        runs.append(tag)
        entered.set()
        assert release.wait(20)

    declare_actor(broker, ONCE, once)
    first = ONCE.send(broker, "first", job_id="order-7", dedup_s=WINDOW_S)
    waiting = ONCE.send(broker, "while-waiting", job_id="order-7", dedup_s=WINDOW_S)
    assert (waiting.duplicate, waiting.state) == (True, "waiting")
    with running({QUEUE_EMAILS}, threads=1):
        assert entered.wait(20)
        active = ONCE.send(broker, "while-active", job_id="order-7", dedup_s=WINDOW_S)
        assert (active.duplicate, active.state) == (True, "active")
        release.set()
        seen.wait("completed", "order-7")
        clock.offset_s = WINDOW_S - 5
        within = ONCE.send(broker, "within", job_id="order-7", dedup_s=WINDOW_S)
        assert (within.duplicate, within.state) == (True, "completed")
        clock.offset_s = WINDOW_S + 5
        after = ONCE.send(broker, "after", job_id="order-7", dedup_s=WINDOW_S)
        assert (after.duplicate, after.state) == (False, "waiting")
        seen.wait("completed", "order-7", count=2)
    assert first.job_id == after.job_id == "order-7"
    assert runs == ["first", "after"]


def test_a_trimmed_job_blocks_within_its_window_and_its_leftover_key_not_after(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    clock = with_clock(broker)
    runs: list[str] = []
    declare_actor(broker, ONCE, runs.append)
    options = {"job_id": "order-8", "dedup_s": WINDOW_S, "keep_completed": 0}
    with running({QUEUE_EMAILS}, threads=1):
        ONCE.send(broker, "first", **options)
        seen.wait("completed", "order-8")
        assert not broker.client.exists(broker.keys.job("order-8")), "trimmed at once"
        assert broker.client.exists(broker.keys.dedup("order-8"))
        clock.offset_s = WINDOW_S - 5
        assert ONCE.send(broker, "within", **options).duplicate
        # Redis's own time to live has not run out (its clock is real time): the key is
        # still there, and must not block past the window it records.
        clock.offset_s = WINDOW_S + 5
        assert broker.client.exists(broker.keys.dedup("order-8"))
        again = ONCE.send(broker, "after", **options)
        assert (again.duplicate, again.state) == (False, "waiting")
        seen.wait("completed", "order-8", count=2)
    assert runs == ["first", "after"]
