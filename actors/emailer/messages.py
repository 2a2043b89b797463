"""What the emailer accepts."""

from __future__ import annotations

from runtime.broker import QUEUE_EMAILS, JobSpec

# send_order_confirmation(order_id): the one confirmation e-mail of a paid order.
SEND_ORDER_CONFIRMATION = JobSpec(QUEUE_EMAILS, "send_order_confirmation")
# send_daily_report(report_date_iso): the daily sales report to the team.
SEND_DAILY_REPORT = JobSpec(QUEUE_EMAILS, "send_daily_report")
