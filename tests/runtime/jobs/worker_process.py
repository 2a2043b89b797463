"""A real worker process for the job tests (``python -m tests.runtime.jobs.worker_process``).

Settings come from the environment (a process edge); ``--threads`` sizes the
worker. Its actors write what they do to the Redis list ``{namespace}:test:log``
as JSON lines ``{"tag", "event", "t", "pid"}``, so the test reads one record
of every process. It runs until SIGTERM, then stops cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

import redis

from runtime.broker import QUEUE_ANALYTICS, QUEUE_MAINTENANCE, JobSpec, declare_actor, setup_broker
from runtime.errors import JobCancelled
from runtime.jobs.context import current_job
from runtime.jobs.limits import Limit
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

RECORD = JobSpec(QUEUE_ANALYTICS, "jt_record")
BLOCK_FIRST = JobSpec(QUEUE_ANALYTICS, "jt_block_first")
POISON = JobSpec(QUEUE_ANALYTICS, "jt_poison")
LIMITED = JobSpec(QUEUE_MAINTENANCE, "jt_limited")
KEYED = JobSpec(QUEUE_MAINTENANCE, "jt_keyed")
CANCELLABLE = JobSpec(QUEUE_ANALYTICS, "jt_cancellable")
QUEUES = {QUEUE_ANALYTICS, QUEUE_MAINTENANCE}
# Concurrency of jt_limited across every worker process.
LIMITED_CONCURRENCY = 2


def log_key(namespace: str) -> str:
    return f"{namespace}:test:log"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url or "")
    key = log_key(settings.namespace)

    def note(tag: str, event: str) -> None:
        client.rpush(key, json.dumps({"tag": tag, "event": event, "t": time.time(),
                                      "pid": os.getpid()}))

    running = threading.Semaphore(0)  # released once per job running here (not the pill)

    def record(tag: str, sleep_s: float = 0.0) -> None:
        note(tag, "start")
        running.release()
        try:
            time.sleep(sleep_s)
        finally:
            running.acquire()
        note(tag, "end")

    def block_first(tag: str) -> None:
        note(tag, "start")
        if client.incr(f"{key}:runs:{tag}") == 1:
            time.sleep(120)  # the first run is killed with its worker
        note(tag, "end")

    def poison(tag: str) -> None:
        note(tag, "start")
        # With room for company, die in company if any comes within a second (a pill on a
        # busy worker), else alone.
        if args.threads > 1 and running.acquire(timeout=1.0):
            running.release()
        os._exit(3)  # takes the whole worker down, every time

    def cancellable(tag: str) -> None:
        job = current_job()
        assert job is not None
        note(tag, "start")
        try:
            for _ in range(6000):
                job.check_cancelled()
                time.sleep(0.01)
        except JobCancelled:
            note(tag, "cleaned")
            raise

    broker = setup_broker(settings)
    declare_actor(broker, RECORD, record)
    declare_actor(broker, BLOCK_FIRST, block_first)
    declare_actor(broker, POISON, poison)
    declare_actor(broker, LIMITED, record, concurrency=LIMITED_CONCURRENCY)
    declare_actor(broker, KEYED, record, limits=(Limit("customer", concurrency=1, per_key=True),))
    declare_actor(broker, CANCELLABLE, cancellable)
    worker = make_worker(broker, QUEUES, args.threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker.start()
    print("ready", flush=True)  # booted: actors registered, keeper running
    stop.wait()
    worker.stop(timeout=10_000)
    broker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
