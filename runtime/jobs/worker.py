"""A Dramatiq worker sized for the job broker."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import dramatiq

from runtime.jobs.broker import JobBroker

# How often an idle worker thread looks at Dramatiq's in-memory work queue (ms).
WORKER_THREAD_POLL_MS = 100


class _ResultsAreKept(logging.Filter):
    """Drops Dramatiq's "returned a value ... no Results middleware" warning: job records keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "haven't added the Results middleware" not in record.getMessage()


_RESULTS_FILTER = _ResultsAreKept()


def make_worker(broker: JobBroker, queues: Iterable[str] | None, threads: int) -> dramatiq.Worker:
    """A worker whose consumers prefetch no more than its threads.

    Dramatiq prefetches twice its threads; then a high-priority job sent
    while every thread is busy waits behind the prefetched ones. With a
    prefetch equal to the threads, it is fetched the moment a slot frees.
    The broker's process boot is emitted first (once): it starts the watchdog
    of Dramatiq's time limit, which enforces ``timeout_ms``.
    """
    broker.boot_process()
    worker = dramatiq.Worker(broker, queues=set(queues) if queues else None,
                             worker_threads=threads, worker_timeout=WORKER_THREAD_POLL_MS)
    worker.queue_prefetch = threads
    thread_log = logging.getLogger("dramatiq.worker.WorkerThread")
    if _RESULTS_FILTER not in thread_log.filters:
        thread_log.addFilter(_RESULTS_FILTER)
    return worker
