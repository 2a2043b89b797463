"""A process's root supervisor: graceful stop on SIGTERM, exit 70 on escalation, reporting.

Two ways to own the root, depending on who owns the main thread:

- :func:`run_root` when the command owns the main thread (a test program):
  it starts the root, waits for SIGTERM/SIGINT or an escalation, stops the
  tree in reverse order and returns the exit code (0 after a signal,
  :data:`EXIT_ESCALATED` after an escalation) for the command to return;
  :func:`run_root_async` is the same for a command whose main thread runs an
  event loop (``shopflow scheduler``), with async actors on that loop;
- :func:`exit_process_on_escalate` as the root's ``on_escalate`` when
  something else owns the main thread (a Dramatiq worker, the aiohttp app):
  it logs, flushes the logs and ends the process with ``os._exit(70)``.
  Messages the process held are not acknowledged, so Dramatiq redelivers
  them; supervisord sees a non-zero exit and restarts the program
  (``autorestart``/``startretries`` in supervisord.conf).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import redis

from runtime.settings import Settings
from runtime.supervision import MetricsSink, SupervisionEvent, Supervisor, walk_children
from runtime.tree import TreeReporter, redis_event_publisher, tree_reporter_child

log = logging.getLogger(__name__)

# EX_SOFTWARE from sysexits.h: "an internal software error has been detected".
EXIT_ESCALATED = 70


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except (OSError, ValueError) as exc:  # a broken stderr must not keep the process alive
            print(f"could not flush logs: {exc}", file=sys.__stderr__)


def exit_process_on_escalate(
    code: int = EXIT_ESCALATED, exit_fn: Callable[[int], None] = os._exit
) -> Callable[[BaseException], None]:
    """An ``on_escalate`` hook that logs the failure and ends the process at once."""

    def escalate(error: BaseException) -> None:
        log.critical("root supervisor gave up, exiting with code %d: %s", code, error)
        _flush_logs()
        exit_fn(code)

    return escalate


def run_root(
    supervisor: Supervisor,
    stop_signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ready: Callable[[], None] | None = None,
) -> int:
    """Start ``supervisor`` and block the main thread until a stop signal or escalation.

    Returns 0 after a graceful stop (children stopped in reverse order) and
    :data:`EXIT_ESCALATED` after the root gave up; a failed start raises
    :class:`~runtime.errors.SupervisorStartError` (the CLI turns it into exit 1).
    ``ready`` is called once everything has started.
    """
    wake = threading.Event()
    escalated: list[BaseException] = []

    def on_escalate(error: BaseException) -> None:
        escalated.append(error)
        wake.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping %s", signal.Signals(signum).name, supervisor.name)
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    try:
        supervisor.add_escalation_hook(on_escalate)
        supervisor.start()
        if ready is not None:
            ready()
        while not wake.wait(1.0):
            continue
        supervisor.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _exit_code(supervisor, escalated)


async def run_root_async(supervisor: Supervisor, stop: asyncio.Event,
                         ready: Callable[[], None] | None = None) -> int:
    """:func:`run_root` for a command whose main thread runs the event loop.

    The root starts and stops in a worker thread, so children that are async
    actors on this loop (:class:`runtime.actor.AsyncActor`) can run their
    ``on_start``/``on_stop`` meanwhile. Waits until ``stop`` is set (the
    command's signal handlers set it) or the root escalates, stops the tree
    in reverse order and returns 0, or :data:`EXIT_ESCALATED` after an
    escalation. A failed start raises
    :class:`~runtime.errors.SupervisorStartError`.
    """
    loop = asyncio.get_running_loop()
    escalated: list[BaseException] = []
    gave_up = asyncio.Event()

    def on_escalate(error: BaseException) -> None:  # the supervisor's thread
        escalated.append(error)
        loop.call_soon_threadsafe(gave_up.set)

    supervisor.add_escalation_hook(on_escalate)
    await asyncio.to_thread(supervisor.start)
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gave_up.wait())}
    try:
        if ready is not None:
            ready()
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.to_thread(supervisor.stop)
    return _exit_code(supervisor, escalated)


def _exit_code(supervisor: Supervisor, escalated: list[BaseException]) -> int:
    """The process's exit code once its root stopped; logs how it ended."""
    if escalated:
        log.critical("root supervisor %s gave up, exiting with code %d: %s",
                     supervisor.name, EXIT_ESCALATED, escalated[0])
        _flush_logs()
        return EXIT_ESCALATED
    log.info("supervisor %s stopped cleanly", supervisor.name)
    return 0


class SharedSupervisionMetrics:
    """Supervision counted on the process tree's shared (multiprocess) metrics.

    Feeds :mod:`runtime.metrics`' ``shopflow_actor_restarts_total{actor}``,
    ``shopflow_actor_start_failures_total{actor}``,
    ``shopflow_supervisor_give_ups_total{supervisor}``,
    ``shopflow_supervisor_escalations_total{supervisor}`` and the live gauge
    ``shopflow_mailbox_depth{actor}`` (``actor`` is ``supervisor/child``), so
    they add up across every process behind one ``/metrics``. Mailbox depth is
    sampled on every tree-reporter tick (:meth:`refresh`).
    """

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics
        self._roots: list[Supervisor] = []

    def record(self, event: SupervisionEvent) -> None:
        """Count a restart, a start failure, a give-up or an escalation (not a child_exit)."""
        actor = f"{event.supervisor}/{event.child}"
        if event.kind == "restart":
            self._metrics.actor_restarts.labels(actor=actor).inc()
        elif event.kind == "start_failed":
            self._metrics.actor_start_failures.labels(actor=actor).inc()
        elif event.kind == "give_up":
            self._metrics.supervisor_give_ups.labels(supervisor=event.supervisor).inc()
        elif event.kind == "escalation":
            self._metrics.supervisor_escalations.labels(supervisor=event.supervisor).inc()

    def track(self, supervisor: Supervisor) -> None:
        """Sample ``supervisor``'s mailboxes on every :meth:`refresh`."""
        self._roots.append(supervisor)

    def refresh(self) -> None:
        """Set the mailbox-depth gauge of every tracked actor (reporter thread)."""
        for root in self._roots:
            for sup_name, child in walk_children(root.name, root.snapshot()):
                if child.mailbox_depth is not None:
                    self._metrics.mailbox_depth.labels(actor=f"{sup_name}/{child.id}").set(
                        child.mailbox_depth)


class ProcessSupervision:
    """What a process hangs on its root supervisor so nothing is restarted silently.

    - every supervision event goes to the Redis Streams (``events:supervision``,
      and give-ups/escalations also ``events:alerts``),
    - events are counted on ``metrics`` (for a runtime process:
      ``SharedSupervisionMetrics(runtime.metrics.get_metrics(settings))``),
    - a :class:`~runtime.tree.TreeReporter` publishes the tree for ``shopflow tree``
      (and refreshes the mailbox-depth gauge); it runs as the root's last child
      (``tree-reporter``), so it is supervised like every actor of the process:
      started last, stopped first, restarted if it crashes,
    - optionally, escalation out of the root ends the process with exit code 70.

    Call :func:`attach_process_supervision` *before* ``root.start()`` (nested
    supervisors inherit the hooks when they start), :meth:`start` after it and
    :meth:`stop` after ``root.stop()``.
    """

    def __init__(self, settings: Settings, process: str, root: Supervisor,
                 metrics: MetricsSink | None) -> None:
        redis_url, _ = settings.require_urls()
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
        self.metrics = metrics
        refresh = getattr(metrics, "refresh", None)
        self.reporter = TreeReporter(self._client, settings.namespace, process, [root],
                                     settings.tree_publish_interval_s, settings.tree_ttl_s,
                                     on_tick=refresh)
        root.on_event = redis_event_publisher(self._client, settings.namespace, process)
        root.metrics = metrics
        if metrics is not None:
            metrics.track(root)
        root.add_child(tree_reporter_child(self.reporter))

    def start(self) -> ProcessSupervision:
        """After the root started: nothing left to start (the reporter is the root's child)."""
        return self

    def stop(self) -> None:
        """After the root stopped: make sure this process left the view, close the client."""
        self.reporter.remove()
        self._client.close()


def attach_process_supervision(
    settings: Settings, process: str, root: Supervisor, metrics: MetricsSink | None = None,
    exit_on_escalate: bool = False,
) -> ProcessSupervision:
    """Wire ``root`` to Redis events, ``metrics`` and the tree view (before it starts)."""
    attached = ProcessSupervision(settings, process, root, metrics)
    if exit_on_escalate:
        root.add_escalation_hook(exit_process_on_escalate())
    return attached
