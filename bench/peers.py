"""The job systems under comparison, one :class:`~bench.harness.Peer` subclass each.

Every peer runs :func:`bench.body.noop` in ONE worker process with
:data:`~bench.harness.SLOTS` concurrent slots, with the library's defaults
otherwise (the ``setup`` text of each class says exactly what was chosen).
Imports of peer libraries happen inside the methods, so a missing optional
library only skips its row.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, cast

from bench.body import noop, noop_async
from bench.harness import AsyncProducer, BenchEnv, Peer, Producer, SyncProducer

ACTOR_NAME = "bench_noop"
# setup_broker() only checks that a database URL is present; the broker never connects to it.
UNUSED_DATABASE_URL = "postgresql://unused@127.0.0.1:1/unused"


def _wait_for_sigterm() -> None:
    """Block the main thread until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


# --- raw Dramatiq: the baseline every ratio is against ---------------------------------------


class _DramatiqProducer(SyncProducer):
    def __init__(self, broker: Any, send: Callable[[float], Any]) -> None:
        self._broker = broker
        self._send = send

    def send(self, enqueued_at: float) -> None:
        self._send(enqueued_at)

    def close(self) -> None:
        self._broker.close()


class RawDramatiq(Peer):
    """Dramatiq's RedisBroker with its default middleware and a plain ``dramatiq.Worker``."""

    key = "dramatiq"
    name = "raw Dramatiq"
    setup = ("RedisBroker (default middleware), dramatiq.Worker(worker_threads=8), "
             "default worker_timeout 1000 ms (idle poll back-off cap)")
    distributions = ("dramatiq",)

    def _broker(self, env: BenchEnv) -> Any:
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=env.redis_url, namespace="bench-dramatiq")  # type: ignore[no-untyped-call]
        actor = dramatiq.Actor(noop, broker=broker, actor_name=ACTOR_NAME, queue_name=env.queue,
                               priority=0, options={})
        return broker, actor

    def run_worker(self, env: BenchEnv) -> None:
        import dramatiq

        broker, _ = self._broker(env)
        worker = dramatiq.Worker(broker, worker_threads=env.slots)
        worker.start()
        _wait_for_sigterm()
        worker.stop()
        broker.close()

    def open_producer(self, env: BenchEnv) -> Producer:
        broker, actor = self._broker(env)
        return _DramatiqProducer(broker, actor.send)


# --- this runtime ------------------------------------------------------------------------------


# The "every feature on" peer: a queue bound far above any backlog the bench builds
# (checked on every send, never reached), limits that never bind (taken and released
# on every job), a job id, a priority and a limit key on every message.
ALL_ON_MAX_LENGTH = 1_000_000
ALL_ON_KEYS = 16


def _runtime_settings(env: BenchEnv, metrics_dir: Path | None = None, *,
                      max_length: int = 0) -> Any:
    from runtime.settings import Settings

    return Settings(redis_url=env.redis_url, database_url=UNUSED_DATABASE_URL, namespace="bench-rt",
                    metrics_dir=metrics_dir, queue_max_length=max_length)


def _all_on_limits(slots: int) -> dict[str, Any]:
    """Actor options of the all-on peer: a cross-process concurrency limit and a per-key one."""
    from runtime.jobs.limits import Limit

    return {"concurrency": slots, "limits": (Limit("bench-key", concurrency=slots, per_key=True),)}


class _RuntimeProducer(SyncProducer):
    """What an api process does: ``JobSpec.send`` on ``setup_broker``'s JobBroker (one script call)."""

    def __init__(self, env: BenchEnv, all_on: bool = False) -> None:
        from runtime.broker import JobSpec, setup_broker

        self._broker = setup_broker(_runtime_settings(env, max_length=ALL_ON_MAX_LENGTH if all_on else 0))
        self._spec = JobSpec(env.queue, ACTOR_NAME)
        self._all_on = all_on
        self._sent = 0

    def send(self, enqueued_at: float) -> None:
        if not self._all_on:
            self._spec.send(self._broker, enqueued_at)
            return
        self._sent += 1
        n = self._sent
        self._spec.send(self._broker, enqueued_at, job_id=f"bench-{os.getpid()}-{n}",
                        priority=n % 2, limit_key=f"k{n % ALL_ON_KEYS}")

    def close(self) -> None:
        self._broker.close()


class _NoDatabase:
    """Stands in for the asyncpg pool of a ProcessContext: the no-op job never touches PostgreSQL."""

    async def close(self) -> None:
        """Nothing was opened."""


class RuntimeJobs(Peer):
    """The job layer as every production worker runs it (``runtime.worker.run_worker``).

    ``setup_broker`` (JobBroker, JobsMiddleware instead of Retries), then on a
    ProcessContext of its own (loop bridge, async Redis; no PostgreSQL pool,
    see :class:`_NoDatabase`) exactly the calls ``run_worker`` makes:
    ``install_job_metrics`` (MetricsMiddleware with the on-call pager, sweep
    counters), ``install_scheduled_runs`` (with its cron metrics), the actor, then
    ``make_worker(threads=8)`` (prefetch = threads, consumers blocking on the
    wake-up list) with its keeper thread, stopped as ``run_worker`` stops it.
    """

    key = "runtime"
    name = "runtime (jobs layer, as deployed)"
    setup = ("runtime.broker.setup_broker (JobBroker; AgeLimit, TimeLimit, ShutdownNotifications, "
             "Callbacks, Pipelines, JobsMiddleware, CurrentMessage) + runtime.observability."
             "install_job_metrics (MetricsMiddleware, pager, sweep counters) + "
             "install_scheduled_runs, declare_actor, runtime.jobs.worker.make_worker("
             "threads=8): prefetch 8, consumer blocks on the queue's wake-up list (idle timeout "
             "1000 ms), job keeper thread every 5 s; Prometheus multiprocess files in a temp dir")
    distributions: ClassVar[tuple[str, ...]] = ("dramatiq", "redis", "prometheus-client")

    all_on = False

    def _body(self, env: BenchEnv, ctx: Any) -> tuple[Callable[..., Any], Callable[[], None]]:
        """The actor's function, and what stops whatever it needs (nothing for a plain body)."""
        return noop, lambda: None

    def run_worker(self, env: BenchEnv) -> None:
        import redis.asyncio as aioredis

        from runtime.broker import JobSpec, declare_actor, setup_broker
        from runtime.jobs.worker import make_worker
        from runtime.loop import LoopBridge
        from runtime.observability import install_job_metrics
        from runtime.process import ProcessContext
        from runtime.worker import install_scheduled_runs

        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as metrics_dir:
            settings = _runtime_settings(env, Path(metrics_dir),
                                         max_length=ALL_ON_MAX_LENGTH if self.all_on else 0)
            bridge = LoopBridge().start()
            client = bridge.run(_open_async_redis(aioredis, env.redis_url))
            ctx = ProcessContext(settings, bridge, cast(Any, _NoDatabase()), client,
                                 setup_broker(settings))
            install_job_metrics(ctx)
            install_scheduled_runs(ctx.broker, settings)  # as every production worker
            body, stop_body = self._body(env, ctx)
            declare_actor(ctx.broker, JobSpec(env.queue, ACTOR_NAME), body,
                          **(_all_on_limits(env.slots) if self.all_on else {}))
            worker = make_worker(ctx.broker, {env.queue}, env.slots)
            worker.start()
            _wait_for_sigterm()
            worker.stop(timeout=int(settings.worker_stop_s * 1000))
            stop_body()
            ctx.stop()

    def open_producer(self, env: BenchEnv) -> Producer:
        return _RuntimeProducer(env, all_on=self.all_on)


class RuntimeJobsAllOn(RuntimeJobs):
    """As :class:`RuntimeJobs`, with every job feature of issue 3 switched on for every job.

    Sends carry a ``job_id`` (the de-duplication check), a priority (0 and 1
    alternating: both priority sets) and a ``limit_key``; the queue is bounded
    (the length check on every send); the actor has a cross-process
    concurrency limit and a per-key limit, taken and released on every job.
    The bounds are set so that they never bind: this measures what the
    features cost, not a throttle.
    """

    key = "runtime-all"
    name = "runtime (jobs layer, every feature on)"
    setup = (RuntimeJobs.setup + f"; every send with job_id, priority 0/1 and one of "
             f"{ALL_ON_KEYS} limit keys, queue bounded at {ALL_ON_MAX_LENGTH:,}, actor concurrency=8 "
             "and a per-key concurrency limit of 8")
    all_on = True


async def _open_async_redis(aioredis: Any, url: str) -> Any:
    """The process's async Redis client, opened on the bridge's loop as ProcessContext.start does."""
    return aioredis.Redis.from_url(url)


class RuntimeJobsActorHop(RuntimeJobs):
    """As :class:`RuntimeJobs`, plus the hop every concern makes (runtime/worker.py ``ActorPool``).

    The thin Dramatiq actor asks one of 8 supervised pykka ``ServiceActor``s
    (round robin), which runs the async body on the process's ``LoopBridge``
    loop: the path a real job takes.
    """

    key = "runtime-actors"
    name = "runtime (jobs layer + pykka actor hop)"
    setup = (RuntimeJobs.setup + "; thin actor -> Supervisor.ask -> 1 of 8 ServiceActor "
             "(pykka thread, ActorPool round robin) -> LoopBridge.run(async body)")
    distributions = ("dramatiq", "redis", "prometheus-client", "pykka")

    def _body(self, env: BenchEnv, ctx: Any) -> tuple[Callable[..., Any], Callable[[], None]]:
        from runtime.service_actor import ServiceActor
        from runtime.worker import ActorPool, Concern, build_root

        timeout_s = ctx.settings.actor_ask_timeout_s
        pool = ActorPool("bench", env.slots,
                         lambda: ServiceActor.start("bench", noop_async, ctx.bridge, timeout_s))
        root = build_root("bench", [Concern("bench", pool.children, lambda broker, ask: None)],
                          ctx.settings)
        root.start()

        def bench_noop(enqueued_at: float) -> None:
            root.ask(pool.next_id(), enqueued_at, timeout_s)

        return bench_noop, root.stop


# --- Celery --------------------------------------------------------------------------------------


def _celery_app(env: BenchEnv) -> tuple[Any, Any]:
    from celery import Celery

    app = Celery("bench", broker=env.redis_url, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_default_queue=env.queue,
                    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    task = app.task(name="bench.noop")(noop)
    return app, task


class _CeleryProducer(SyncProducer):
    def __init__(self, env: BenchEnv) -> None:
        self._app, self._task = _celery_app(env)

    def send(self, enqueued_at: float) -> None:
        self._task.delay(enqueued_at)

    def close(self) -> None:
        self._app.close()


class CeleryPeer(Peer):
    key = "celery"
    name = "Celery"
    setup = ("redis broker, no result backend, worker --pool=threads --concurrency=8 "
             "--without-gossip --without-mingle --without-heartbeat (default prefetch multiplier 4)")
    distributions = ("celery", "kombu")

    def run_worker(self, env: BenchEnv) -> None:
        app, _ = _celery_app(env)
        app.worker_main(["worker", "--pool=threads", f"--concurrency={env.slots}", "-Q", env.queue,
                         "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                         "--without-heartbeat"])

    def open_producer(self, env: BenchEnv) -> Producer:
        return _CeleryProducer(env)


# --- RQ ------------------------------------------------------------------------------------------


class _RQProducer(SyncProducer):
    def __init__(self, env: BenchEnv) -> None:
        from redis import Redis
        from rq import Queue

        self._redis = Redis.from_url(env.redis_url)
        self._queue = Queue(env.queue, connection=self._redis)

    def send(self, enqueued_at: float) -> None:
        self._queue.enqueue(noop, enqueued_at)

    def close(self) -> None:
        self._redis.close()  # type: ignore[no-untyped-call]


class RQPeer(Peer):
    key = "rq"
    name = "RQ"
    setup = ("RQ has no threaded worker: rq.worker_pool.WorkerPool(num_workers=8, "
             "worker_class=SimpleWorker), i.e. 8 worker PROCESSES that run jobs in-process "
             "(the default Worker forks a child per job); default result_ttl (results kept)")
    distributions = ("rq",)

    def run_worker(self, env: BenchEnv) -> None:
        from redis import Redis
        from rq.worker import SimpleWorker
        from rq.worker_pool import WorkerPool

        pool = WorkerPool([env.queue], connection=Redis.from_url(env.redis_url),
                          num_workers=env.slots, worker_class=SimpleWorker)
        pool.start(logging_level="WARNING")

    def open_producer(self, env: BenchEnv) -> Producer:
        return _RQProducer(env)


# --- arq -----------------------------------------------------------------------------------------


async def _arq_noop(ctx: dict[str, Any], enqueued_at: float) -> None:
    await noop_async(enqueued_at)


class _ArqProducer(AsyncProducer):
    def __init__(self, env: BenchEnv) -> None:
        self._env = env
        super().__init__()

    async def aopen(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self._pool = await create_pool(RedisSettings.from_dsn(self._env.redis_url))

    async def asend(self, enqueued_at: float) -> None:
        await self._pool.enqueue_job("noop", enqueued_at, _queue_name=self._env.queue)

    async def aclose(self) -> None:
        await self._pool.aclose()


class ArqPeer(Peer):
    key = "arq"
    name = "arq"
    setup = "Worker(max_jobs=8), defaults otherwise: poll_delay 0.5 s, results kept 1 h"
    distributions = ("arq",)

    def run_worker(self, env: BenchEnv) -> None:
        from arq.connections import RedisSettings
        from arq.worker import Worker, func

        asyncio.set_event_loop(asyncio.new_event_loop())
        worker = Worker(functions=[func(_arq_noop, name="noop")],
                        redis_settings=RedisSettings.from_dsn(env.redis_url),
                        queue_name=env.queue, max_jobs=env.slots)
        worker.run()

    def open_producer(self, env: BenchEnv) -> Producer:
        return _ArqProducer(env)


# --- BullMQ (Python client) --------------------------------------------------------------------


async def _bullmq_process(job: Any, token: str) -> None:
    await noop_async(job.data["enqueued_at"])


class _BullMQProducer(AsyncProducer):
    def __init__(self, env: BenchEnv) -> None:
        self._env = env
        super().__init__()

    async def aopen(self) -> None:
        from bullmq import Queue

        self._queue = Queue(self._env.queue, {"connection": self._env.redis_url})

    async def asend(self, enqueued_at: float) -> None:
        await self._queue.add("noop", {"enqueued_at": enqueued_at})

    async def aclose(self) -> None:
        await self._queue.close()


class BullMQPeer(Peer):
    key = "bullmq"
    name = "BullMQ (Python)"
    setup = "Worker(concurrency=8), defaults otherwise (completed jobs kept)"
    distributions = ("bullmq",)

    def unavailable(self) -> str | None:
        try:
            import bullmq  # noqa: F401
        except ImportError as exc:
            return f"bullmq is not installed ({exc}); pip install -e '.[bench]'"
        return None

    def run_worker(self, env: BenchEnv) -> None:
        asyncio.run(self._main(env))

    async def _main(self, env: BenchEnv) -> None:
        from bullmq import Worker

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(env.queue, _bullmq_process,
                        {"connection": env.redis_url, "concurrency": env.slots})
        await stop.wait()
        await worker.close()

    def open_producer(self, env: BenchEnv) -> Producer:
        return _BullMQProducer(env)


# Every peer of the comparison, in table order; raw Dramatiq first (the baseline of the ratios).
PEERS: tuple[Peer, ...] = (
    RawDramatiq(),
    RuntimeJobs(),
    RuntimeJobsAllOn(),
    RuntimeJobsActorHop(),
    CeleryPeer(),
    RQPeer(),
    ArqPeer(),
    BullMQPeer(),
)
BASELINE_KEY = RawDramatiq.key


def peer_by_key(key: str) -> Peer:
    """The peer named ``key`` on the command line."""
    for peer in PEERS:
        if peer.key == key:
            return peer
    raise KeyError(f"unknown peer {key!r}; known: {', '.join(p.key for p in PEERS)}")
