"""A process that holds live gauges and counts, for the multiprocess tests.

Usage: ``python -m tests.runtime.metrics_gauge_process DEPTH [JOBS]``: sets the
emailer's mailbox depth to DEPTH, counts one actor restart, sets a cron
heartbeat, records JOBS synthetic job outcomes (as the middleware would), prints
``ready`` and waits until stdin closes.
"""

from __future__ import annotations

import sys

from runtime.broker import ALL_QUEUES
from runtime.metrics import OUTCOME_COMPLETED, OUTCOME_FAILED, get_metrics
from runtime.settings import Settings

ACTORS_PER_QUEUE = 3


def record_jobs(settings: Settings, jobs: int) -> None:
    """Write what ``jobs`` finished jobs spread over every queue leave in the metrics."""
    m = get_metrics(settings)
    for i in range(jobs):
        queue = ALL_QUEUES[i % len(ALL_QUEUES)]
        actor = f"{queue}_actor_{i % ACTORS_PER_QUEUE}"
        m.jobs_in_progress.labels(queue, actor).inc()
        m.job_duration.labels(queue, actor).observe((i % 100) / 1000)
        m.jobs_in_progress.labels(queue, actor).dec()
        failed = i % 50 == 0
        m.jobs.labels(queue, actor, OUTCOME_FAILED if failed else OUTCOME_COMPLETED).inc()
        if failed:
            m.job_retries.labels(queue, actor).inc()
            m.job_dead_letters.labels(queue, actor).inc()


def main() -> int:
    settings = Settings.from_env()
    m = get_metrics(settings)
    m.mailbox_depth.labels("emailer").set(float(sys.argv[1]))
    m.actor_restarts.labels("emailer").inc()
    m.cron_last_success.labels("cleanup_carts").set(1_700_000_000)
    record_jobs(settings, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print("ready", flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
