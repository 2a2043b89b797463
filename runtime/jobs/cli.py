"""``shopflow jobs``: job history and control from the command line.

Every sub-command is a thin call of :class:`~runtime.jobs.store.JobStore`
against the Redis of the settings. Without ``REDIS_URL`` that is the
embedded Redis ``shopflow up`` started from the var dir; only ``send``
starts it if it is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from runtime import embedded
from runtime.broker import ALL_QUEUES, job_config
from runtime.cli import add_command, seconds_arg
from runtime.errors import NotFound
from runtime.jobs.script import JobKeys, events_stream
from runtime.jobs.store import ENDED_TOTALS, JOB_STATES, JobStore, QueueCounts
from runtime.settings import Settings

Action = Callable[[argparse.Namespace, JobStore], Awaitable[int]]
# A watched job's events end with one of these; a job in one of these states has ended.
ENDED_EVENTS = frozenset({"completed", "skipped", "failed", "cancelled", "dead", "removed"})
ENDED_STATES = frozenset({"completed", "skipped", "failed", "cancelled", "dead"})


def _store_for(settings: Settings, client: aioredis.Redis) -> JobStore:
    keys = JobKeys(f"{settings.namespace}-jobs", events_stream(settings.namespace))
    config = job_config(settings)
    return JobStore(client, keys, ALL_QUEUES, config.bounds, keep_failed=config.keep_failed)


def _run(action: Action, start: bool = False) -> Callable[[argparse.Namespace, Settings], int]:
    """A handler running ``action`` on the settings' Redis.

    Without ``REDIS_URL`` the embedded Redis must be running already, as
    looking at or steering jobs only makes sense on a runtime that is up;
    ``start`` (for ``send``) starts it, so a job can wait for the workers.
    """
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        settings = embedded.services_for(settings, start)

        async def main() -> int:
            client = aioredis.Redis.from_url(settings.redis_url or "")
            try:
                return await action(args, _store_for(settings, client))
            finally:
                await client.aclose()

        return asyncio.run(main())
    return handler


def _print(value: Any, as_json: bool) -> None:
    print(json.dumps(value, indent=2, default=str) if as_json else value)


async def _queues(args: argparse.Namespace, store: JobStore) -> int:
    counts = await store.counts()
    if args.json:
        _print([c.as_json() for c in counts], True)
    else:
        print(queues_table(counts))
    return 0


# The note under ``shopflow jobs queues``' tables: how to read them, where the rest is.
QUEUES_NOTE = """\
Totals count from each queue's first use. Once a queue is idle, sent = ended:
ended = completed + skipped + failed + dead + cancelled + removed (deleted before
it ran); sent counts every enqueue, an operator's retry too. The jobs kept per
ended state (the newest N) and retried, stalled, released totals: --json;
the kept jobs themselves: shopflow jobs list QUEUE --state STATE."""


def queues_table(counts: Sequence[QueueCounts]) -> str:
    """Every queue now (paused, jobs in it), then its totals since first use, then a note.

    The totals are what tells an operator that no job was lost (sent = ended);
    the jobs *kept* per ended state are capped (keep-last-N), so they are left
    to ``--json`` rather than shown where they could pass for totals.
    """
    now = _table("queue (now)", ("paused", "waiting", "active", "delayed"), [
        (c.name, ("yes" if c.paused else "no", c.waiting, c.active, c.delayed))
        for c in counts])
    totals = _table("queue (totals)", ("sent", "ended", *ENDED_TOTALS), [
        (c.name, (c.sent, c.ended, *(c.totals.get(name, 0) for name in ENDED_TOTALS)))
        for c in counts])
    return f"{now}\n\n{totals}\n\n{QUEUES_NOTE}"


def _table(title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]]) -> str:
    """A text table: names left-aligned under ``title``, values right-aligned under ``columns``."""
    name_width = max([len(title), *(len(name) for name, _ in rows)]) + 2
    widths = [max([len(col), *(len(str(values[i])) for _, values in rows)])
              for i, col in enumerate(columns)]
    lines = [f"{title:<{name_width}}" + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for name, values in rows:
        lines.append(f"{name:<{name_width}}"
                     + "  ".join(f"{v!s:>{w}}" for v, w in zip(values, widths)))
    return "\n".join(line.rstrip() for line in lines)


def _job_line(job: dict[str, Any]) -> str:
    when = job.get("finished_at") or job.get("started_at") or job.get("enqueued_at") or ""
    error = f"  {job['error']}" if job.get("error") else ""
    return (f"{job['id']:<40} {job.get('state', ''):<10} {job.get('actor', ''):<30} "
            f"attempt {job.get('attempt', 0)}  {when}{error}")


async def _list(args: argparse.Namespace, store: JobStore) -> int:
    jobs = await store.list_jobs(args.queue, args.state, args.limit, args.offset)
    if args.json:
        _print(jobs, True)
    else:
        for job in jobs:
            print(_job_line(job))
        print(f"({len(jobs)} {args.state} job(s) in {args.queue})")
    return 0


async def _show(args: argparse.Namespace, store: JobStore) -> int:
    job = await store.get(args.job_id)
    if job is None:
        raise NotFound(f"no job {args.job_id!r} (it may have been removed or trimmed); "
                       "`shopflow jobs list QUEUE --state STATE` lists the jobs")
    _print(job, True)
    return 0


async def _retry(args: argparse.Namespace, store: JobStore) -> int:
    await store.retry(args.job_id)
    print(f"job {args.job_id} is waiting again")
    return 0


async def _cancel(args: argparse.Namespace, store: JobStore) -> int:
    status = await store.cancel(args.job_id)
    print(f"job {args.job_id}: {'cancelled' if status == 'cancelled' else 'asked to stop'}")
    return 0


async def _remove(args: argparse.Namespace, store: JobStore) -> int:
    status = await store.remove(args.job_id)
    print(f"job {args.job_id}: {status}")
    return 0


async def _pause(args: argparse.Namespace, store: JobStore) -> int:
    changed = await store.pause(args.queue)
    print(f"queue {args.queue} paused" + ("" if changed else " (it already was)"))
    return 0


async def _resume(args: argparse.Namespace, store: JobStore) -> int:
    changed = await store.resume(args.queue)
    print(f"queue {args.queue} running" + ("" if changed else " (it was not paused)"))
    return 0


async def _dead(args: argparse.Namespace, store: JobStore) -> int:
    if args.empty:
        deleted = await store.empty_dead(args.queue)
        print(f"deleted {deleted} dead job(s)")
        return 0
    for queue in [args.queue] if args.queue else store.queues:
        for job in await store.list_jobs(queue, "dead", 500):
            print(_job_line(job) + (f"  ({job['reason']})" if job.get("reason") else ""))
    return 0


def _option(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"options look like name=value, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return name, value


async def _send(args: argparse.Namespace, store: JobStore) -> int:
    values = []
    for raw in args.args:
        try:
            values.append(json.loads(raw))
        except ValueError:
            values.append(raw)
    sent = await store.send(args.queue, args.actor, values, dict(args.option or []))
    word = "already there" if sent.duplicate else sent.state
    print(f"job {sent.job_id}: {word}")
    return 0


async def _watch(args: argparse.Namespace, store: JobStore) -> int:
    """Follow events (of one job, until it ends) for at most ``--timeout-s``."""
    try:
        async with asyncio.timeout(args.timeout_s):
            await _follow(store, args.job_id)
    except TimeoutError:
        if args.job_id is not None:
            print(f"job {args.job_id} did not end within {args.timeout_s} s", file=sys.stderr)
            return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


async def _follow(store: JobStore, job_id: str | None) -> None:
    """Print events as JSON lines; for one job, its state first, and stop when it ends.

    The stream position is taken before the job is read, so no event between
    the two is missed; the first line tells a caller the watch has begun.
    """
    since = await store.events_tail()
    if job_id is not None:
        job = await store.get(job_id)
        state = job["state"] if job is not None else None
        print(json.dumps({"job_id": job_id, "state": state}), flush=True)
        if state in ENDED_STATES:
            return
    async for event in store.events(since=since, job_id=job_id):
        print(json.dumps(event, default=str), flush=True)
        if job_id is not None and event.get("event") in ENDED_EVENTS:
            return


def _whole(raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least {minimum}, "
                                         f"got {raw!r}")
    return value


def _positive(raw: str) -> int:
    """``--limit``: 1 or more."""
    return _whole(raw, 1)


def _not_negative(raw: str) -> int:
    """``--offset``: 0 or more."""
    return _whole(raw, 0)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Plug ``shopflow jobs`` and its sub-commands into the command line."""
    def usage(args: argparse.Namespace, settings: Settings) -> int:
        parser.print_help()
        return 2

    parser = add_command(sub, "jobs", usage, "inspect and control jobs and queues",
                         "job history and control: counts, list, show, retry, cancel, "
                         "remove, pause, resume, dead letters, send, watch")
    jobs = parser.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")

    def cmd(name: str, action: Action, help_text: str,
            start: bool = False) -> argparse.ArgumentParser:
        return add_command(jobs, name, _run(action, start), help_text)

    q = cmd("queues", _queues, "each queue now and its totals since first use: sent, ended, ...")
    q.description = ("Print each queue now (paused, waiting, active, delayed) and its totals "
                     "since first use (sent, ended, and each way of ending). Once a queue is "
                     "idle, sent = ended.")
    q.add_argument("--json", action="store_true", help="print JSON")
    ls = cmd("list", _list, "jobs of one queue in one state")
    ls.add_argument("queue", choices=ALL_QUEUES)
    ls.add_argument("--state", choices=JOB_STATES, default="failed", help="default: failed")
    ls.add_argument("--limit", type=_positive, default=50, help="at most this many (50)")
    ls.add_argument("--offset", type=_not_negative, default=0,
                    help="skip this many first (0): the next page starts at offset + limit")
    ls.add_argument("--json", action="store_true", help="print JSON")
    show = cmd("show", _show, "one job: record, arguments, last events (JSON)")
    show.add_argument("job_id")
    for name, action, text in (
            ("retry", _retry, "run a failed, dead or cancelled job again"),
            ("cancel", _cancel, "cancel a waiting job, or ask a running one to stop"),
            ("remove", _remove, "delete a job that is not running")):
        cmd(name, action, text).add_argument("job_id")
    cmd("pause", _pause, "stop workers taking jobs of a queue (it still accepts jobs)"
        ).add_argument("queue", choices=ALL_QUEUES)
    cmd("resume", _resume, "let workers take jobs of a paused queue").add_argument(
        "queue", choices=ALL_QUEUES)
    dead = cmd("dead", _dead, "list the dead (quarantined) jobs, or --empty the dead sets")
    dead.add_argument("--queue", choices=ALL_QUEUES, help="only this queue")
    dead.add_argument("--empty", action="store_true", help="delete them")
    send = cmd("send", _send, "enqueue a job for a declared actor", start=True)
    send.add_argument("queue", choices=ALL_QUEUES)
    send.add_argument("actor")
    send.add_argument("args", nargs="*", help="arguments, each JSON (or a plain string)")
    send.add_argument("-o", "--option", type=_option, action="append",
                      help="a job option, name=value (JSON value), e.g. -o priority=5")
    watch = cmd("watch", _watch, "follow job events as JSON lines (one job, or all)")
    watch.add_argument("job_id", nargs="?", help="only this job: its state, then its events "
                       "until it ends")
    watch.add_argument("--timeout-s", type=seconds_arg, default=None,
                       help="stop after this long (exit 1 if the watched job has not ended)")
