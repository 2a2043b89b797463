"""An order confirmation that SendGrid refuses for good pages on-call once, with high severity.

The real e-mail worker's insides (ProcessContext with the job metrics and pager
installed, the emailer concern, a Dramatiq worker), the official SendGrid SDK
pointed at the local v3 server, real Redis and PostgreSQL, and the real
webhook receiver of the alert tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import dramatiq
import pytest

from actors.emailer import actor as emailer
from actors.emailer.messages import SEND_ORDER_CONFIRMATION
from ops.simulators.faults import serve
from runtime.broker import QUEUE_EMAILS
from runtime.metrics import prepare_metrics_dir
from runtime.observability import install_job_metrics
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import build_root
from tests.actors.sendgrid.fake_sendgrid import API_KEY, FakeSendGrid, create_fake_sendgrid
from tests.factories import make_order, make_shop
from tests.runtime.metrics_helpers import scrape, value, wait_until
from tests.runtime.webhook_receiver import Receiver, webhook_receiver

JOBS = "shopflow_jobs_total"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as r:
        yield r


@pytest.fixture
async def sendgrid() -> AsyncIterator[tuple[str, FakeSendGrid]]:
    app, state = create_fake_sendgrid()
    async with serve(app) as url:
        yield url, state


def _confirmations(settings: Settings, outcome: str) -> float:
    return value(scrape(settings), JOBS, queue=QUEUE_EMAILS, actor=SEND_ORDER_CONFIRMATION.actor,
                 outcome=outcome) or 0.0


async def test_a_confirmation_refused_for_good_pages_once_with_critical_severity(
        settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
        sendgrid: tuple[str, FakeSendGrid]) -> None:
    """SendGrid answers 503 (retried), then a permanent 400: one page, naming the order."""
    url, fake = sendgrid
    fake.script = [503, 400]
    settings = replace(settings, sendgrid_api_key=API_KEY, sendgrid_host=url,
                       alert_webhook_url=receiver.url, job_attempts=3, job_backoff_ms=50)
    prepare_metrics_dir(settings)
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        order_id = await make_order(conn, 1, {1: 1})
    ctx = await asyncio.to_thread(ProcessContext.start, settings, 3)
    install_job_metrics(ctx)  # the critical option and its pager, as in the e-mail worker
    concern = emailer.concern(ctx)
    root = build_root("email-worker", [concern]).start()
    concern.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 30))
    worker = dramatiq.Worker(ctx.broker, queues={QUEUE_EMAILS}, worker_threads=2,
                             worker_timeout=50)
    worker.start()
    try:
        SEND_ORDER_CONFIRMATION.send(ctx.broker, order_id)
        [body] = await receiver.wait_for(1, timeout_s=30)
        # The same confirmation again (a re-published outbox row): recorded as failed, no page.
        SEND_ORDER_CONFIRMATION.send(ctx.broker, order_id)
        await asyncio.to_thread(wait_until, lambda: _confirmations(settings, "completed") == 1,
                                30, "the duplicate to end")
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(root.stop)
        await asyncio.to_thread(ctx.stop)  # waits for pages still in flight
    assert len(receiver.bodies) == 1, "one page for the order, not one per attempt or copy"
    alert = body["alerts"][0]
    assert alert["status"] == "firing"
    assert alert["labels"]["alertname"] == "JobFailedForGood"
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["actor"] == SEND_ORDER_CONFIRMATION.actor
    assert f"(order {order_id})" in alert["annotations"]["summary"]
    assert _confirmations(settings, "failed") == 1
    assert len(fake.requests) == 2 and fake.accepted == []
    row = await pool.fetchrow("SELECT status, error FROM email_log WHERE order_id = $1", order_id)
    assert row["status"] == "failed" and "400" in row["error"]
