"""The reporter actor behind the thin ``analytics`` Dramatiq actors of the daily report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.reports.messages import BUILD_DAILY_SALES_REPORT, SEND_DAILY_REPORT_TO_TEAM
from actors.reports.sales import build_daily_sales_report, send_daily_report
from runtime.broker import QUEUE_ANALYTICS, declare_actor
from runtime.process import ProcessContext
from runtime.scheduling.middleware import (
    ensure_scheduled_run_middleware,
    record_run_result,
    scheduled_for,
)
from runtime.service_actor import ServiceActor, start_service_actor
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern

BUILD, SEND = "build", "send"


def concern(ctx: ProcessContext) -> Concern:
    """The reports concern of the flow worker (queue ``analytics``).

    Both jobs use their *slot* as "now" (see :func:`scheduled_for`): the 08:00
    run reports on the day before its slot even if it starts after midnight.
    """
    zone_name = ctx.settings.timezone

    async def handle(message: tuple[str, datetime]) -> Any:
        """Runs on the process loop, called from the reporter actor's thread."""
        kind, now = message
        if kind == BUILD:
            report = await build_daily_sales_report(ctx.pool, now, zone_name)
            return {"report_date": report.report_date.isoformat(),
                    "orders": report.orders_count, "revenue_cents": report.revenue_cents}
        if kind == SEND:
            return {"handed_off": await send_daily_report(ctx.pool, now, zone_name)}
        raise ValueError(f"reporter does not know job {kind!r}")

    def start() -> pykka.ActorRef[ServiceActor]:
        return start_service_actor(ctx, "reporter", handle)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        redis_url, _ = ctx.settings.require_urls()
        ensure_scheduled_run_middleware(broker, redis_url, ctx.settings.namespace)

        def build_daily_sales_report_job() -> None:
            """Thin Dramatiq actor: compute and store yesterday's sales report."""
            now = scheduled_for(datetime.now(UTC))
            record_run_result(ask("reporter", (BUILD, now)))

        def send_daily_report_to_team() -> None:
            """Thin Dramatiq actor: hand yesterday's report to the emailer (once)."""
            now = scheduled_for(datetime.now(UTC))
            record_run_result(ask("reporter", (SEND, now)))

        declare_actor(broker, BUILD_DAILY_SALES_REPORT, build_daily_sales_report_job)
        declare_actor(broker, SEND_DAILY_REPORT_TO_TEAM, send_daily_report_to_team)

    return Concern("reporter", [ChildSpec("reporter", start)], declare, (QUEUE_ANALYTICS,))
