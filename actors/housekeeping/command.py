"""``shopflow schedules`` and ``shopflow scheduler``.

``shopflow scheduler`` runs one scheduler instance (run two or more: one
leads, the others stand by). The instance is the ``scheduler`` actor (an
async actor on the process's loop) under the process's root supervisor
``scheduler-root``: a crash is restarted with a log line, a metric and an
event, the tree is published for ``shopflow tree``, and a root that gives up
ends the process with exit code 70 so supervisord restarts it. ``shopflow schedules`` lists every schedule,
built-in and repeatable, with its next three runs in its own zone and in
UTC, its last run and counters; ``--add JSON`` / ``--remove NAME`` manage
repeatable jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pykka

from actors.housekeeping.schedules import builtin_names, shop_schedules
from runtime import embedded
from runtime.actor import MailboxConfig, TaskActor
from runtime.broker import setup_broker
from runtime.cli import add_command
from runtime.errors import ConfigError, NotFound, ValidationError
from runtime.loop import LoopBridge
from runtime.metrics import get_metrics
from runtime.root import SharedSupervisionMetrics, attach_process_supervision, run_root_async
from runtime.scheduling import (
    Schedule,
    Scheduler,
    SchedulerStore,
    add_repeatable,
    broker_sender,
    connect_redis,
    next_slots,
    remove_repeatable,
    repeatable_from_request,
)
from runtime.scheduling.metering import ScheduleMetrics
from runtime.scheduling.overview import display_zone, schedules_overview
from runtime.scheduling.store import LeaseInfo, ScheduleState, list_repeatables
from runtime.settings import Settings
from runtime.supervision import ChildSpec, Restart, Supervisor, supervisor_options

NEXT_RUNS = 3
# The scheduler's names in the supervision tree (``shopflow tree``).
PROCESS_NAME = "scheduler"
CHILD_ID = "scheduler"
# A stopping scheduler gives its lease up (one Redis call); this is plenty.
SCHEDULER_STOP_TIMEOUT_S = 10.0


def _when(moment: datetime | None, zone: ZoneInfo) -> str:
    if moment is None:
        return "-"
    local = moment.astimezone(zone)
    return f"{local:%Y-%m-%d %H:%M:%S%z} ({moment.astimezone(UTC):%Y-%m-%d %H:%M:%SZ})"


def render_schedules(
    schedules: list[Schedule], states: dict[str, ScheduleState], lease: LeaseInfo,
    now: datetime, shop_zone: str,
) -> str:
    """The text ``shopflow schedules`` prints (pure: everything comes in as arguments)."""
    lines = []
    if lease.holder and lease.expires_at and lease.expires_at >= now:
        lines.append(f"leader: {lease.holder} (term {lease.term}, lease until "
                     f"{lease.expires_at.astimezone(UTC):%Y-%m-%d %H:%M:%SZ})")
    else:
        lines.append("leader: none (no scheduler is running)")
    for s in schedules:
        zone = display_zone(s, shop_zone)
        st = states[s.name]
        lines.append("")
        lines.append(f"{s.name}  [{s.source}]  {s.trigger.describe()}  -> "
                     f"{s.job.queue}/{s.job.actor}{list(s.args) if s.args else ''}")
        lines.append(f"  policies: misfire {s.misfire.value} (grace {s.misfire_grace_s:.0f}s), "
                     f"overlap {s.overlap.value}")
        runs = next_slots(s.trigger, max(now, st.cursor or now), NEXT_RUNS)
        lines.append("  next: " + " | ".join(_when(r, zone) for r in runs))
        if st.last_status:
            detail = st.last_error or st.last_result or ""
            lines.append(f"  last: slot {_when(st.last_slot, zone)} {st.last_status}"
                         f" at {_when(st.last_finished_at or st.last_started_at, zone)}"
                         f"{'  ' + detail if detail else ''}")
        else:
            lines.append(f"  last: never ran (last sent: {_when(st.sent_slot, zone)})")
        extra = []
        if st.running:
            extra.append("running now")
        if st.queued:
            extra.append(f"{st.queued} queued")
        if st.stats:
            extra.append(", ".join(f"{k}={v}" for k, v in sorted(st.stats.items())))
        if extra:
            lines.append("  " + "; ".join(extra))
    return "\n".join(lines)


async def _schedules(args: argparse.Namespace, settings: Settings) -> int:
    if settings.redis_url is None:  # only Redis is needed: the listing finds no PostgreSQL
        raise ConfigError("REDIS_URL is not set; start the runtime with `ops/dev up` or set it")
    redis = connect_redis(settings.redis_url)
    now = datetime.now(UTC)
    try:
        if args.add:
            try:
                body = json.loads(args.add)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"--add needs a JSON object: {exc}") from None
            added = await add_repeatable(
                redis, settings.namespace, repeatable_from_request(body, settings.timezone), now,
                reserved_names=builtin_names(settings), replace=args.replace,
            )
            print(f"added repeatable job {added.name}")
        if args.remove:
            if not await remove_repeatable(redis, settings.namespace, args.remove):
                raise NotFound(f"no repeatable job named {args.remove!r}; `shopflow schedules` "
                               "lists them")
            print(f"removed {args.remove}")
        if args.json:
            view = await schedules_overview(redis, settings.namespace, shop_schedules(settings),
                                            now, settings.timezone)
            print(json.dumps(view, indent=2))
            return 0
        store = SchedulerStore(redis, settings.namespace)
        builtin = shop_schedules(settings)
        names = {s.name for s in builtin}
        schedules = builtin + [s for s in await list_repeatables(redis, settings.namespace)
                               if s.name not in names]
        states = {s.name: await store.state(s.name) for s in schedules}
        print(render_schedules(schedules, states, await store.lease(), now, settings.timezone))
        return 0
    finally:
        await redis.aclose()


def _cmd_schedules(args: argparse.Namespace, settings: Settings) -> int:
    # Listing looks at a running runtime; adding or removing may prepare one not yet up.
    settings = embedded.services_for(settings, start=bool(args.add or args.remove))
    return asyncio.run(_schedules(args, settings))


def scheduler_child(bridge: LoopBridge, scheduler: Scheduler,
                    mailbox: MailboxConfig | None = None) -> ChildSpec:
    """The scheduler as a supervised async actor: ``scheduler.run`` is its life.

    Each incarnation gets its own stop event; a requested stop sets it, so the
    instance gives its lease up before the actor ends.
    """

    def start() -> pykka.ActorRef[Any]:
        stop = asyncio.Event()
        return TaskActor.start(bridge, CHILD_ID, lambda: scheduler.run(stop), stop=stop.set,
                               stop_timeout_s=SCHEDULER_STOP_TIMEOUT_S, mailbox=mailbox)

    return ChildSpec(CHILD_ID, start, Restart.PERMANENT,
                     shutdown_timeout_s=SCHEDULER_STOP_TIMEOUT_S + 5)


def scheduler_root(settings: Settings, bridge: LoopBridge, scheduler: Scheduler) -> Supervisor:
    """The scheduler process's root supervisor (not started)."""
    return Supervisor(f"{PROCESS_NAME}-root", [scheduler_child(bridge, scheduler, MailboxConfig.from_settings(settings))],
                      **supervisor_options(settings))


async def supervise_scheduler(settings: Settings, scheduler: Scheduler, stop: asyncio.Event,
                              ready: Callable[[Supervisor], None] | None = None) -> int:
    """Run ``scheduler`` under the process's root until ``stop``; the exit code (70: gave up)."""
    root = scheduler_root(settings, LoopBridge.adopt(), scheduler)
    reporting = attach_process_supervision(
        settings, PROCESS_NAME, root, SharedSupervisionMetrics(get_metrics(settings)))

    def started() -> None:
        reporting.start()
        if ready is not None:
            ready(root)

    try:
        return await run_root_async(root, stop, ready=started)
    finally:
        await asyncio.to_thread(reporting.stop)


async def run_scheduler(settings: Settings, stop: asyncio.Event | None = None,
                        once: bool = False,
                        ready: Callable[[Supervisor], None] | None = None) -> int:
    """Run one scheduler instance until ``stop`` (or SIGTERM/SIGINT); one tick with ``once``.

    ``ready(root)`` is called once the supervision tree runs (tests wait on it).
    """
    redis_url, _ = settings.require_urls()
    redis = connect_redis(redis_url)
    broker = setup_broker(settings)
    scheduler = Scheduler(
        SchedulerStore(redis, settings.namespace), broker_sender(broker),
        shop_schedules(settings), lease_s=settings.scheduler_lease_s,
        tick_s=settings.scheduler_tick_s, resend_after_s=settings.scheduler_resend_after_s,
        observer=ScheduleMetrics(get_metrics(settings)),
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if once:
            report = await scheduler.tick()
            await scheduler.store.release_lease(scheduler.instance_id)
            print(json.dumps({"leader": report.leader,
                              "sent": [[n, s.isoformat()] for n, s in report.sent]}))
            return 0
        return await supervise_scheduler(settings, scheduler, stop, ready)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        broker.close()
        await redis.aclose()


def _cmd_scheduler(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.ensure_services(settings)
    return asyncio.run(run_scheduler(settings, once=args.once))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow schedules`` and ``shopflow scheduler`` into the command line."""
    parser = add_command(sub, "schedules", _cmd_schedules,
                         "list schedules; add or remove repeatable jobs",
                         "list schedules (next runs, last run); add or remove repeatable jobs")
    parser.add_argument("--add", metavar="JSON",
                        help='add a repeatable job, e.g. \'{"name": "promo", "queue": '
                             '"maintenance", "actor": "x", "cron": "0 10 * * mon", '
                             '"timezone": "Europe/London"}\' (or "every_s": 600)')
    parser.add_argument("--replace", action="store_true",
                        help="with --add: replace a repeatable job of the same name")
    parser.add_argument("--remove", metavar="NAME", help="remove a repeatable job")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser = add_command(sub, "scheduler", _cmd_scheduler,
                         "run a scheduler instance (one leads, others stand by)")
    parser.add_argument("--once", action="store_true",
                        help="tick once (take the lease if free, fire due slots) and exit")

