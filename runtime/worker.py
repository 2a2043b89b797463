"""A worker process: a root supervisor of pykka actors behind thin Dramatiq actors.

The process-kind specific part (which concerns, which queues) comes from the
caller as :class:`Concern` objects; this module only wires and runs them:
start the context, start the supervisor's children in order, bind the thin
Dramatiq actors, run the Dramatiq worker until SIGTERM, then stop in reverse
order and exit 0, all within one stop budget (``SHOPFLOW_WORKER_STOP_S``,
below supervisord's ``stopwaitsecs``).

It also owns the boundary between a thin Dramatiq actor and its concern
(:func:`concern_asker`): how long the job waits for the answer, and which
domain errors end the job for good instead of being retried.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka
from dramatiq.brokers.redis import RedisBroker

from runtime.errors import InvalidTransition, NotFound, PermanentJobError, ValidationError
from runtime.jobs.middleware import release_worker
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
# A thin actor waits this much longer for its concern than the concern's own handler
# deadline (SHOPFLOW_ACTOR_ASK_TIMEOUT_S), so a handler that starts at once is ended by
# its own timeout and the job fails with it. A message that first waited in the mailbox
# behind others is bounded by the ask's deadline itself, which rides with it: the actor
# does not start it once that has passed, and ends its handler before it.
ASK_MARGIN_S = 5.0
# Domain errors that say the message itself can never succeed (no such order, bad input,
# a status move the state machine refuses): the job fails for good instead of retrying.
HOPELESS_ERRORS: tuple[type[Exception], ...] = (NotFound, ValidationError, InvalidTransition)
# Shares of the stop budget: running jobs get this much of it to finish...
JOBS_STOP_SHARE = 0.7
# ...handing back the jobs still running after that this much of what is left...
RELEASE_STOP_SHARE = 0.3
# ...and stopping the actors this much of what the jobs left; closing resources the rest.
ACTORS_STOP_SHARE = 0.5
# Dramatiq's Worker.stop joins its worker threads and then its consumers, each for up to
# the timeout it is given: the worker threads get this share of the jobs' time, so the
# consumers (which stop within a poll) can still stop and requeue prefetched messages.
WORKER_JOIN_SHARE = 0.8


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


def concern_asker(root: Supervisor, settings: Settings,
                  margin_s: float = ASK_MARGIN_S) -> Asker:
    """How a thin Dramatiq actor calls its concern: ``ask(child_id, message)``.

    The ask waits ``margin_s`` longer than the handler's own deadline
    (``SHOPFLOW_ACTOR_ASK_TIMEOUT_S``, counted from when the actor takes the
    message), and its own deadline goes with the message
    (:meth:`Supervisor.ask`): a message that waited in the mailbox until the
    ask gave up is never run, and a handler started late is ended before the
    ask gives up, so a job is never retried while its first run still goes on.
    A :data:`HOPELESS_ERRORS` error becomes a :class:`PermanentJobError` (the
    domain error as ``__cause__``), so the job is not retried pointlessly (a
    reservation for an order that does not exist fails once). Every other
    error goes to Dramatiq's retries as it is.
    """
    timeout_s = settings.actor_ask_timeout_s + margin_s

    def ask(child_id: str, message: Any) -> Any:
        try:
            return root.ask(child_id, message, timeout_s)
        except HOPELESS_ERRORS as exc:
            raise PermanentJobError(f"{type(exc).__name__}: {exc}") from exc

    return ask


class StopBudget:
    """One deadline for a whole graceful stop, handed out in shares to its steps."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + total_s

    def remaining_s(self) -> float:
        """Seconds left until the deadline (never negative)."""
        return max(self._deadline - self._clock(), 0.0)

    def share_s(self, fraction: float) -> float:
        """``fraction`` of what is left: the time one step may take."""
        return self.remaining_s() * fraction


def stop_within(what: str, stop: Callable[[], object], timeout_s: float) -> bool:
    """Run ``stop()`` on a daemon thread and wait for it at most ``timeout_s``.

    True if it finished. An overrun (Dramatiq joining a worker thread stuck in
    a job that ignores the stop, say) is logged and left behind: the process
    exits anyway, and what the stuck thread held goes back to the queue (its
    message is not acknowledged). An error in ``stop()`` is logged.
    """

    def run() -> None:
        try:
            stop()
        except Exception:
            log.exception("stopping %s failed", what)

    thread = threading.Thread(target=run, name=f"stop-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.error("%s did not stop within %.1fs; leaving it behind", what, timeout_s)
        return False
    return True


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
    ask = concern_asker(root, settings)
    for concern in concerns:
        concern.declare(ctx.broker, ask)
    worker = make_worker(ctx.broker, queues, threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    log.info("worker %s started", name, extra={"queues": sorted(queues), "threads": threads})
    stop.wait()
    stop_worker_process(name, settings, worker, root, reporting.stop, ctx)
    return 0


def stop_worker_process(name: str, settings: Settings, worker: Any, root: Supervisor,
                        stop_reporting: Callable[[], None], ctx: ProcessContext) -> None:
    """The graceful stop, in order, within ``settings.worker_stop_s`` all told.

    Running jobs get the largest share to finish (Dramatiq then requeues what
    it prefetched); a job still running after that is handed back
    (:func:`runtime.jobs.middleware.release_worker`): it waits again at its
    place as the same attempt, at once, instead of being found by the stall
    sweep a heartbeat timeout later and charged a death (an attempt, and
    after a few deploys a poison-pill quarantine) for a stop that was not its
    fault. Then the actors stop in reverse order, the tree reporter stops, and
    the process's resources close with what is left. Nothing here raises: a
    stop that overran a step is logged and the process still exits 0 in time.
    """
    budget = StopBudget(settings.worker_stop_s)
    log.info("worker %s stopping (budget %.1fs)", name, settings.worker_stop_s)
    jobs_s = budget.share_s(JOBS_STOP_SHARE)
    stop_within("the Dramatiq worker",
                lambda: worker.stop(timeout=int(jobs_s * WORKER_JOIN_SHARE * 1000)), jobs_s)
    stop_within("handing back the running jobs", lambda: release_worker(ctx.broker),
                budget.share_s(RELEASE_STOP_SHARE))
    root.stop(timeout_s=budget.share_s(ACTORS_STOP_SHARE))
    stop_within("the tree reporter", stop_reporting, budget.share_s(ACTORS_STOP_SHARE))
    ctx.stop(timeout_s=budget.remaining_s())
    log.info("worker %s stopped", name)
