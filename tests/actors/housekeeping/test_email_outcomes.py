"""SendGrid sends left in doubt are settled by the housekeeping schedule, and a confirmation
that never reached SendGrid is sent again, exactly once.

Real PostgreSQL and Redis, the real job broker and workers, the official SDK
against the fake SendGrid v3 server (tests/actors/sendgrid/fake_sendgrid.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from actors.emailer import actor as emailer
from actors.emailer.emails import send_order_confirmation
from actors.emailer.messages import SEND_ORDER_CONFIRMATION
from actors.emailer.sendgrid_transport import SendGridTransport, make_sendgrid_transport
from actors.housekeeping import actor as housekeeping
from actors.housekeeping.email_outcomes import EmailOutcomes, reconcile_email_outcomes
from actors.housekeeping.schedules import shop_schedules
from ops.simulators.faults import serve
from runtime.broker import QUEUE_EMAILS, QUEUE_MAINTENANCE, setup_broker
from runtime.errors import ExternalServiceError, OutcomeUnknown
from runtime.process import ProcessContext
from runtime.scheduling import Scheduler, SchedulerStore, connect_redis
from runtime.settings import Settings
from runtime.worker import build_root
from tests.actors.sendgrid.fake_sendgrid import API_KEY, FakeSendGrid, create_fake_sendgrid
from tests.factories import make_order, make_shop

SCHEDULE = "email-outcomes"


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, FakeSendGrid]]:
    app, state = create_fake_sendgrid()
    async with serve(app) as url:
        yield url, state


def _with_sendgrid(settings: Settings, url: str) -> Settings:
    return replace(settings, sendgrid_api_key=API_KEY, sendgrid_host=url, sendgrid_timeout_s=0.5)


def _transport(settings: Settings, pool: asyncpg.Pool) -> SendGridTransport:
    transport = make_sendgrid_transport(settings, pool)
    assert transport is not None
    return transport


async def _orders(pool: asyncpg.Pool, count: int) -> list[int]:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 50})
        return [await make_order(conn, 1, {1: 1}) for _ in range(count)]


async def _confirmations_in_doubt(pool: asyncpg.Pool, transport: SendGridTransport,
                                  order_ids: list[int]) -> None:
    """Each order's confirmation job tried once, got no answer, and failed for good."""
    zone = Settings().zone
    for order_id in order_ids:
        with pytest.raises(OutcomeUnknown):
            await send_order_confirmation(pool, transport, order_id, zone)
    # The jobs ran out of retries long ago: the grace period is over for every row.
    await pool.execute("UPDATE email_provider_sends SET last_sent_at = now() - interval '1 hour'")


def _sent(fake: FakeSendGrid, order_id: int) -> int:
    return len(fake.sent_with_key(f"order-confirmation:{order_id}"))


class Finished(Middleware):
    """Probe: counts successful runs per actor."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self._changed = threading.Condition()

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy,
                              *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if exception is None:
            with self._changed:
                self.runs[message.actor_name] = self.runs.get(message.actor_name, 0) + 1
                self._changed.notify_all()

    def wait(self, actor: str, runs: int, timeout_s: float = 30) -> bool:
        """Block (a thread) until ``actor`` has run ``runs`` times."""
        with self._changed:
            return self._changed.wait_for(lambda: self.runs.get(actor, 0) >= runs, timeout_s)


@dataclass
class Worker:
    """A worker with the housekeeping and emailer concerns (queues maintenance and emails)."""

    ctx: ProcessContext
    root: Any
    worker: dramatiq.Worker
    probe: Finished

    @classmethod
    def start(cls, settings: Settings) -> Worker:
        ctx = ProcessContext.start(settings, pool_size=3)
        probe = Finished()
        ctx.broker.add_middleware(probe)
        concerns = [housekeeping.concern(ctx), emailer.concern(ctx)]
        root = build_root("worker", concerns).start()
        for concern in concerns:
            concern.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 30))
        worker = dramatiq.Worker(ctx.broker, queues={QUEUE_MAINTENANCE, QUEUE_EMAILS},
                                 worker_threads=2, worker_timeout=100)
        worker.start()
        return cls(ctx, root, worker, probe)

    def run_schedule(self, slot: datetime) -> None:
        """Send the built-in schedule's message for ``slot``, as the scheduler does."""
        [schedule] = [s for s in shop_schedules(self.ctx.settings) if s.name == SCHEDULE]
        self.ctx.broker.enqueue(Scheduler._message(schedule, slot))

    def stop(self) -> None:
        self.worker.stop()
        self.root.stop()
        self.ctx.stop()


async def _last_result(settings: Settings) -> dict[str, Any]:
    redis = connect_redis(settings.redis_url or "")
    try:
        state = await SchedulerStore(redis, settings.namespace).state(SCHEDULE)
    finally:
        await redis.aclose()
    assert state.last_status == "succeeded"
    result: dict[str, Any] = json.loads(state.last_result or "{}")
    return result


async def test_the_schedule_settles_in_doubt_sends_and_resends_only_what_never_arrived(
        settings: Settings, pool: asyncpg.Pool, fake: tuple[str, FakeSendGrid]) -> None:
    url, state = fake
    settings = _with_sendgrid(settings, url)
    accepted_then_timeout, never_arrived = await _orders(pool, 2)
    state.script = ["accept_hang", "hang"]
    await _confirmations_in_doubt(pool, _transport(settings, pool),
                                  [accepted_then_timeout, never_arrived])
    assert (_sent(state, accepted_then_timeout), _sent(state, never_arrived)) == (1, 0)

    now = datetime.now(UTC)
    worker = await asyncio.to_thread(Worker.start, settings)
    try:
        worker.run_schedule(now)
        assert await asyncio.to_thread(worker.probe.wait, "reconcile_email_outcomes", 1)
        assert await asyncio.to_thread(worker.probe.wait, SEND_ORDER_CONFIRMATION.actor, 1)
        first = await _last_result(settings)
        worker.run_schedule(now + timedelta(minutes=5))  # the next run: nothing left to do
        assert await asyncio.to_thread(worker.probe.wait, "reconcile_email_outcomes", 2)
        second = await _last_result(settings)
    finally:
        await asyncio.to_thread(worker.stop)

    assert first == {"accepted": 1, "not_sent": 1, "unresolved": 0, "logs_settled": 1,
                     "resent": 1, "already_queued": 0}
    assert second == {"accepted": 0, "not_sent": 0, "unresolved": 0, "logs_settled": 0,
                      "resent": 0, "already_queued": 0}
    assert _sent(state, accepted_then_timeout) == 1, "found in the activity feed: not re-sent"
    assert _sent(state, never_arrived) == 1, "never arrived: sent exactly once"
    assert worker.probe.runs[SEND_ORDER_CONFIRMATION.actor] == 1
    logs = {r["order_id"]: (r["status"], r["provider_id"]) for r in await pool.fetch(
        "SELECT order_id, status, provider_id FROM email_log")}
    ledger = {r["idempotency_key"]: r["state"] for r in await pool.fetch(
        "SELECT idempotency_key, state FROM email_provider_sends")}
    assert {o: s for o, (s, _) in logs.items()} == {accepted_then_timeout: "sent",
                                                  never_arrived: "sent"}
    assert logs[accepted_then_timeout][1] == f"{state.accepted[0].msg_id}.filter0001"
    assert set(ledger.values()) == {"accepted"}


async def test_a_confirmation_is_queued_again_once_and_not_while_its_job_still_tries(
        settings: Settings, pool: asyncpg.Pool, fake: tuple[str, FakeSendGrid]) -> None:
    url, state = fake
    settings = _with_sendgrid(settings, url)
    transport = _transport(settings, pool)
    lost, retrying = await _orders(pool, 2)
    state.script = ["hang"]
    await _confirmations_in_doubt(pool, transport, [lost])
    state.script = [503]  # refused just now: its job is still retrying, leave it to the job
    with pytest.raises(ExternalServiceError):
        await send_order_confirmation(pool, transport, retrying, settings.zone)

    broker = setup_broker(settings)
    try:
        resend = housekeeping.confirmation_resender(broker)
        runs = [await reconcile_email_outcomes(pool, transport, resend,
                                               settings.sendgrid_reconcile_grace_s)
                for _ in range(2)]
        assert runs == [EmailOutcomes(not_sent=1, resent=1),
                        EmailOutcomes(already_queued=1)], "one job, whatever the runs"
        again = SEND_ORDER_CONFIRMATION.send(broker, lost, job_id=f"confirm-{lost}-resend")
        assert again.duplicate, "the re-send waits in the queue under its job id"
    finally:
        broker.close()
    assert state.accepted == [], "the sweep itself sends no e-mail"


def test_the_schedule_runs_every_configured_interval() -> None:
    settings = Settings.from_env({"SHOPFLOW_EMAIL_RECONCILE_EVERY_S": "120"})
    [schedule] = [s for s in shop_schedules(settings) if s.name == SCHEDULE]
    assert schedule.job.actor == "reconcile_email_outcomes"
    assert getattr(schedule.trigger, "every_s", None) == 120
