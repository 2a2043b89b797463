"""What the reports concern accepts: its scheduled jobs."""

from __future__ import annotations

from runtime.broker import QUEUE_ANALYTICS, JobSpec

# build_daily_sales_report(): compute and store yesterday's (local) sales report.
BUILD_DAILY_SALES_REPORT = JobSpec(QUEUE_ANALYTICS, "build_daily_sales_report")
# send_daily_report_to_team(): hand yesterday's report to the emailer, once.
SEND_DAILY_REPORT_TO_TEAM = JobSpec(QUEUE_ANALYTICS, "send_daily_report_to_team")
