"""A one-queue worker process for the test_more_* job tests.

``python -m tests.runtime.jobs.more_worker_process --threads N`` consumes the
analytics queue only. With one thread and one queue its single consumer does
not fetch while the job runs, so nothing but the keeper writes the worker's
heartbeat: that is what the slow-job test needs (worker_process.py consumes two
queues, and the idle one's fetches beat too). Its actors note what they do in
the same Redis list as worker_process.py, so :class:`procs.Log` reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import redis

from runtime.broker import QUEUE_ANALYTICS, JobSpec, declare_actor, setup_broker
from runtime.jobs.context import current_job
from runtime.jobs.worker import make_worker
from runtime.settings import Settings

from .procs import ROOT, Workers
from .worker_process import log_key

SLOW = JobSpec(QUEUE_ANALYTICS, "jtm_slow")
# Runs without looking at cancellation until its worker is killed, then checks once.
UNHEEDING = JobSpec(QUEUE_ANALYTICS, "jtm_unheeding")
# Kills its worker on its first run only (a crash that a retry after a fix survives).
DIE_FIRST = JobSpec(QUEUE_ANALYTICS, "jtm_die_first")
QUEUE = QUEUE_ANALYTICS
# Long enough that a first run only ends with its worker.
BLOCK_S = 120


@dataclass
class OneQueueWorkers(Workers):
    """:class:`procs.Workers` starting this module's one-queue worker instead."""

    def start(self, threads: int = 1, wait_ready: bool = True) -> subprocess.Popen[bytes]:
        """Start a worker; wait until it has booted unless ``wait_ready`` is False."""
        env = {**os.environ, **self.settings.to_env()}
        self.settings.var_dir.mkdir(parents=True, exist_ok=True)
        log = self.settings.var_dir / f"more-worker-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.runtime.jobs.more_worker_process", "--threads",
             str(threads)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=log.open("ab"), start_new_session=True)
        assert proc.stdout is not None
        if wait_ready:
            assert proc.stdout.readline().strip() == b"ready", f"worker did not start: see {log}"
        self.procs.append(proc)
        return proc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url or "")
    key = log_key(settings.namespace)

    def note(tag: str, event: str) -> None:
        client.rpush(key, json.dumps({"tag": tag, "event": event, "t": time.time(),
                                      "pid": os.getpid()}))

    def first_run(tag: str) -> bool:
        return int(client.incr(f"{key}:runs:{tag}")) == 1

    def slow(tag: str, sleep_s: float) -> None:
        note(tag, "start")
        time.sleep(sleep_s)  # no Redis call at all while it runs
        note(tag, "end")

    def unheeding(tag: str) -> None:
        job = current_job()
        assert job is not None
        note(tag, "start")
        if first_run(tag):
            time.sleep(BLOCK_S)  # killed with its worker before it looks
        job.check_cancelled()
        note(tag, "end")

    def die_first(tag: str) -> str:
        note(tag, "start")
        if first_run(tag):
            os._exit(3)
        note(tag, "end")
        return f"{tag} done"

    broker = setup_broker(settings)
    declare_actor(broker, SLOW, slow)
    declare_actor(broker, UNHEEDING, unheeding)
    declare_actor(broker, DIE_FIRST, die_first)
    worker = make_worker(broker, {QUEUE}, args.threads)
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
