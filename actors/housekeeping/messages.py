"""What the housekeeping concern accepts: its scheduled jobs (no arguments; the
scheduler sends them and the worker middleware records each run)."""

from __future__ import annotations

from runtime.broker import QUEUE_MAINTENANCE, JobSpec

# clean_expired_carts(): delete anonymous carts idle past SHOPFLOW_CART_MAX_AGE_S.
CLEAN_EXPIRED_CARTS = JobSpec(QUEUE_MAINTENANCE, "clean_expired_carts")
# release_expired_reservations(): give expired stock reservations back, atomically.
RELEASE_EXPIRED_RESERVATIONS = JobSpec(QUEUE_MAINTENANCE, "release_expired_reservations")
# cron_heartbeat(): refresh <namespace>:cron:heartbeat (read by /health).
CRON_HEARTBEAT = JobSpec(QUEUE_MAINTENANCE, "cron_heartbeat")
# reconcile_email_outcomes(): settle SendGrid sends in doubt; re-send confirmations never sent.
RECONCILE_EMAIL_OUTCOMES = JobSpec(QUEUE_MAINTENANCE, "reconcile_email_outcomes")
