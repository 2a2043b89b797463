"""shopflow_alerts_total and shopflow_alert_deliveries_total after known alert traffic.

Real Redis, a real webhook receiver, the process's real metrics read back by a scrape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from runtime.alerts import Alert, Alerter, Severity
from runtime.metrics import get_metrics, prepare_metrics_dir
from runtime.settings import Settings
from tests.runtime.metrics_helpers import scrape, total, value
from tests.runtime.webhook_receiver import Receiver, webhook_receiver

ALERTS = "shopflow_alerts_total"
DELIVERIES = "shopflow_alert_deliveries_total"
BACKLOG = Alert("QueueBacklog", Severity.WARNING, "1,234 jobs wait in emails",
                labels={"queue": "emails"})
NO_CONSUMER = Alert("QueueNoConsumer", Severity.CRITICAL, "nobody consumes inventory",
                    labels={"queue": "inventory"})


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    yield client
    await client.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as r:
        yield r


async def test_notifications_and_deliveries_are_counted_once_each(
        settings: Settings, redis_client: aioredis.Redis, receiver: Receiver) -> None:
    """Repeats page nothing and count nothing; a refused delivery is counted as failed."""
    prepare_metrics_dir(settings)
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    alerter = Alerter(settings, redis_client, get_metrics(settings))
    assert await alerter.fire(BACKLOG) is True
    assert await alerter.fire(BACKLOG) is False  # the same incident: no second page
    assert await alerter.resolve(BACKLOG) is True
    assert await alerter.resolve(BACKLOG) is False
    receiver.status = 503
    assert await alerter.fire(NO_CONSUMER) is False  # notified, but the webhook refused it
    await receiver.wait_for(2)

    samples = scrape(settings)
    for status in ("firing", "resolved"):
        assert value(samples, ALERTS, alertname="QueueBacklog", severity="warning",
                     status=status) == 1
    assert value(samples, ALERTS, alertname="QueueNoConsumer", severity="critical",
                 status="firing") == 1
    assert total(samples, ALERTS) == 3
    assert value(samples, DELIVERIES, outcome="delivered") == 2
    assert value(samples, DELIVERIES, outcome="failed") == 1


async def test_without_a_webhook_alerts_are_counted_but_no_delivery(
        settings: Settings, redis_client: aioredis.Redis) -> None:
    prepare_metrics_dir(settings)
    alerter = Alerter(settings, redis_client, get_metrics(settings))
    assert await alerter.fire(BACKLOG) is True
    samples = scrape(settings)
    assert value(samples, ALERTS, alertname="QueueBacklog", severity="warning",
                 status="firing") == 1
    assert total(samples, DELIVERIES) == 0
