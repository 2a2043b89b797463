"""``shopflow monitor``: check the queues once (exit 1 if anything fires) or keep checking."""

from __future__ import annotations

import argparse
import asyncio
import signal

import redis.asyncio as aioredis

from actors.monitor.service import CheckReport, QueueMonitor
from runtime import embedded
from runtime.alerts import Alerter
from runtime.broker import ALL_QUEUES
from runtime.cli import add_command
from runtime.metrics import get_metrics
from runtime.settings import Settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``shopflow monitor`` (entry point of the ``shopflow.commands`` group)."""
    parser = add_command(subparsers, "monitor", _cmd_monitor,
                         "check the queues: backlog, age, failures, consumers",
                         "check every queue's backlog, oldest job, failure rate and consumers")
    parser.add_argument("--once", action="store_true",
                        help="check once, print the table, exit 1 if an alert fires")


def _cmd_monitor(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.find_services(settings)  # watches a running runtime, starts nothing
    return asyncio.run(_monitor(settings, bool(args.once)))


async def _monitor(settings: Settings, once: bool) -> int:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        metrics = get_metrics(settings)
        monitor = QueueMonitor(settings, client, Alerter(settings, client, metrics), metrics,
                               ALL_QUEUES)
        if once:
            report = await monitor.check()
            print(format_report(report))
            return 1 if report.firing else 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await monitor.run(stop)
        return 0
    finally:
        await client.aclose()


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
