"""The shop's schedules: what the original system ran from cron, as :class:`Schedule` values.

| name | when | job |
| --- | --- | --- |
| daily-sales-report | 08:00 shop zone | compute and store yesterday's sales report |
| daily-report | 09:00 shop zone | e-mail yesterday's report to the team (once) |
| expired-carts | every hour | delete anonymous carts idle for 24 h |
| expired-reservations | every 15 min | release expired stock reservations |
| cron-heartbeat | every 5 min | refresh the heartbeat key /health reads |
| email-outcomes | every 5 min | settle SendGrid sends in doubt; re-send confirmations that never arrived |
| idle-carts | every hour | schedule reminders for known customers' idle carts nobody announced |
| recommendations-refresh | every 6 h | refresh cached recommendations of recently active customers |

The reports catch up once after an outage (misfire ``run_once``): a missed
08:00 still produces yesterday's report. Housekeeping does too: one run
clears everything that expired meanwhile. No job overlaps itself (``skip``).
"""

from __future__ import annotations

from actors.agents.messages import REFRESH_RECOMMENDATIONS
from actors.carts.messages import SWEEP_IDLE_CARTS
from actors.housekeeping.messages import (
    CLEAN_EXPIRED_CARTS,
    CRON_HEARTBEAT,
    RECONCILE_EMAIL_OUTCOMES,
    RELEASE_EXPIRED_RESERVATIONS,
)
from actors.reports.messages import BUILD_DAILY_SALES_REPORT, SEND_DAILY_REPORT_TO_TEAM
from runtime.broker import JobSpec
from runtime.scheduling import CronTrigger, IntervalTrigger, MisfirePolicy, OverlapPolicy, Schedule
from runtime.settings import Settings

# The safety-net sweep for idle carts (reminders are normally scheduled on each change).
IDLE_CART_SWEEP_EVERY_S = 3600
# Cached recommendations are refreshed four times a day.
RECOMMENDATIONS_REFRESH_EVERY_S = 6 * 3600


def shop_schedules(settings: Settings) -> list[Schedule]:
    """The built-in schedules, with zone, times and intervals from ``settings``."""

    def schedule(name: str, trigger: CronTrigger | IntervalTrigger, job: JobSpec) -> Schedule:
        return Schedule(name, trigger, job, misfire=MisfirePolicy.RUN_ONCE,
                        overlap=OverlapPolicy.SKIP,
                        misfire_grace_s=settings.scheduler_misfire_grace_s)

    zone = settings.timezone
    return [
        schedule("daily-sales-report", CronTrigger.parse(settings.sales_report_cron, zone),
                 BUILD_DAILY_SALES_REPORT),
        schedule("daily-report", CronTrigger.parse(settings.daily_report_cron, zone),
                 SEND_DAILY_REPORT_TO_TEAM),
        schedule("expired-carts", IntervalTrigger(settings.cart_cleanup_every_s),
                 CLEAN_EXPIRED_CARTS),
        schedule("expired-reservations", IntervalTrigger(settings.reservation_release_every_s),
                 RELEASE_EXPIRED_RESERVATIONS),
        schedule("cron-heartbeat", IntervalTrigger(settings.cron_heartbeat_every_s),
                 CRON_HEARTBEAT),
        schedule("email-outcomes", IntervalTrigger(settings.email_reconcile_every_s),
                 RECONCILE_EMAIL_OUTCOMES),
        schedule("idle-carts", IntervalTrigger(IDLE_CART_SWEEP_EVERY_S), SWEEP_IDLE_CARTS),
        schedule("recommendations-refresh", IntervalTrigger(RECOMMENDATIONS_REFRESH_EVERY_S),
                 REFRESH_RECOMMENDATIONS),
    ]


def builtin_names(settings: Settings) -> frozenset[str]:
    """Names a repeatable job may not take."""
    return frozenset(s.name for s in shop_schedules(settings))
