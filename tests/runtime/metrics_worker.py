"""A real Dramatiq worker process for the metrics tests (run with ``python -m``).

Settings come from the environment (this is a process edge). It declares a few
test actors, runs a worker with the metrics middleware until its stdin closes,
then stops cleanly. With ALERT_WEBHOOK_URL set, the ``critical`` actor's
failures page through the alerter.
"""

from __future__ import annotations

import sys

import dramatiq
import redis.asyncio as aioredis

from runtime.alerts import Alerter, job_failure_pager
from runtime.broker import QUEUE_EMAILS, QUEUE_INVENTORY, JobSpec, declare_actor, setup_broker
from runtime.errors import PermanentJobError, TransientJobError
from runtime.loop import LoopBridge
from runtime.metrics import get_metrics
from runtime.metrics_middleware import MetricsMiddleware
from runtime.settings import Settings

OK = JobSpec(QUEUE_INVENTORY, "obs_ok")
FLAKY = JobSpec(QUEUE_INVENTORY, "obs_always_fails")
PERMANENT = JobSpec(QUEUE_EMAILS, "obs_permanent")
CRITICAL = JobSpec(QUEUE_EMAILS, "obs_critical")


def ok(n: int) -> None:
    """Succeeds."""


def always_fails(n: int) -> None:
    """Fails every attempt with a retryable error."""
    raise TransientJobError(f"attempt for {n} failed")


def permanent(n: int) -> None:
    """Fails once, for good."""
    raise PermanentJobError(f"job {n} can never work")


def main() -> int:
    settings = Settings.from_env()
    bridge = LoopBridge().start()
    on_failed = None
    redis_client = None
    if settings.alert_webhook_url:
        redis_client = aioredis.Redis.from_url(settings.redis_url or "")
        alerter = Alerter(settings, redis_client, get_metrics(settings))
        on_failed = job_failure_pager(alerter, bridge)
    broker = setup_broker(settings, [MetricsMiddleware(settings, on_failed_for_good=on_failed)])
    declare_actor(broker, OK, ok)
    declare_actor(broker, FLAKY, always_fails)
    declare_actor(broker, PERMANENT, permanent)
    declare_actor(broker, CRITICAL, permanent, critical=True)
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    print("ready", flush=True)
    sys.stdin.read()
    worker.stop()
    broker.close()
    if on_failed is not None:
        on_failed.drain()  # pages are delivered on the loop: let the last ones finish
    if redis_client is not None:
        bridge.run(redis_client.aclose())
    bridge.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
