"""A job held back by a limit goes back to its place, not behind a backlog sent meanwhile.

Played with the script calls a worker makes (fetch, start refused by a full
limit, finish as a requeue after the middleware's short delay), on a clock the
test moves past that delay: then the next fetch must take the held-back jobs
first, in their old order, ahead of the jobs queued behind them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.broker import QUEUE_EMAILS, JobSpec, setup_broker
from runtime.jobs.broker import JobBroker, Submitted
from runtime.jobs.middleware import MIN_REQUEUE_DELAY_MS
from runtime.jobs.script import JobScript
from runtime.settings import Settings

from .test_dedup import Clock

HELD = JobSpec(QUEUE_EMAILS, "jobs_test_held_back")
WORKER = "a-worker"
FULL = json.dumps([{"key": "jobs-test-full", "concurrency": 1, "lease_ms": 60_000}])


@pytest.fixture
def played(settings: Settings) -> Iterator[tuple[JobBroker, Clock]]:
    broker = setup_broker(settings)
    clock = Clock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    # Someone else holds the limit's only slot for the whole test.
    broker.client.zadd(broker.keys.limit("jobs-test-full"), {"the-holder": 2**50})
    yield broker, clock
    broker.close()


def _fetch(broker: JobBroker, count: int) -> list[str]:
    reply: list[Any] = broker.jobs("fetch", QUEUE_EMAILS, WORKER, count)
    return [str(rid) for rid in reply[1::2]]


def _hold_back(broker: JobBroker, sent: Submitted, rid: str) -> str:
    """Start ``sent`` (its message ``rid``) against the full limit and requeue it as the
    middleware does; returns the requeued message's id."""
    reply = broker.jobs("start", QUEUE_EMAILS, rid, sent.job_id, HELD.actor, WORKER, 1, FULL, "")
    assert reply[0] == "limited"
    new_rid = f"{rid}-again"
    body = json.dumps({**json.loads(sent.message.encode()),
                       "options": {**sent.message.options, "redis_message_id": new_rid}})
    eta_ms = int(time.time() * 1000) + MIN_REQUEUE_DELAY_MS
    assert broker.jobs("finish", QUEUE_EMAILS, rid, sent.job_id, HELD.actor, WORKER, "requeue",
                       json.dumps({"reason": "limited"}), 100, 0, "[]", new_rid, body, eta_ms,
                       int(sent.message.options.get("priority", 0))) == ["ok"]
    return new_rid


def _rid(sent: Submitted) -> str:
    return str(sent.message.options["redis_message_id"])


@pytest.mark.parametrize("priority", [0, 5, -5], ids=["plain", "high", "low"])
def test_jobs_held_back_by_a_limit_get_their_place_back_in_their_order(
        played: tuple[JobBroker, Clock], priority: int) -> None:
    broker, clock = played
    first, second = (HELD.send(broker, n, priority=priority) for n in ("first", "second"))
    assert _fetch(broker, 2) == [_rid(first), _rid(second)]
    backlog = [HELD.send(broker, n, priority=priority) for n in range(3)]
    requeued = [_hold_back(broker, first, _rid(first)), _hold_back(broker, second, _rid(second))]
    clock.offset_s = 2 * MIN_REQUEUE_DELAY_MS / 1000  # their short delay is over
    assert _fetch(broker, 5) == [*requeued, *[_rid(s) for s in backlog]]


def test_a_held_back_job_does_not_overtake_jobs_that_were_ahead_of_it(
        played: tuple[JobBroker, Clock]) -> None:
    """Its old place, not the very front: a high-priority job keeps its lead."""
    broker, clock = played
    held = HELD.send(broker, "held", priority=5)
    assert _fetch(broker, 1) == [_rid(held)]
    urgent = HELD.send(broker, "urgent", priority=9)
    later = HELD.send(broker, "later", priority=5)
    again = _hold_back(broker, held, _rid(held))
    clock.offset_s = 2 * MIN_REQUEUE_DELAY_MS / 1000
    assert _fetch(broker, 3) == [_rid(urgent), again, _rid(later)]
