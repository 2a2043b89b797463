"""Commands around the metrics directory: print a scrape, reset, reap dead processes.

``shopflow metrics-reaper`` is a supervisord event listener: supervisord tells
it the pid of every program process that exits or stops, and it marks that
process dead, so its live gauges leave the next scrape at once (the scrape
also sweeps dead pids itself; this makes it immediate and needs no pid check).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

from supervisor import childutils

from runtime.cli import add_command
from runtime.metrics import mark_process_dead, prepare_metrics_dir, render_metrics
from runtime.settings import Settings
from runtime.supervisor_events import exit_ok_on_sigterm

log = logging.getLogger(__name__)

# supervisord events that carry the pid of a process that is gone.
REAPED_EVENTS = ("PROCESS_STATE_EXITED", "PROCESS_STATE_STOPPED")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``shopflow metrics`` and ``shopflow metrics-reaper``."""
    parser = add_command(subparsers, "metrics", _cmd_metrics,
                         "print what /metrics serves (all processes added up)")
    parser.add_argument("--reset", action="store_true",
                        help="empty the metrics directory instead (only before the tree starts)")
    add_command(subparsers, "metrics-reaper", _cmd_reaper,
                "supervisord listener: drop gauges of exited processes",
                "supervisord event listener: forget live gauges of exited processes")


def _cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    if args.reset:
        print(f"emptied {prepare_metrics_dir(settings)}")
        return 0
    body, _ = render_metrics(settings)
    sys.stdout.write(body.decode())
    return 0


def _cmd_reaper(args: argparse.Namespace, settings: Settings) -> int:
    exit_ok_on_sigterm()
    run_reaper(settings, sys.stdin, sys.stdout)
    return 0


def handle_event(settings: Settings, headers: dict[str, str], payload: str) -> int | None:
    """Mark the process of one supervisord event dead; returns its pid (None if not one)."""
    if headers.get("eventname") not in REAPED_EVENTS:
        return None
    fields = childutils.get_headers(payload.split("\n", 1)[0])
    pid_text = fields.get("pid", "")
    if not pid_text.isdigit():
        return None
    mark_process_dead(settings, int(pid_text))
    log.info("marked process dead for metrics",
             extra={"pid": int(pid_text), "program": fields.get("processname")})
    return int(pid_text)


def run_reaper(settings: Settings, stdin: TextIO, stdout: TextIO) -> None:
    """Serve supervisord's event listener protocol until stdin closes."""
    while True:
        childutils.listener.ready(stdout)
        line = stdin.readline()
        if not line:
            return  # supervisord is shutting down
        headers = childutils.get_headers(line)
        payload = stdin.read(int(headers.get("len", "0")))
        handle_event(settings, headers, payload)
        childutils.listener.ok(stdout)
