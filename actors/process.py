"""The worker process kinds of DESIGN.md section 2 and the ``shopflow worker`` command."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actors.agents import jobs as agents
from actors.carts import actor as carts
from actors.emailer import actor as emailer
from actors.fulfillment import actor as fulfillment
from actors.housekeeping import actor as housekeeping
from actors.inventory import actor as inventory
from actors.monitor import actor as monitor
from actors.reports import actor as reports
from runtime import embedded
from runtime.cli import add_command
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import Concern, run_worker


@dataclass(frozen=True)
class WorkerKind:
    """Which concerns a worker process of this kind runs, and with how many threads."""

    concerns: tuple[Callable[[ProcessContext], Concern], ...]
    threads: Callable[[Settings], int]


WORKER_KINDS: dict[str, WorkerKind] = {
    "agents": WorkerKind((agents.concern,), lambda s: 4),
    "email": WorkerKind((emailer.concern,), lambda s: 4),
    "inventory": WorkerKind((inventory.concern,), lambda s: s.inventory_concurrency),
    "flow": WorkerKind(
        (fulfillment.concern, monitor.concern, carts.concern, housekeeping.concern, reports.concern),
        lambda s: 4,
    ),
}


def factory_for(kind: WorkerKind) -> Callable[[ProcessContext], Sequence[Concern]]:
    """Build every concern of ``kind`` on a started context."""
    return lambda ctx: [make(ctx) for make in kind.concerns]


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.ensure_services(settings)
    kind = WORKER_KINDS[args.kind]
    threads = args.threads or kind.threads(settings)
    return run_worker(settings, f"{args.kind}-worker", factory_for(kind), threads)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow worker`` into the command line."""
    parser = add_command(sub, "worker", _cmd_worker, "run a worker process of one --kind",
                         "run a worker process of one kind (its actors and Dramatiq consumers)")
    parser.add_argument("--kind", required=True, choices=sorted(WORKER_KINDS),
                        help="which concerns this process runs")
    parser.add_argument("--threads", type=int, default=0,
                        help="Dramatiq worker threads (default: per kind, from settings)")
