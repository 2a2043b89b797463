"""One-call wiring of observability into a runtime process.

Worker processes call :func:`install_job_metrics` on their context before
declaring actors; the api serves :func:`metrics_handler` at ``/metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from runtime.alerts import Alerter, job_failure_pager, order_id_from_args
from runtime.jobs.broker import JobBroker
from runtime.jobs.hooks import JobEvent
from runtime.metrics import OUTCOME_FAILED, Metrics, get_metrics, render_metrics
from runtime.metrics_middleware import UNKNOWN_LABEL, MetricsMiddleware
from runtime.process import ProcessContext
from runtime.settings import Settings


def install_job_metrics(ctx: ProcessContext) -> MetricsMiddleware:
    """Add the metrics middleware to the process's broker, paging for ``critical`` actors.

    Call it before declaring actors: the middleware owns the ``critical``
    actor option, and Dramatiq rejects options no middleware owns. A page is
    delivered on the process loop, never on the consumer thread that saw the
    failure; it names the job's order when the actor takes an ``order_id``.
    Pages still in flight when the process stops are waited for
    (``ProcessContext.on_stop``).
    """
    metrics = get_metrics(ctx.settings)
    alerter = Alerter(ctx.settings, ctx.redis, metrics)
    pager = job_failure_pager(alerter, ctx.bridge, order_id_from_args(ctx.broker))
    ctx.on_stop(pager.aclose)
    middleware = MetricsMiddleware(ctx.settings, on_failed_for_good=pager)
    ctx.broker.add_middleware(middleware)
    count_sweeps(ctx.broker, metrics)
    return middleware


def count_sweeps(broker: JobBroker, metrics: Metrics) -> None:
    """Count what this process's job keeper finds: stalled jobs and quarantined poison pills."""
    def labels(event: JobEvent) -> tuple[str, str]:
        queue = event.queue if event.queue in broker.get_declared_queues() else UNKNOWN_LABEL
        return queue, event.actor if event.actor in broker.actors else UNKNOWN_LABEL

    def ended(event: JobEvent) -> None:
        # Only the keeper's events carry an outcome: a job that ended in the sweep ends
        # here, once; a failure a worker recorded was counted by the metrics middleware.
        if event.detail.get("outcome") in ("failed", "dead"):
            metrics.jobs.labels(*labels(event), OUTCOME_FAILED).inc()
            metrics.job_dead_letters.labels(*labels(event)).inc()

    broker.hooks.subscribe("stalled", lambda e: metrics.job_stalls.labels(labels(e)[0]).inc())
    broker.hooks.subscribe("failed", ended)
    broker.hooks.subscribe("dead", ended)


def metrics_handler(settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving every process's metrics, summed (for ``GET /metrics``)."""

    async def metrics(request: web.Request) -> web.Response:
        # Reading every process's files is blocking file I/O: keep it off the loop.
        body, content_type = await asyncio.to_thread(render_metrics, settings)
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics
