"""Messages the queue monitor accepts (importable by other concerns)."""

from __future__ import annotations

from runtime.broker import QUEUE_MAINTENANCE, JobSpec

#: Run one check of every queue now (a cron schedule may send it; args: none).
CHECK_QUEUES = JobSpec(QUEUE_MAINTENANCE, "monitor_check_queues")
