"""One-call wiring of observability into a runtime process.

Worker processes call :func:`install_job_metrics` on their context before
declaring actors; the api serves :func:`metrics_handler` at ``/metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from runtime.alerts import Alerter, job_failure_pager, order_id_from_args
from runtime.metrics import get_metrics, render_metrics
from runtime.metrics_middleware import MetricsMiddleware
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
    alerter = Alerter(ctx.settings, ctx.redis, get_metrics(ctx.settings))
    pager = job_failure_pager(alerter, ctx.bridge, order_id_from_args(ctx.broker))
    ctx.on_stop(pager.aclose)
    middleware = MetricsMiddleware(ctx.settings, on_failed_for_good=pager)
    ctx.broker.add_middleware(middleware)
    return middleware


def metrics_handler(settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving every process's metrics, summed (for ``GET /metrics``)."""

    async def metrics(request: web.Request) -> web.Response:
        # Reading every process's files is blocking file I/O: keep it off the loop.
        body, content_type = await asyncio.to_thread(render_metrics, settings)
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics
