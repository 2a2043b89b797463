"""A per-key rate limit (``Limit(rate=N, per_key=True)``): at most N starts a second per key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from runtime.broker import QUEUE_MAINTENANCE, JobSpec, declare_actor
from runtime.jobs.broker import JobBroker
from runtime.jobs.limits import Limit
from runtime.jobs.store import JobStore

from .conftest import Seen

pytestmark = pytest.mark.slow

RATED = JobSpec(QUEUE_MAINTENANCE, "jtm_rated")
# Starts a second per customer.
RATE = 2
WINDOW_MS = 1_000


def _started_ms(job: dict[str, Any]) -> int:
    """When the start script admitted the job, in Redis's clock: the clock the limit uses."""
    return round(datetime.fromisoformat(job["started_at"]).timestamp() * 1000)


def _busiest_window(starts_ms: list[int]) -> int:
    """The most starts inside any half-open window [t, t + WINDOW_MS)."""
    starts_ms = sorted(starts_ms)
    return max(sum(1 for s in starts_ms if first <= s < first + WINDOW_MS) for first in starts_ms)


async def test_a_per_key_rate_limit_spreads_one_keys_starts_and_holds_no_other_key_back(
        broker: JobBroker, seen: Seen, store: JobStore, running: Callable[..., Any]) -> None:
    ran: list[str] = []
    declare_actor(broker, RATED, ran.append,
                  limits=(Limit("partner-api", rate=RATE, per_s=WINDOW_MS / 1000, per_key=True),))
    busy = [RATED.send(broker, f"a-{n}", limit_key="customer:a") for n in range(3 * RATE)]
    other = [RATED.send(broker, f"b-{n}", limit_key="customer:b") for n in range(RATE)]
    # A slot for every job, so only the limit (not busy threads) can hold one back.
    with running({QUEUE_MAINTENANCE}, threads=len(busy) + len(other)):
        await asyncio.to_thread(seen.wait, "completed", None, len(busy) + len(other), 30)
    assert sorted(ran) == sorted([f"a-{n}" for n in range(3 * RATE)]
                                 + [f"b-{n}" for n in range(RATE)])
    starts = {}
    for sent in busy + other:
        found = await store.get(sent.job_id)
        assert found is not None and found["state"] == "completed"
        starts[sent.job_id] = _started_ms(found)
    busy_ms = [starts[s.job_id] for s in busy]
    other_ms = [starts[s.job_id] for s in other]
    assert _busiest_window(busy_ms) == RATE, sorted(busy_ms)
    assert _busiest_window(other_ms) <= RATE
    first_ms = min(busy_ms + other_ms)
    in_first_window = [s for s in busy_ms if s < first_ms + WINDOW_MS]
    assert len(in_first_window) == RATE, "customer a used its whole first second"
    assert all(s < first_ms + WINDOW_MS for s in other_ms), (
        "customer b's jobs waited behind customer a's limit")
