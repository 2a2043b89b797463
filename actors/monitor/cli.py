"""``shopflow monitor``: check every queue once (exit 1 if an alert fires), or every S seconds.

One check is the default, as an operator asking "how are the queues?" wants
an answer and the prompt back; the flow worker's supervised monitor is what
keeps checking in production. ``--every S`` repeats the check in the
terminal, printing each check's table, until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from datetime import datetime

import redis.asyncio as aioredis

from actors.monitor.service import CheckReport, QueueMonitor
from runtime import embedded
from runtime.alerts import Alerter
from runtime.broker import ALL_QUEUES
from runtime.cli import add_command, seconds_arg
from runtime.metrics import get_metrics
from runtime.settings import Settings

DESCRIPTION = (
    "Check every queue once (backlog, oldest waiting job, failure rate, consumers), print a "
    "table and exit: 0 if no alert fires, 1 if one does. Like the flow worker's queue monitor, "
    "a check raises and resolves the alerts it finds. With --every S it checks again every S "
    "seconds, printing each check's table, until Ctrl-C or SIGTERM (exit 0).")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``shopflow monitor`` (entry point of the ``shopflow.commands`` group)."""
    parser = add_command(subparsers, "monitor", _cmd_monitor,
                         "check every queue once: backlog, age, failures, consumers",
                         DESCRIPTION)
    repeat = parser.add_mutually_exclusive_group()
    repeat.add_argument("--once", action="store_true",
                        help="check once (the default; kept for scripts)")
    repeat.add_argument("--every", type=seconds_arg, metavar="S",
                        help="check every S seconds, printing each check, until interrupted")


def _cmd_monitor(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.find_services(settings)  # watches a running runtime, starts nothing
    return asyncio.run(_monitor(settings, args.every))


async def _monitor(settings: Settings, every_s: float | None) -> int:
    """One check (exit 1 if an alert fires), or, with ``every_s``, checks until a signal."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        metrics = get_metrics(settings)
        monitor = QueueMonitor(settings, client, Alerter(settings, client, metrics), metrics,
                               ALL_QUEUES)
        if every_s is None:
            report = await monitor.check()
            print(format_report(report))
            return 1 if report.firing else 0
        await monitor.run(_stop_on_signals(), every_s,
                          lambda report: _print_check(report, settings))
        return 0
    finally:
        await client.aclose()


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so a repeated check ends between two checks."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _print_check(report: CheckReport, settings: Settings) -> None:
    """One check of ``--every``: when (shop time, zone named), its table, a blank line."""
    at = datetime.now(settings.zone).isoformat(sep=" ", timespec="seconds")
    print(f"check at {at} ({settings.zone.key})\n{format_report(report)}\n", flush=True)


def format_report(report: CheckReport) -> str:
    """A table of every queue, then the alerts that fire."""
    header = (f"{'queue':<16}{'waiting':>8}{'active':>8}{'delayed':>8}{'failed':>8}"
              f"{'oldest_s':>10}{'consumers':>10}{'fail%':>7}")
    lines = [header]
    for s in report.stats:
        oldest = f"{s.oldest_waiting_age_s:.0f}" if s.oldest_waiting_age_s is not None else "-"
        ratio = f"{s.failure_ratio:.0%}" if s.failure_ratio is not None else "-"
        lines.append(f"{s.queue:<16}{s.waiting:>8}{s.active:>8}{s.delayed:>8}{s.failed:>8}"
                     f"{oldest:>10}{s.consumers:>10}{ratio:>7}")
    for alert in report.firing:
        lines.append(f"FIRING {alert.severity.value}: {alert.name}: {alert.summary}")
    return "\n".join(lines)
