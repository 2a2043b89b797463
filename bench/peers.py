"""The job systems under comparison, one :class:`~bench.harness.Peer` subclass each.

Every peer runs :func:`bench.body.noop` in ONE worker process with
:data:`~bench.harness.SLOTS` concurrent slots, with the library's defaults
otherwise (the ``setup`` text of each class says exactly what was chosen).
Imports of peer libraries happen inside the methods, so a missing optional
library only skips its row.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
from collections.abc import Callable
from typing import Any, ClassVar

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
# >>> SLOT FOR THIS RUNTIME'S ADAPTERS. When runtime/jobs/ (branch `jobs`) is on main, add a
# >>> Peer subclass here (key "runtime-jobs") whose run_worker starts the jobs worker the way
# >>> `runtime.jobs.worker.run` does with `noop` declared as an actor on env.queue, and whose
# >>> open_producer sends with `runtime.jobs.producer.send`; then add it to PEERS below.
# >>> Nothing else in the harness changes.


def _runtime_settings(env: BenchEnv) -> Any:
    from runtime.settings import Settings

    return Settings(redis_url=env.redis_url, database_url=UNUSED_DATABASE_URL, namespace="bench-rt")


class _RuntimeProducer(SyncProducer):
    def __init__(self, env: BenchEnv) -> None:
        from runtime.broker import JobSpec, setup_broker

        self._broker = setup_broker(_runtime_settings(env))
        self._spec = JobSpec(env.queue, ACTOR_NAME)

    def send(self, enqueued_at: float) -> None:
        self._spec.send(self._broker, enqueued_at)

    def close(self) -> None:
        self._broker.close()


class RuntimeFoundation(Peer):
    """The runtime on main: setup_broker's middleware, the worker's poll cap, the body in the actor."""

    key = "runtime"
    name = "runtime (foundation middleware)"
    setup = ("runtime.broker.setup_broker (AgeLimit, TimeLimit, ShutdownNotifications, Callbacks, "
             "Pipelines, Retries, CurrentMessage), declare_actor, dramatiq.Worker(worker_threads=8, "
             "worker_timeout=runtime.worker.IDLE_POLL_MS=100)")
    distributions: ClassVar[tuple[str, ...]] = ("dramatiq",)

    def run_worker(self, env: BenchEnv) -> None:
        import dramatiq

        from runtime.broker import JobSpec, declare_actor, setup_broker
        from runtime.worker import IDLE_POLL_MS

        broker = setup_broker(_runtime_settings(env))
        declare_actor(broker, JobSpec(env.queue, ACTOR_NAME), noop)
        worker = dramatiq.Worker(broker, queues={env.queue}, worker_threads=env.slots,
                                 worker_timeout=IDLE_POLL_MS)
        worker.start()
        _wait_for_sigterm()
        worker.stop()
        broker.close()

    def open_producer(self, env: BenchEnv) -> Producer:
        return _RuntimeProducer(env)


class RuntimeActorHop(RuntimeFoundation):
    """As :class:`RuntimeFoundation`, plus the hop every concern on main makes.

    The thin Dramatiq actor asks one of 8 supervised pykka ``ServiceActor``s
    (round robin, as actors/inventory/actor.py does), which runs the async body
    on the process's ``LoopBridge`` loop: the path a real job takes on main.
    """

    key = "runtime-actors"
    name = "runtime (foundation + pykka actor hop)"
    setup = (RuntimeFoundation.setup + "; thin actor -> Supervisor.ask -> 1 of 8 ServiceActor "
             "(pykka thread) -> LoopBridge.run(async body)")
    distributions = ("dramatiq", "pykka")

    def run_worker(self, env: BenchEnv) -> None:
        import dramatiq

        from runtime.broker import JobSpec, declare_actor, setup_broker
        from runtime.loop import LoopBridge
        from runtime.service_actor import ServiceActor
        from runtime.supervision import ChildSpec, Supervisor
        from runtime.worker import IDLE_POLL_MS

        settings = _runtime_settings(env)
        bridge = LoopBridge().start()
        timeout_s = settings.actor_ask_timeout_s
        children = [
            ChildSpec(f"bench-{i}", lambda: ServiceActor.start("bench", noop_async, bridge, timeout_s))
            for i in range(env.slots)
        ]
        root = Supervisor("bench-root", children).start()
        broker = setup_broker(settings)
        turn = itertools.count()
        lock = threading.Lock()

        def bench_noop(enqueued_at: float) -> None:
            with lock:
                slot = next(turn) % env.slots
            root.ask(f"bench-{slot}", enqueued_at, timeout_s)

        declare_actor(broker, JobSpec(env.queue, ACTOR_NAME), bench_noop)
        worker = dramatiq.Worker(broker, queues={env.queue}, worker_threads=env.slots,
                                 worker_timeout=IDLE_POLL_MS)
        worker.start()
        _wait_for_sigterm()
        worker.stop()
        root.stop()
        broker.close()
        bridge.stop()


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
    RuntimeFoundation(),
    RuntimeActorHop(),
    # >>> SLOT: the runtime/jobs adapter goes here once it is on main (see the comment above).
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
