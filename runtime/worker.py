"""A worker process: a root supervisor of pykka actors behind thin Dramatiq actors.

The process-kind specific part (which concerns, which queues) comes from the
caller as :class:`Concern` objects; this module only wires and runs them:
start the context, start the supervisor's children in order, bind the thin
Dramatiq actors, run the Dramatiq worker until SIGTERM, then stop in reverse
order and exit 0.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka
from dramatiq.brokers.redis import RedisBroker

from runtime.jobs.worker import make_worker
from runtime.metrics import get_metrics
from runtime.observability import install_job_metrics
from runtime.process import ProcessContext
from runtime.root import (
    SharedSupervisionMetrics,
    attach_process_supervision,
    exit_process_on_escalate,
)
from runtime.scheduling.metering import ScheduleMetrics
from runtime.scheduling.middleware import ScheduledRunMiddleware, ensure_scheduled_run_middleware
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Supervisor, supervisor_options
from runtime.trace import install_order_trail

log = logging.getLogger(__name__)

Asker = Callable[[str, Any], Any]
# How long a stopping worker lets running jobs finish before handing them back.
GRACEFUL_STOP_MS = 20_000


@dataclass(frozen=True)
class Concern:
    """One concern's part of a process: its supervised actors and its Dramatiq actors."""

    name: str
    children: Sequence[ChildSpec]
    declare: Callable[[RedisBroker, Asker], None]
    queues: Sequence[str] = field(default_factory=tuple)


ConcernFactory = Callable[[ProcessContext], Sequence[Concern]]


@dataclass
class ActorPool:
    """``size`` identical supervised actors served round-robin, one per worker thread.

    A concern whose work is independent per message (one order at a time)
    uses a pool so a worker's threads are not serialised behind one mailbox.
    """

    prefix: str
    size: int
    start: Callable[[], pykka.ActorRef[Any]]
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def children(self) -> list[ChildSpec]:
        """One child spec per member, ids ``prefix-0`` .. ``prefix-(size-1)``."""
        return [ChildSpec(f"{self.prefix}-{i}", self.start) for i in range(self.size)]

    def next_id(self) -> str:
        """The member that gets the next message."""
        with self._lock:
            return f"{self.prefix}-{next(self._turn) % self.size}"


def build_root(name: str, concerns: Sequence[Concern],
               settings: Settings | None = None) -> Supervisor:
    """The process's root supervisor over every concern's children, in order.

    Dramatiq owns the main thread, so a give-up out of the root ends the
    process through :func:`runtime.root.exit_process_on_escalate` (log, flush
    the logs, exit 70): the messages it held are redelivered and supervisord
    restarts the program.
    """
    children = [child for concern in concerns for child in concern.children]
    options = supervisor_options(settings) if settings is not None else {}
    return Supervisor(f"{name}-root", children, on_escalate=exit_process_on_escalate(),
                      **options)


def install_scheduled_runs(broker: RedisBroker, settings: Settings) -> ScheduledRunMiddleware:
    """Record scheduled runs in this worker, whatever queue they land on: their outcome in
    Redis (overlap policy, ``shopflow schedules``) and the ``shopflow_cron_*`` metrics.

    Every worker kind calls it (through :func:`run_worker`), so a schedule's figures exist
    whichever worker runs its job. Call before the worker starts.
    """
    return ensure_scheduled_run_middleware(broker, settings.redis_url or "", settings.namespace,
                                           observer=ScheduleMetrics(get_metrics(settings)))


def run_worker(settings: Settings, name: str, factory: ConcernFactory, threads: int) -> int:
    """Run a worker process until SIGTERM/SIGINT; return its exit code."""
    ctx = ProcessContext.start(settings)
    install_job_metrics(ctx)  # before actors are declared: it owns the `critical` option
    install_order_trail(ctx.broker, ctx.pool, ctx.bridge)  # failed attempts on orders' trails
    install_scheduled_runs(ctx.broker, settings)
    concerns = factory(ctx)
    queues = {q for c in concerns for q in c.queues}
    root = build_root(name, concerns, settings)
    reporting = attach_process_supervision(
        settings, name, root, SharedSupervisionMetrics(get_metrics(settings)))
    root.start()
    reporting.start()
    timeout_s = settings.actor_ask_timeout_s
    for concern in concerns:
        concern.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, timeout_s))
    worker = make_worker(ctx.broker, queues, threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    log.info("worker %s started", name, extra={"queues": sorted(queues), "threads": threads})
    stop.wait()
    log.info("worker %s stopping", name)
    worker.stop(timeout=GRACEFUL_STOP_MS)
    root.stop()
    reporting.stop()
    ctx.stop()
    log.info("worker %s stopped", name)
    return 0
