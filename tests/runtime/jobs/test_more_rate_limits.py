"""A per-key rate limit (``Limit(rate=N, per_key=True)``): at most N starts a second per key.

The limit counts starts on the clock the job script is given (its caller's, not
Redis's): the test gives it one that stands still until the test moves it. While
it stands, a window never ends, so exactly N jobs of the busy key start and no
more, however long the others wait, while the other key's jobs all start; each
move by more than a window lets exactly N more of the busy key start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from runtime.broker import QUEUE_MAINTENANCE, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker
from runtime.jobs.limits import Limit
from runtime.jobs.script import JobScript
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

from .conftest import Seen

pytestmark = pytest.mark.slow

RATED = JobSpec(QUEUE_MAINTENANCE, "jtm_rated")
# Starts a second per customer.
RATE = 2
WINDOW_MS = 1_000
# How far the test moves the clock each step: far more than a window, and far more than the
# real time a held-back job waits before it goes back to its queue (its due time is real).
STEP_S = 60.0


class StandingClock:
    """A clock that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def rated(settings: Settings) -> Iterator[tuple[JobBroker, Seen, StandingClock, list[str]]]:
    """A broker on a standing clock, with a rate-limited actor that notes its runs.

    The heartbeat timeout is far beyond the clock's moves, so no sweep ever judges the
    test's own worker dead on the moved clock.
    """
    broker = setup_broker(replace(settings, broker_heartbeat_timeout_ms=3_600_000,
                                  job_sweep_interval_s=1.0, job_limit_wait_ms=100))
    clock = StandingClock()
    broker.jobs = JobScript(broker.client, broker.keys, clock)
    seen = Seen()
    broker.hooks.subscribe(None, seen)
    ran: list[str] = []
    declare_actor(broker, RATED, ran.append,
                  limits=(Limit("partner-api", rate=RATE, per_s=WINDOW_MS / 1000, per_key=True),))
    yield broker, seen, clock, ran
    broker.close()


def _count(ran: list[str], key: str) -> int:
    return sum(1 for tag in ran if tag.startswith(key))


async def test_a_per_key_rate_limit_spreads_one_keys_starts_and_holds_no_other_key_back(
        rated: tuple[JobBroker, Seen, StandingClock, list[str]],
        running: Callable[..., Any]) -> None:
    broker, seen, clock, ran = rated
    busy = [RATED.send(broker, f"a-{n}", limit_key="customer:a") for n in range(3 * RATE)]
    other = [RATED.send(broker, f"b-{n}", limit_key="customer:b") for n in range(RATE)]
    # A slot for every job, so only the limit (not busy threads) can hold one back.
    worker = make_worker(broker, {QUEUE_MAINTENANCE}, len(busy) + len(other))
    worker.start()
    try:
        # The clock stands: one window for ever.
        await asyncio.to_thread(seen.wait, "completed", None, 2 * RATE, 30)
        assert (_count(ran, "a-"), _count(ran, "b-")) == (RATE, RATE), \
            "customer a used its whole window and no more; customer b was not held back"
        for step in (1, 2):
            clock.now_s += STEP_S
            await asyncio.to_thread(seen.wait, "completed", None, (2 + step) * RATE, 30)
            assert _count(ran, "a-") == (1 + step) * RATE, "exactly one window's worth more"
    finally:
        worker.stop()
    assert sorted(ran) == sorted([f"a-{n}" for n in range(3 * RATE)]
                                 + [f"b-{n}" for n in range(RATE)])
