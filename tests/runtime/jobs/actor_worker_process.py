"""A real worker process whose jobs run in pykka actors, as production concerns do.

``python -m tests.runtime.jobs.actor_worker_process`` runs
:func:`runtime.worker.run_worker` (settings from the environment, a root
supervisor, thin Dramatiq actors asking supervised children) with one
concern: a thread :class:`ServiceActor` and an :class:`AsyncServiceActor`
running the same handler. The handler, on the process's loop inside the
actor, reports progress through ``current_job()`` and then waits for a
cancel request; it notes what it saw in the Redis list of
:mod:`tests.runtime.jobs.worker_process`. One more thin actor runs in the
worker thread itself: its first run ignores the worker's graceful stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker

from runtime.broker import QUEUE_ANALYTICS, JobSpec, declare_actor
from runtime.errors import JobCancelled
from runtime.jobs.context import current_job
from runtime.process import ProcessContext
from runtime.service_actor import start_async_service_actor, start_service_actor
from runtime.settings import Settings
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern, run_worker

from .worker_process import log_key

IN_THREAD_ACTOR = JobSpec(QUEUE_ANALYTICS, "jta_in_thread_actor")
IN_ASYNC_ACTOR = JobSpec(QUEUE_ANALYTICS, "jta_in_async_actor")
# Its first run never ends and ignores the worker's stop; every later run ends at once.
IGNORES_STOP = JobSpec(QUEUE_ANALYTICS, "jta_ignores_stop")
# The progress the handler reports before it waits for its cancel request.
PROGRESS = {"step": 1, "of": 2}
# The handler gives up waiting for a cancel request after this long (the test fails then).
WAIT_FOR_CANCEL_S = 20.0


def concerns(ctx: ProcessContext) -> Sequence[Concern]:
    """The one test concern: two actors, one of each kind, behind two thin actors."""
    client = redis.Redis.from_url(ctx.settings.redis_url or "")
    key = log_key(ctx.settings.namespace)

    def note(tag: str, event: str) -> None:
        client.rpush(key, json.dumps({"tag": tag, "event": event, "t": time.time(),
                                      "pid": os.getpid()}))

    async def handle(tag: str) -> Any:
        job = current_job()
        if job is None:
            note(tag, "no-job")
            return None
        note(tag, f"deadline:{job.time_left_s() is not None}")
        await job.progress_async(PROGRESS)
        deadline = time.monotonic() + WAIT_FOR_CANCEL_S
        try:
            while time.monotonic() < deadline:
                await job.check_cancelled_async()
                await asyncio.sleep(0.02)
        except JobCancelled:
            note(tag, "cleaned")
            raise
        note(tag, "never-cancelled")
        return None

    children = [
        ChildSpec("jta-thread", lambda: start_service_actor(ctx, "jta-thread", handle)),
        ChildSpec("jta-async", lambda: start_async_service_actor(ctx, "jta-async", handle)),
    ]

    def ignores_stop(tag: str) -> None:
        if client.incr(f"{key}:runs:{tag}") == 1:
            note(tag, "start")
            while True:  # a job that ignores the stop: the worker must give up on it
                time.sleep(0.05)
        note(tag, "end")

    def declare(broker: RedisBroker, ask: Asker) -> None:
        declare_actor(broker, IN_THREAD_ACTOR, lambda tag: ask("jta-thread", tag))
        declare_actor(broker, IN_ASYNC_ACTOR, lambda tag: ask("jta-async", tag))
        declare_actor(broker, IGNORES_STOP, ignores_stop)

    return [Concern("jta", children, declare, (QUEUE_ANALYTICS,))]


def main() -> int:
    return run_worker(Settings.from_env(), "jta-worker", concerns, threads=2)


if __name__ == "__main__":
    raise SystemExit(main())
