"""A process's root supervisor: graceful stop on SIGTERM, exit 70 on escalation.

Two ways to own the root, depending on who owns the main thread:

- :func:`run_root` when the command owns the main thread (``stock-sync``,
  a test program): it starts the root, waits for SIGTERM/SIGINT or an
  escalation, stops the tree in reverse order and returns the exit code
  (0 after a signal, :data:`EXIT_ESCALATED` after an escalation) for the
  command to return;
- :func:`exit_process_on_escalate` as the root's ``on_escalate`` when
  something else owns the main thread (a Dramatiq worker, the aiohttp app):
  it logs, flushes the logs and ends the process with ``os._exit(70)``.
  Messages the process held are not acknowledged, so Dramatiq redelivers
  them; supervisord sees a non-zero exit and restarts the program
  (``autorestart``/``startretries`` in supervisord.conf).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType

from runtime.supervision import Supervisor

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
    if escalated:
        log.critical("root supervisor %s gave up, exiting with code %d: %s",
                     supervisor.name, EXIT_ESCALATED, escalated[0])
        _flush_logs()
        return EXIT_ESCALATED
    log.info("supervisor %s stopped cleanly", supervisor.name)
    return 0
