"""Every retry is counted: an actor's own Retry(delay=...) and the outage budget's reach."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dramatiq.errors import Retry

from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor
from runtime.errors import TransientJobError
from runtime.jobs.broker import JobBroker
from runtime.jobs.options import RetryPolicy
from runtime.jobs.retries import is_infrastructure_error, retry_delay_ms
from runtime.jobs.store import JobStore

from .conftest import Seen

ASKS_AGAIN = JobSpec(QUEUE_EMAILS, "jobs_test_asks_again")
OUTAGE_BUDGET = 25


async def test_an_actor_that_always_asks_for_a_retry_stops_after_its_attempts(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    runs: list[int] = []

    def asks_again() -> None:
        runs.append(1)
        raise Retry("not yet", delay=10)

    declare_actor(broker, ASKS_AGAIN, asks_again)
    sent = ASKS_AGAIN.send(broker, attempts=3)
    with running({QUEUE_EMAILS}, threads=1):
        await asyncio.to_thread(seen.wait, "failed", sent.job_id)
    assert len(runs) == 3
    job = await store.get(sent.job_id)
    assert job is not None and (job["state"], job["attempt"]) == ("failed", 3)
    assert [h["event"] for h in job["history"]].count("retrying") == 2


def _raised_while_handling_an_outage() -> ValueError:
    try:
        try:
            raise ConnectionError("database away")
        except ConnectionError:
            raise ValueError("a bug in the except block")  # the point: no "from"
    except ValueError as exc:
        return exc


def _raised_from_an_outage() -> TransientJobError:
    try:
        try:
            raise ConnectionError("database away")
        except ConnectionError as outage:
            raise TransientJobError("could not save") from outage
    except TransientJobError as exc:
        return exc


def test_an_error_raised_while_an_outage_was_handled_is_not_an_outage() -> None:
    """Only ``raise ... from`` an outage is one (``__cause__``), not ``__context__``."""
    policy = RetryPolicy(attempts=2)
    bug = _raised_while_handling_an_outage()
    assert isinstance(bug.__context__, ConnectionError) and bug.__cause__ is None
    assert not is_infrastructure_error(bug)
    assert retry_delay_ms(policy, OUTAGE_BUDGET, 1, bug) is None, "its own attempts, not 25"
    wrapped = _raised_from_an_outage()
    assert is_infrastructure_error(wrapped)
    assert retry_delay_ms(policy, OUTAGE_BUDGET, 1, wrapped) is not None
