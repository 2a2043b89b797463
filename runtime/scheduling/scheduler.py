"""The scheduler process: turns due slots into Dramatiq messages, one per slot.

Run any number of these against one Redis. Each tick (every
``tick_s``) an instance tries to take or renew the leader lease; standbys
stop there. The leader, for every schedule (built-in plus the repeatable
jobs stored in Redis, re-read each tick so additions need no restart):

1. lists the slots between the schedule's cursor and now,
2. applies the misfire policy (:func:`~runtime.scheduling.schedule.plan_due_slots`),
   logging and counting every missed or late slot,
3. claims each slot to run in one Lua call that also applies the overlap
   policy, and only then enqueues the message (with the schedule name and
   slot in its options, which the worker middleware uses to refuse
   duplicates and to record the outcome),
4. sends a queued slot once the previous run finished, and re-sends every
   claimed slot whose send was not recorded within ``resend_after_s`` (its
   sender died between the claim and the record, or the send failed).

Every message of a slot carries the job id ``sched:<name>:<slot_ms>``
(:func:`slot_job_id`), so the broker refuses a re-send while the first
message of the slot waits, runs or recently completed: a sender killed
after its send but before recording it causes no second message. (The
worker middleware's run guard still refuses any duplicate that gets
through, e.g. once the first run's job record is gone.)

A schedule far behind (more than ``MAX_DUE_SLOTS`` due slots: an
every-minute schedule after a long outage) is not walked slot by slot: its
cursor jumps to the newest due slot, so the misfire policy still yields one
catch-up run (or none), on one tick.

An optional :class:`SchedulerObserver` (the Prometheus metrics) is told about
missed and late slots and sees every schedule each tick.

Time is injected (``clock``), and :meth:`Scheduler.tick` takes ``now``, so the
whole protocol is tested with a simulated clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, Protocol

import dramatiq
from dramatiq.message import generate_unique_id
from redis.exceptions import RedisError

from runtime.errors import ShopflowError
from runtime.scheduling.schedule import Schedule, plan_due_slots
from runtime.scheduling.store import SchedulerStore, list_repeatables, to_ms
from runtime.scheduling.triggers import newest_slot_between, require_aware, slots_between

log = logging.getLogger(__name__)

# How often an instance wakes: renews the lease, fires due slots.
DEFAULT_TICK_S = 1.0
# A standby takes over this long after the leader's last renewal.
DEFAULT_LEASE_S = 15.0
# A claimed slot with no recorded send after this long is sent again.
DEFAULT_RESEND_AFTER_S = 30.0
# At most this many due slots are examined per schedule and tick (a scheduler down
# for a year behind an every-minute schedule must not stall the others); beyond it the
# cursor jumps to the newest due slot.
MAX_DUE_SLOTS = 10_000

Sender = Callable[[dramatiq.Message[Any]], Awaitable[None]]
Clock = Callable[[], datetime]


class SchedulerObserver(Protocol):
    """Told what the scheduler decided (metrics plug in here). Runs on the scheduler's loop."""

    def slots_missed(self, schedule: Schedule, count: int) -> None:
        """``count`` due slots were not run (misfire policy)."""
        ...

    def slot_late(self, schedule: Schedule) -> None:
        """A slot is sent after its misfire grace (a catch-up run)."""
        ...

    def schedule_seen(self, schedule: Schedule, now: datetime) -> None:
        """The leader looked at ``schedule`` this tick."""
        ...


def utc_now() -> datetime:
    """The real clock, aware UTC."""
    return datetime.now(UTC)


def default_instance_id() -> str:
    """host:pid:random, unique per process start, readable in ``shopflow schedules``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def slot_job_id(name: str, slot: datetime) -> str:
    """The job id of every message of one schedule's slot (the broker de-duplicates by it)."""
    return f"sched:{name}:{to_ms(slot)}"


def broker_sender(broker: dramatiq.Broker) -> Sender:
    """Send through ``broker`` on a thread (Dramatiq's Redis client is blocking)."""

    async def send(message: dramatiq.Message[Any]) -> None:
        await asyncio.to_thread(broker.enqueue, message)

    return send


@dataclass
class TickReport:
    """What one tick did: for tests, logs and ``--once``."""

    leader: bool
    sent: list[tuple[str, datetime]] = field(default_factory=list)
    skipped: list[tuple[str, datetime, str]] = field(default_factory=list)


class Scheduler:
    """One scheduler instance (active or standby). See the module docstring."""

    def __init__(
        self,
        store: SchedulerStore,
        sender: Sender,
        schedules: Sequence[Schedule],
        *,
        instance_id: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        tick_s: float = DEFAULT_TICK_S,
        resend_after_s: float = DEFAULT_RESEND_AFTER_S,
        clock: Clock = utc_now,
        load_repeatables: bool = True,
        observer: SchedulerObserver | None = None,
    ) -> None:
        if lease_s <= tick_s:
            raise ValueError("the lease must outlast a tick, or leadership flaps")
        self.store = store
        self.instance_id = instance_id or default_instance_id()
        self._send = sender
        self._builtin = list(schedules)
        self._lease_s = lease_s
        self._tick_s = tick_s
        self._resend_after_s = resend_after_s
        self._clock = clock
        self._load_repeatables = load_repeatables
        self._was_leader = False
        self._observer = observer

    async def schedules(self) -> list[Schedule]:
        """Built-in schedules plus the repeatable jobs stored in Redis now."""
        if not self._load_repeatables:
            return list(self._builtin)
        names = {s.name for s in self._builtin}
        extra = await list_repeatables(self.store.redis, self.store.keys.namespace)
        return self._builtin + [s for s in extra if s.name not in names]

    async def tick(self, now: datetime | None = None) -> TickReport:
        """One round: renew or take the lease, and if leading fire every due slot."""
        now = require_aware(now or self._clock())
        leader = await self.store.acquire_lease(self.instance_id, now, self._lease_s)
        if leader != self._was_leader:
            log.info("scheduler %s is now %s", self.instance_id,
                     "the leader" if leader else "a standby",
                     extra={"instance": self.instance_id})
            self._was_leader = leader
        report = TickReport(leader=leader)
        if not leader:
            return report
        for schedule in await self.schedules():
            try:
                await self._tick_schedule(schedule, now, report)
            except (ShopflowError, ValueError):
                # One broken schedule (bad data in a repeatable) must not stop the others;
                # Redis errors are not caught here: they end the tick.
                log.exception("schedule %s could not be processed", schedule.name,
                              extra={"schedule": schedule.name})
                await self.store.count(schedule.name, "errors")
        return report

    async def _tick_schedule(self, schedule: Schedule, now: datetime, report: TickReport) -> None:
        if self._observer is not None:
            self._observer.schedule_seen(schedule, now)
        state = await self.store.state(schedule.name)
        if state.cursor is None:
            await self.store.init_cursor(schedule.name, now)
            return
        due = list(islice(slots_between(schedule.trigger, state.cursor, now), MAX_DUE_SLOTS + 1))
        skipped_over = 0
        if len(due) > MAX_DUE_SLOTS:
            due, skipped_over = self._jump(schedule, state.cursor, due, now)
        if due:
            await self._fire_due(schedule, due, now, report, skipped_over)
        await self._send_deferred(schedule, now, report)

    @staticmethod
    def _jump(schedule: Schedule, cursor: datetime, due: list[datetime],
              now: datetime) -> tuple[list[datetime], int]:
        """Too many due slots to walk: keep the newest missed one and the on-time ones.

        Returns the slots to plan with and how many older missed slots were
        left out (at least that many: the walk stopped at the cap).
        """
        grace_from = now - timedelta(seconds=schedule.misfire_grace_s)
        on_time = list(islice(slots_between(schedule.trigger, max(cursor, grace_from), now),
                              MAX_DUE_SLOTS))
        newest_missed = (newest_slot_between(schedule.trigger, cursor, grace_from)
                         if grace_from > cursor else None)
        kept = ([newest_missed] if newest_missed is not None else []) + on_time
        skipped_over = max(MAX_DUE_SLOTS + 1 - len(kept), 0)
        log.warning("schedule %s is more than %d slots behind (cursor %s); jumping to %s",
                    schedule.name, MAX_DUE_SLOTS, cursor.isoformat(), kept[-1].isoformat(),
                    extra={"schedule": schedule.name})
        return kept, skipped_over

    async def _fire_due(
        self, schedule: Schedule, due: list[datetime], now: datetime, report: TickReport,
        skipped_over: int = 0,
    ) -> None:
        plan = plan_due_slots(due, now, schedule.misfire, schedule.misfire_grace_s)
        missed = len(plan.missed) + skipped_over
        if missed:
            log.warning(
                "schedule %s missed %s%d slot(s) from %s to %s; misfire policy %s",
                schedule.name, "at least " if skipped_over else "", missed,
                plan.missed[0].isoformat() if plan.missed else due[0].isoformat(),
                plan.missed[-1].isoformat() if plan.missed else due[0].isoformat(),
                schedule.misfire.value,
                extra={"schedule": schedule.name, "missed": missed},
            )
            await self.store.count(schedule.name, "missed", missed)
            if self._observer is not None:
                self._observer.slots_missed(schedule, missed)
            report.skipped.extend((schedule.name, s, "missed") for s in plan.missed)
        for slot in plan.run:
            if slot in plan.late:
                log.warning("schedule %s runs slot %s late, %.0fs after it was due",
                            schedule.name, slot.isoformat(), (now - slot).total_seconds(),
                            extra={"schedule": schedule.name})
                await self.store.count(schedule.name, "late")
                if self._observer is not None:
                    self._observer.slot_late(schedule)
            if not await self._fire(schedule, slot, now, report):
                return
        if not plan.run or due[-1] > plan.run[-1]:
            await self.store.claim(schedule, self.instance_id, now, due[-1], fire=False)

    async def _fire(
        self, schedule: Schedule, slot: datetime, now: datetime, report: TickReport
    ) -> bool:
        """Claim ``slot`` and send it if the overlap policy lets it; False if we lost the lead."""
        message = self._message(schedule, slot)
        outcome = await self.store.claim(
            schedule, self.instance_id, now, slot, fire=True, message_id=message.message_id
        )
        if outcome == "send":
            await self._deliver(schedule, slot, now, message, report)
        elif outcome in ("skipped-overlap", "queued"):
            log.info("schedule %s slot %s %s: the previous run is still going",
                     schedule.name, slot.isoformat(), outcome.replace("-", " "),
                     extra={"schedule": schedule.name})
            report.skipped.append((schedule.name, slot, outcome))
        elif outcome == "not-leader":
            log.warning("scheduler %s lost the lease mid-tick", self.instance_id)
            return False
        return True

    async def _send_deferred(self, schedule: Schedule, now: datetime, report: TickReport) -> None:
        """Re-send every claim whose send was not recorded in time, then send a queued slot
        whose turn came.

        Each slot returned is claimed again with the new message's id and a
        fresh time, so the loop ends: a slot is re-sent at most once a tick.
        """
        while True:
            message_id = generate_unique_id()
            outcome, slot = await self.store.next_deferred(
                schedule, self.instance_id, now, message_id, self._resend_after_s
            )
            if slot is None or outcome not in ("send", "resend"):
                return
            if outcome == "resend":
                log.warning("schedule %s slot %s was claimed but never recorded as sent; "
                            "sending it again (a duplicate is refused by the broker or the "
                            "worker)", schedule.name, slot.isoformat(),
                            extra={"schedule": schedule.name})
                await self.store.count(schedule.name, "resent")
            message = self._message(schedule, slot, message_id)
            await self._deliver(schedule, slot, now, message, report)

    async def _deliver(
        self, schedule: Schedule, slot: datetime, now: datetime,
        message: dramatiq.Message[Any], report: TickReport,
    ) -> None:
        await self._send(message)
        await self.store.mark_sent(schedule.name, slot, now, message.message_id)
        log.info("schedule %s slot %s sent to %s/%s", schedule.name, slot.isoformat(),
                 schedule.job.queue, schedule.job.actor,
                 extra={"schedule": schedule.name, "message_id": message.message_id})
        report.sent.append((schedule.name, slot))

    @staticmethod
    def _message(
        schedule: Schedule, slot: datetime, message_id: str | None = None
    ) -> dramatiq.Message[Any]:
        message = schedule.job.message(
            *schedule.args, sched_name=schedule.name, sched_slot=slot.isoformat(),
            sched_slot_ms=to_ms(slot), sched_source=schedule.source,
            job_id=slot_job_id(schedule.name, slot),
        )
        if message_id is not None:
            message = message.copy(message_id=message_id)
        return message

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set, then give the lease up so a standby takes over at once.

        A Redis error is logged and the next tick tries again: the process
        stays up while Redis restarts, and the lease it held simply expires.
        """
        log.info("scheduler %s starting (tick %.1fs, lease %.1fs)",
                 self.instance_id, self._tick_s, self._lease_s)
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except (RedisError, OSError) as exc:
                    log.error("scheduler tick failed: %s", exc, extra={"error": repr(exc)})
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self._tick_s)
                except TimeoutError:
                    pass
        finally:
            try:
                await self.store.release_lease(self.instance_id)
            except (RedisError, OSError) as exc:
                log.warning("could not release the scheduler lease: %s", exc)
            log.info("scheduler %s stopped", self.instance_id)
