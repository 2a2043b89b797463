"""Supervision of actors inside one process (OTP principles on pykka).

A :class:`Supervisor` starts its children from :class:`ChildSpec`
declarations, in order, waiting for each to finish ``on_start`` before the
next (a failure names the child and escalates), and stops them in reverse.
A child is an actor (``ChildSpec(id, start)`` where ``start`` returns a pykka
``ActorRef``) or another supervisor (``ChildSpec.of_supervisor(id, factory)``).

The supervisor is itself an actor: child exits arrive as messages in its
mailbox and are handled one at a time on its thread, so restarts never race.
When a child stops:

- its **restart type** decides whether it comes back: ``PERMANENT`` always,
  ``TRANSIENT`` only after a crash or start failure, ``TEMPORARY`` never;
- the **strategy** decides which children restart with it: ``ONE_FOR_ONE``
  only itself, ``ONE_FOR_ALL`` every child (the others are stopped in reverse
  order first), ``REST_FOR_ONE`` itself and the children declared after it;
- the restart waits a **back-off** ``backoff_base_s * 2**(n-1)`` (capped at
  ``backoff_max_s``) where ``n`` counts the child's consecutive restarts; a
  child that ran ``backoff_reset_s`` without exiting starts again from ``n=1``;
- the **intensity** limit: more than ``max_restarts`` restarts within
  ``max_seconds`` makes the supervisor give up: it stops all its children in
  reverse order and crashes itself with :class:`SupervisorGaveUp`. Its parent
  sees that as a crash of a child; a root supervisor calls its escalation
  hooks (see :mod:`runtime.root`, which ends the process with exit code 70
  so supervisord restarts it).

Every restart, start failure, give-up and escalation is a log line, a metric
(:class:`SupervisionMetrics`, if given) and an event (``on_event``, if given;
:mod:`runtime.tree` has a Redis publisher).

Callers never hold a child's ``ActorRef``: ``supervisor.ask(child_id, msg)``
goes to the child's current incarnation and answers
:class:`~runtime.errors.ActorUnavailable` when it is dead or restarting (also
when it dies while holding the message), so an ``ask`` never hangs. A path
``"inner/child"`` reaches a child of a nested supervisor.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import pykka
from pykka import messages

from runtime.actor import MailboxConfig, SupervisedActor
from runtime.errors import (
    ActorUnavailable,
    AskTimeout,
    SupervisorGaveUp,
    SupervisorStartError,
)
from runtime.jobs.context import answer_by
from runtime.jobs.context import carry as carry_job
from runtime.mailbox import Exit, Mailbox
from runtime.settings import Settings

log = logging.getLogger(__name__)

# OTP's defaults are 1 restart in 5 s; shop actors hold little state and a
# DB blip can crash a few in a row, so allow 3 before the process restarts.
DEFAULT_MAX_RESTARTS = 3
DEFAULT_MAX_SECONDS = 5.0
# First restart after 0.1 s, then 0.2, 0.4 ... at most 30 s: fast recovery
# from a one-off crash, no spinning on a child that fails at every start.
DEFAULT_BACKOFF_BASE_S = 0.1
DEFAULT_BACKOFF_MAX_S = 30.0
# A child that ran this long without exiting has recovered: back-off resets.
DEFAULT_BACKOFF_RESET_S = 60.0
# How long a child may spend in on_start before its start counts as failed.
DEFAULT_START_TIMEOUT_S = 10.0
# Once its children are stopped, the supervisor actor itself gets this long to stop.
SELF_STOP_TIMEOUT_S = 5.0
# The supervisor's own mailbox: child exits and restart timers, never user work.
SUPERVISOR_MAILBOX = MailboxConfig(max_size=10_000)


class Restart(enum.Enum):
    """When a child that stopped is started again."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after a crash
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which children restart when one crashes."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


@dataclass(frozen=True)
class ChildSpec:
    """How to start a child and what to do when it stops.

    ``start`` returns the ``ActorRef`` of a freshly started actor (use a
    :class:`~runtime.actor.SupervisedActor` or ``AsyncActor`` for a bounded
    mailbox and crash semantics). For a nested supervisor use
    :meth:`of_supervisor`, whose factory builds a *new, unstarted*
    :class:`Supervisor` each time.
    """

    id: str
    start: Callable[[], pykka.ActorRef[Any]] | None = None
    restart: Restart = Restart.PERMANENT
    shutdown_timeout_s: float = 5.0
    supervisor: Callable[[], Supervisor] | None = None
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S

    def __post_init__(self) -> None:
        if (self.start is None) == (self.supervisor is None):
            raise ValueError(f"child {self.id!r}: give exactly one of start= or supervisor=")
        if "/" in self.id:
            raise ValueError(f"child id {self.id!r} must not contain '/' (used for paths)")

    @classmethod
    def of_supervisor(
        cls,
        id: str,
        factory: Callable[[], Supervisor],
        restart: Restart = Restart.PERMANENT,
        shutdown_timeout_s: float = 30.0,
    ) -> ChildSpec:
        """A child that is itself a supervisor, built afresh by ``factory`` on each start."""
        return cls(id=id, restart=restart, shutdown_timeout_s=shutdown_timeout_s,
                   supervisor=factory)


@dataclass(frozen=True)
class ChildSnapshot:
    """Immutable view of one child for the tree view."""

    id: str
    alive: bool
    restarts: int
    state: str = "running"
    kind: str = "actor"
    mailbox_depth: int | None = None
    mailbox_size: int | None = None
    last_exit: str | None = None
    children: tuple[ChildSnapshot, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the tree view publishes it)."""
        return {
            "id": self.id, "alive": self.alive, "restarts": self.restarts, "state": self.state,
            "kind": self.kind, "mailbox_depth": self.mailbox_depth,
            "mailbox_size": self.mailbox_size, "last_exit": self.last_exit,
            "children": [c.as_dict() for c in self.children],
        }


@dataclass(frozen=True)
class SupervisionEvent:
    """Something a supervisor did that an operator must be able to see."""

    kind: str  # restart | start_failed | child_exit | give_up | escalation
    supervisor: str
    child: str | None
    reason: str
    restarts: int = 0
    delay_s: float = 0.0
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, "supervisor": self.supervisor, "child": self.child,
                "reason": self.reason, "restarts": self.restarts, "delay_s": self.delay_s,
                "at": self.at}


EventHook = Callable[[SupervisionEvent], None]
EscalationHook = Callable[[BaseException], None]


def supervisor_options(settings: Settings) -> dict[str, Any]:
    """Intensity and back-off keyword arguments for :class:`Supervisor` from settings."""
    return {
        "max_restarts": settings.supervisor_max_restarts,
        "max_seconds": settings.supervisor_max_seconds,
        "backoff_base_s": settings.restart_backoff_base_s,
        "backoff_max_s": settings.restart_backoff_max_s,
        "backoff_reset_s": settings.restart_backoff_reset_s,
    }


def restart_delay_s(consecutive: int, base_s: float, max_s: float) -> float:
    """Back-off before the ``consecutive``-th restart in a row (1-based)."""
    if consecutive < 1 or base_s <= 0:
        return 0.0
    return float(min(base_s * 2 ** (consecutive - 1), max_s))


def should_restart(restart: Restart, exit: Exit) -> bool:
    """OTP's rule: permanent always, transient after an abnormal exit, temporary never."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return exit.abnormal
    return False


def restart_set(strategy: Strategy, ids: Sequence[str], failed: str) -> list[str]:
    """The children (in start order) that restart when ``failed`` does."""
    if strategy is Strategy.ONE_FOR_ONE:
        return [failed]
    if strategy is Strategy.ONE_FOR_ALL:
        return list(ids)
    return list(ids[ids.index(failed):])


class MetricsSink(Protocol):
    """Where a supervisor counts its events: a registry of its own or the shared metrics."""

    def record(self, event: SupervisionEvent) -> None:
        """Count one supervision event."""

    def track(self, supervisor: Supervisor) -> None:
        """Report ``supervisor``'s tree (mailbox depth, liveness) from now on."""


class SupervisionMetrics:
    """Prometheus metrics of supervision on a registry of their own (one process).

    Built by :func:`build_supervision_metrics`, never at import; for embedding
    the runtime in a single process and for tests. Runtime processes use the
    shared multiprocess metrics instead (:class:`runtime.root.SharedSupervisionMetrics`).
    Counters count restarts, start failures, give-ups and escalations;
    mailbox depth and liveness are read from the tracked supervisors at
    scrape time, so they are never stale.
    """

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        labels = ["supervisor", "child", "reason"]
        self.restarts = Counter("shopflow_supervision_restarts_total",
                                "Child restarts by supervisor, child and exit reason",
                                labels, registry=registry)
        self.start_failures = Counter("shopflow_supervision_start_failures_total",
                                      "Children whose on_start failed",
                                      ["supervisor", "child"], registry=registry)
        self.give_ups = Counter("shopflow_supervision_give_ups_total",
                                "Supervisors that hit their restart intensity and gave up",
                                ["supervisor"], registry=registry)
        self.escalations = Counter("shopflow_supervision_escalations_total",
                                   "Failures escalated to a parent or out of the process",
                                   ["supervisor"], registry=registry)
        self._roots: list[Supervisor] = []
        self._lock = threading.Lock()
        registry.register(_TreeCollector(self))

    def track(self, supervisor: Supervisor) -> None:
        """Report ``supervisor``'s tree (depth, liveness) at every scrape."""
        with self._lock:
            self._roots.append(supervisor)

    def roots(self) -> list[Supervisor]:
        """Tracked root supervisors."""
        with self._lock:
            return list(self._roots)

    def record(self, event: SupervisionEvent) -> None:
        """Count one supervision event."""
        child = event.child or ""
        if event.kind == "restart":
            self.restarts.labels(event.supervisor, child, event.reason.split(":")[0]).inc()
        elif event.kind == "start_failed":
            self.start_failures.labels(event.supervisor, child).inc()
        elif event.kind == "give_up":
            self.give_ups.labels(event.supervisor).inc()
        elif event.kind == "escalation":
            self.escalations.labels(event.supervisor).inc()


class _TreeCollector:
    """Scrape-time gauges from the live supervision tree."""

    def __init__(self, metrics: SupervisionMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("shopflow_supervision_mailbox_depth",
                                  "Messages waiting in an actor's mailbox",
                                  labels=["supervisor", "child"])
        up = GaugeMetricFamily("shopflow_supervision_actor_up", "1 when the actor is running",
                               labels=["supervisor", "child"])
        for root in self._metrics.roots():
            for sup_name, child in _walk(root.name, root.snapshot()):
                up.add_metric([sup_name, child.id], 1.0 if child.alive else 0.0)
                if child.mailbox_depth is not None:
                    depth.add_metric([sup_name, child.id], float(child.mailbox_depth))
        yield depth
        yield up

    def describe(self) -> Iterable[Any]:
        return []


def walk_children(sup_name: str, children: Sequence[ChildSnapshot]
                  ) -> Iterable[tuple[str, ChildSnapshot]]:
    """(supervisor path, child) for every child of a tree, depth first."""
    return _walk(sup_name, children)


def _walk(sup_name: str, children: Sequence[ChildSnapshot]) -> Iterable[tuple[str, ChildSnapshot]]:
    for child in children:
        yield sup_name, child
        if child.children:
            yield from _walk(f"{sup_name}/{child.id}", child.children)


def build_supervision_metrics(registry: Any) -> SupervisionMetrics:
    """Create and register the supervision metrics on ``registry`` (once per process)."""
    return SupervisionMetrics(registry)


# --- messages to the supervisor actor --------------------------------------------


@dataclass(frozen=True)
class _StartAll:
    pass


@dataclass(frozen=True)
class _StopAll:
    pass


@dataclass(frozen=True)
class _ChildExited:
    child_id: str
    incarnation: int
    exit: Exit


@dataclass(frozen=True)
class _RestartDue:
    child_ids: tuple[str, ...]


class _SupervisorActor(SupervisedActor):
    """The actor behind a :class:`Supervisor`: serialises every decision on one thread."""

    def __init__(self, owner: Supervisor) -> None:
        super().__init__(mailbox=SUPERVISOR_MAILBOX)
        self.owner = owner

    def on_receive(self, message: Any) -> Any:
        """Runs on the supervisor's thread; an escaping SupervisorGaveUp crashes it."""
        if isinstance(message, _ChildExited):
            self.owner._on_child_exited(message)
        elif isinstance(message, _RestartDue):
            self.owner._on_restart_due(message.child_ids)
        elif isinstance(message, _StartAll):
            self.owner._start_all()
        elif isinstance(message, _StopAll):
            self.owner._stop_all()
        else:
            raise TypeError(f"supervisor got an unknown message {message!r}")
        return None


# Child states from which the child will be running again without anyone's help
# ("running" with a dead ref: its exit notice is on the way to the supervisor).
_COMING_BACK = frozenset({"starting", "restarting", "running"})
_SUPERVISOR_DOWN = frozenset({"stopping", "stopped", "failed"})


class _Child:
    """Mutable bookkeeping for one child; written only on the supervisor's thread."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.ref: pykka.ActorRef[Any] | None = None
        self.nested: Supervisor | None = None
        self.incarnation = 0
        self.state = "stopped"
        self.restarts = 0
        self.consecutive = 0
        self.started_at = 0.0
        self.last_exit: str | None = None


class Supervisor:
    """An OTP-style supervisor (see the module docstring for the rules)."""

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        on_escalate: EscalationHook | None = None,
        *,
        backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        backoff_reset_s: float = DEFAULT_BACKOFF_RESET_S,
        on_event: EventHook | None = None,
        metrics: MetricsSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ids = [spec.id for spec in children]
        if len(set(ids)) != len(ids):
            raise ValueError(f"supervisor {name!r}: duplicate child ids in {ids}")
        self.name = name
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.backoff_reset_s = backoff_reset_s
        self.on_event = on_event
        self.metrics = metrics
        self._clock = clock
        self._specs = list(children)
        self._children = {spec.id: _Child(spec) for spec in self._specs}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a child starts
        self._escalation_hooks: list[EscalationHook] = [on_escalate] if on_escalate else []
        self._restart_times: deque[float] = deque()
        self._timers: set[threading.Timer] = set()
        self._actor: pykka.ActorRef[Any] | None = None
        self.state = "new"

    # --- public API ----------------------------------------------------------------

    def start(self) -> Supervisor:
        """Start the supervisor actor, then every child in order; raise on a failed start."""
        self._actor = _SupervisorActor.start(self)
        inbox = self._actor.actor_inbox
        assert isinstance(inbox, Mailbox)
        inbox.add_close_listener(self._on_own_exit)
        self.state = "starting"
        try:
            self._actor.ask(_StartAll())
        except BaseException:
            self.state = "failed"
            self._actor.stop()
            raise
        self.state = "running"
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop every child in reverse order, then the supervisor itself.

        Waits at most ``timeout_s`` (default: the children's shutdown timeouts
        added up, plus a margin). A stop that overruns it is logged and left to
        finish on the supervisor's thread: a process on its way out (a worker
        within its stop budget) must not wait for a child stuck in a handler.
        """
        actor = self._actor
        if actor is None:
            return
        budget_s = self._stop_budget_s() if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget_s
        if actor.is_alive():
            try:
                actor.ask(_StopAll(), timeout=budget_s)
                actor.stop(timeout=max(min(SELF_STOP_TIMEOUT_S, deadline - time.monotonic()),
                                       0.1))
            except pykka.ActorDeadError:
                log.warning("supervisor %s was already stopping", self.name)
            except pykka.Timeout:
                log.error("supervisor %s did not stop its children within %.1fs; leaving "
                          "them to stop in the background", self.name, budget_s)
        if self.state != "failed":
            self.state = "stopped"

    def add_child(self, spec: ChildSpec) -> None:
        """Declare one more child before :meth:`start`: it starts last and stops first.

        For a process's own machinery that belongs under its root (the tree
        reporter); a started supervisor's children are fixed.
        """
        if self._actor is not None:
            raise RuntimeError(f"supervisor {self.name} has started; its children are fixed")
        if spec.id in self._children:
            raise ValueError(f"supervisor {self.name!r}: duplicate child id {spec.id!r}")
        self._specs.append(spec)
        self._children[spec.id] = _Child(spec)

    @property
    def actor_ref(self) -> pykka.ActorRef[Any]:
        """The supervisor's own actor (what a parent supervisor watches)."""
        if self._actor is None:
            raise RuntimeError(f"supervisor {self.name} is not started")
        return self._actor

    def add_escalation_hook(self, hook: EscalationHook) -> None:
        """Call ``hook(error)`` (on the supervisor's thread) when this supervisor gives up."""
        self._escalation_hooks.append(hook)

    def ask(self, child_id: str, message: Any, timeout_s: float) -> Any:
        """Ask the child's current incarnation; its own exception is re-raised here.

        A child that is restarting is waited for (within ``timeout_s``), and a
        message its dying incarnation never handled is resent to the next one,
        so a job does not burn an attempt on a restart that takes milliseconds.
        Raises ActorUnavailable when the child is dead for good or does not
        come back in time, ActorCrashed when it dies holding the message,
        AskTimeout when it does not answer in time, MailboxFull when its
        mailbox stays full. The caller's current job (runtime.jobs.context)
        goes with the message to a runtime actor, which handles it with that
        job current: progress, cancellation and the deadline reach the actor.
        So does this ask's own deadline (``timeout_s`` from now): a runtime
        actor does not start the message once it has passed (a message can wait
        behind others in the mailbox) and ends its handler before it
        (:func:`runtime.jobs.context.ask_time_left_s`), so the caller never
        gives up on a handler that still runs.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            ref = self.wait_for_ref(child_id, deadline)
            # The job the caller runs goes along, for the runtime's actors to install.
            sent = carry_job(message, answer_by(deadline, timeout_s)) if getattr(
                ref.actor_class, "accepts_job_context", False) else message
            try:
                return ref.ask(sent, timeout=max(deadline - time.monotonic(), 0.001))
            except pykka.ActorDeadError:
                # Refused or drained unhandled by a dying incarnation: safe to resend
                # to the next one. (A message it was handling answers ActorCrashed.)
                if time.monotonic() >= deadline:
                    raise ActorUnavailable(f"actor {self.name}/{child_id} died") from None
            except pykka.Timeout:
                raise AskTimeout(
                    f"actor {self.name}/{child_id} did not answer within {timeout_s}s"
                ) from None

    def wait_for_ref(self, child_id: str, deadline: float) -> pykka.ActorRef[Any]:
        """The child's running incarnation, waiting while it (re)starts until ``deadline``.

        ``deadline`` is on ``time.monotonic()``. Raises ActorUnavailable at once
        when the child will not come back (temporary, exited, supervisor
        stopped or failed), or when the deadline passes.
        """
        head, _, rest = child_id.partition("/")
        with self._changed:
            child = self._children.get(head)
            if child is None:
                raise ActorUnavailable(f"{self.name} has no child {head!r}")
            while True:
                ref, nested, state = child.ref, child.nested, child.state
                live = nested is not None if rest else ref is not None and ref.is_alive()
                if state == "running" and live:
                    break
                if state not in _COMING_BACK or self.state in _SUPERVISOR_DOWN:
                    raise ActorUnavailable(
                        f"actor {self.name}/{child_id} is not running ({state})")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ActorUnavailable(
                        f"actor {self.name}/{child_id} did not come back in time ({state})")
                self._changed.wait(remaining)
        if rest:
            assert nested is not None
            return nested.wait_for_ref(rest, deadline)
        assert ref is not None
        return ref

    async def ask_async(self, child_id: str, message: Any, timeout_s: float) -> Any:
        """:meth:`ask` for code running on the event loop (waits in a thread, not on the loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.ask, child_id, message, timeout_s)

    def tell(self, child_id: str, message: Any) -> None:
        """Send without waiting; raises ActorUnavailable or MailboxFull at once."""
        try:
            self.child_ref(child_id).tell(message)
        except pykka.ActorDeadError:
            raise ActorUnavailable(f"actor {self.name}/{child_id} died") from None

    def wait_running(self, child_id: str, timeout_s: float) -> bool:
        """Wait until the child (a direct child) runs; False on timeout.

        For callers that prefer to ride out a restart rather than fail at once
        (and for tests, which wait on this instead of sleeping).
        """
        with self._changed:
            return self._changed.wait_for(
                lambda: self._children[child_id].state == "running", timeout_s)

    def child_ref(self, child_id: str) -> pykka.ActorRef[Any]:
        """The current incarnation's ref (``"inner/child"`` for a nested supervisor's child)."""
        head, _, rest = child_id.partition("/")
        with self._lock:
            child = self._children.get(head)
            if child is None:
                raise ActorUnavailable(f"{self.name} has no child {head!r}")
            ref, nested, state = child.ref, child.nested, child.state
        if rest:
            if nested is None or state != "running":
                raise ActorUnavailable(f"supervisor {self.name}/{head} is not running")
            return nested.child_ref(rest)
        if ref is None or state != "running" or not ref.is_alive():
            raise ActorUnavailable(f"actor {self.name}/{child_id} is not running ({state})")
        return ref

    def snapshot(self) -> list[ChildSnapshot]:
        """Children (in start order) with state, restart counts and mailbox depth."""
        with self._lock:
            children = [(c.spec.id, c.ref, c.nested, c.state, c.restarts, c.last_exit)
                        for c in self._children.values()]
        return [self._child_snapshot(*c) for c in children]

    def describe(self) -> dict[str, Any]:
        """The whole subtree as JSON-ready data (for ``shopflow tree`` and the dashboard)."""
        return {"name": self.name, "state": self.state, "strategy": self.strategy.value,
                "max_restarts": self.max_restarts, "max_seconds": self.max_seconds,
                "children": [c.as_dict() for c in self.snapshot()]}

    # --- on the supervisor's thread ------------------------------------------------

    def _start_all(self) -> None:
        started: list[_Child] = []
        for spec in self._specs:
            child = self._children[spec.id]
            try:
                self._start_child(child)
            except SupervisorStartError as exc:
                self._emit("start_failed", spec.id, str(exc.__cause__ or exc))
                for done in reversed(started):
                    self._stop_child(done)
                raise
            started.append(child)

    def _stop_all(self) -> None:
        with self._mutating():
            self.state = "stopping"
        for timer in list(self._timers):
            timer.cancel()
        for spec in reversed(self._specs):
            self._stop_child(self._children[spec.id])

    def _start_child(self, child: _Child) -> None:
        """Start one child and wait until its on_start has finished."""
        spec = child.spec
        with self._mutating():
            child.incarnation += 1
            child.state = "starting"
        incarnation = child.incarnation
        nested: Supervisor | None = None
        try:
            if spec.supervisor is not None:
                nested = spec.supervisor()
                nested._inherit(self)
                nested.start()
                ref = nested.actor_ref
            else:
                assert spec.start is not None
                ref = spec.start()
                self._confirm_started(ref, spec)
        except Exception as exc:
            with self._mutating():
                child.state = "failed"
                child.last_exit = f"start_failed: {type(exc).__name__}: {exc}"
            raise SupervisorStartError(self.name, spec.id, exc) from exc
        with self._mutating():
            child.ref, child.nested, child.state = ref, nested, "running"
            child.started_at = self._clock()
        self._watch(ref, spec.id, incarnation)

    def _confirm_started(self, ref: pykka.ActorRef[Any], spec: ChildSpec) -> None:
        """Wait until the child's on_start has finished; raise its error if it failed."""
        inbox = ref.actor_inbox
        if isinstance(inbox, Mailbox):
            outcome = inbox.wait_started(spec.start_timeout_s)
            if outcome is True:
                return
            if isinstance(outcome, Exit):
                if isinstance(outcome.error, Exception):
                    raise outcome.error
                # None, or a BaseException (SystemExit in on_start): still the child's
                # start failure, not one that would unwind the supervisor's own thread.
                raise ActorUnavailable(f"actor stopped during on_start: {outcome.error!r}") \
                    from outcome.error
        else:
            # A plain pykka actor answers an attribute read only after on_start.
            try:
                ref.ask(messages.ProxyGetAttr(attr_path=("actor_urn",)),
                        timeout=spec.start_timeout_s)
                return
            except pykka.ActorDeadError:
                raise ActorUnavailable("actor stopped during on_start") from None
            except pykka.Timeout:
                pass
        ref.stop(block=False)
        raise AskTimeout(f"on_start did not finish within {spec.start_timeout_s}s")

    def _watch(self, ref: pykka.ActorRef[Any], child_id: str, incarnation: int) -> None:
        """Get a _ChildExited message when this incarnation stops."""
        me = self.actor_ref

        def exited(exit: Exit) -> None:
            try:
                me.tell(_ChildExited(child_id, incarnation, exit))
            except pykka.ActorDeadError:
                log.debug("supervisor %s gone; exit of %s not handled", self.name, child_id)

        inbox = ref.actor_inbox
        if isinstance(inbox, Mailbox):
            inbox.add_close_listener(exited)
            return

        def wait_plain_actor() -> None:
            ref.actor_stopped.wait()
            exited(Exit("crash", ActorUnavailable("plain pykka actor stopped")))

        threading.Thread(target=wait_plain_actor, name=f"watch-{self.name}-{child_id}",
                         daemon=True).start()

    def _stop_child(self, child: _Child) -> None:
        """Stop one child within its shutdown timeout; its exit message will be ignored."""
        with self._mutating():
            ref, nested = child.ref, child.nested
            child.incarnation += 1  # any exit notice from the old incarnation is stale
            child.state = "stopped"
            child.ref = None
            child.nested = None
        if nested is not None:
            nested.stop()
            return
        if ref is None or not ref.is_alive():
            return
        try:
            ref.stop(block=True, timeout=child.spec.shutdown_timeout_s)
        except pykka.Timeout:
            log.error("actor %s/%s did not stop within %.1fs; abandoning its thread",
                      self.name, child.spec.id, child.spec.shutdown_timeout_s)
        except pykka.ActorDeadError:
            pass  # died on its own just now; nothing left to stop

    def _on_child_exited(self, msg: _ChildExited) -> None:
        child = self._children[msg.child_id]
        if msg.incarnation != child.incarnation or child.state != "running":
            return  # an exit we caused (stop, sibling restart) or an older incarnation
        coming_back = should_restart(child.spec.restart, msg.exit)
        with self._mutating():
            # "restarting" at once, so an ask arriving now waits for the new incarnation.
            child.state = "restarting" if coming_back else "exited"
            child.ref = None
            child.nested = None
            child.last_exit = msg.exit.describe()
        if not coming_back:
            self._emit("child_exit", child.spec.id, msg.exit.describe())
            return
        self._plan_restart(child, msg.exit.describe())

    def _plan_restart(self, child: _Child, reason: str) -> None:
        """Apply intensity, strategy and back-off for a child that must come back."""
        self._count_restart_or_give_up(child.spec.id, reason)
        now = self._clock()
        if now - child.started_at >= self.backoff_reset_s:
            child.consecutive = 0
        child.consecutive += 1
        delay_s = restart_delay_s(child.consecutive, self.backoff_base_s, self.backoff_max_s)
        ids = restart_set(self.strategy, [s.id for s in self._specs], child.spec.id)
        for other_id in reversed(ids):
            if other_id != child.spec.id:
                self._stop_child(self._children[other_id])
        ids = [i for i in ids if i == child.spec.id
               or self._children[i].spec.restart is not Restart.TEMPORARY]
        with self._mutating():
            for i in ids:
                self._children[i].state = "restarting"
            child.restarts += 1
        self._emit("restart", child.spec.id, reason, restarts=child.restarts, delay_s=delay_s)
        self._schedule(tuple(ids), delay_s)

    def _count_restart_or_give_up(self, child_id: str, reason: str) -> None:
        now = self._clock()
        self._restart_times.append(now)
        while self._restart_times and now - self._restart_times[0] > self.max_seconds:
            self._restart_times.popleft()
        if len(self._restart_times) > self.max_restarts:
            self._give_up(child_id, reason)

    def _give_up(self, child_id: str, reason: str) -> None:
        """Intensity exceeded: stop everything, report, escalate by crashing."""
        error = SupervisorGaveUp(
            f"supervisor {self.name}: more than {self.max_restarts} restarts in "
            f"{self.max_seconds}s (last: {child_id}, {reason})"
        )
        self._stop_all()
        self.state = "failed"
        self._emit("give_up", child_id, str(error))
        raise error  # crashes the supervisor actor: _on_own_exit escalates

    def _on_own_exit(self, exit: Exit) -> None:
        """The supervisor actor stopped; after a give-up (or a bug in it) escalate.

        Runs on the supervisor actor's thread as it ends. A parent supervisor
        learns of the crash through its own watch; the hooks are for a root.
        """
        if not exit.abnormal:
            return
        self._stop_all()  # no-op after a give-up; after a bug, no child is left orphaned
        self.state = "failed"
        error = exit.error or SupervisorGaveUp(f"supervisor {self.name} crashed")
        self._emit("escalation", None, str(error))
        for hook in self._escalation_hooks:
            try:
                hook(error)
            except Exception:
                log.exception("escalation hook of supervisor %s raised", self.name)

    def _schedule(self, ids: tuple[str, ...], delay_s: float) -> None:
        me = self.actor_ref
        if delay_s <= 0:
            me.tell(_RestartDue(ids))
            return

        def due() -> None:
            self._timers.discard(timer)
            try:
                me.tell(_RestartDue(ids))
            except pykka.ActorDeadError:
                log.debug("supervisor %s gone; restart of %s dropped", self.name, ids)

        timer = threading.Timer(delay_s, due)
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    def _on_restart_due(self, ids: tuple[str, ...]) -> None:
        """Start the children of one restart decision in order; a failure is a new crash."""
        if self.state in ("stopping", "stopped", "failed"):
            return
        for index, child_id in enumerate(ids):
            child = self._children[child_id]
            if child.state != "restarting":
                continue
            try:
                self._start_child(child)
            except SupervisorStartError as exc:
                reason = f"start_failed: {exc.__cause__!r}"
                self._emit("start_failed", child_id, reason)
                with self._mutating():
                    for later in ids[index:]:
                        self._children[later].state = "restarting"
                self._retry_start(child, ids[index:], reason)
                return

    def _retry_start(self, child: _Child, ids: tuple[str, ...], reason: str) -> None:
        """A restart whose start failed: counts toward intensity, backs off further."""
        self._count_restart_or_give_up(child.spec.id, reason)
        child.consecutive += 1
        child.restarts += 1
        delay_s = restart_delay_s(child.consecutive, self.backoff_base_s, self.backoff_max_s)
        self._emit("restart", child.spec.id, reason, restarts=child.restarts, delay_s=delay_s)
        self._schedule(ids, delay_s)

    # --- helpers -------------------------------------------------------------------

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        """Change children's state under the lock and wake callers waiting on it."""
        with self._changed:
            yield
            self._changed.notify_all()

    def _emit(self, kind: str, child: str | None, reason: str, *, restarts: int = 0,
              delay_s: float = 0.0) -> None:
        """One supervision event: a log line, a metric, and the event hook."""
        event = SupervisionEvent(kind, self.name, child, reason, restarts, delay_s)
        level = logging.WARNING if kind in ("restart", "child_exit") else logging.ERROR
        log.log(level, "supervisor %s: %s %s (%s)", self.name, kind, child or "", reason,
                extra={"supervision": event.as_dict()})
        if self.metrics is not None:
            self.metrics.record(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("supervision event hook failed for %s", event.kind)

    def _inherit(self, parent: Supervisor) -> None:
        """A nested supervisor reports through its parent's hooks unless given its own."""
        self.on_event = self.on_event or parent.on_event
        self.metrics = self.metrics or parent.metrics
        self.name = self.name if "/" in self.name else f"{parent.name}/{self.name}"

    def _stop_budget_s(self) -> float:
        return sum(s.shutdown_timeout_s for s in self._specs) + 5.0

    def _child_snapshot(self, child_id: str, ref: pykka.ActorRef[Any] | None,
                        nested: Supervisor | None, state: str, restarts: int,
                        last_exit: str | None) -> ChildSnapshot:
        alive = ref is not None and ref.is_alive() and state == "running"
        inbox = ref.actor_inbox if ref is not None else None
        depth = inbox.depth if isinstance(inbox, Mailbox) else None
        size = inbox.max_size if isinstance(inbox, Mailbox) else None
        if nested is not None:
            return ChildSnapshot(child_id, alive, restarts, state, "supervisor", None, None,
                                 last_exit, tuple(nested.snapshot()))
        qsize = getattr(inbox, "qsize", None)  # a plain pykka actor's queue.Queue
        if depth is None and qsize is not None:
            depth = int(qsize())
        return ChildSnapshot(child_id, alive, restarts, state, "actor", depth, size, last_exit)
