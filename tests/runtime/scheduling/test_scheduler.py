"""The scheduler on a real Redis with a simulated clock: exactly once per slot, takeover,
misfire and overlap policies, repeatable jobs, re-send after a crash."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import pytest
import redis.asyncio as aioredis

from runtime.broker import QUEUE_ANALYTICS, QUEUE_MAINTENANCE, JobSpec, setup_broker
from runtime.errors import Conflict, ValidationError
from runtime.scheduling import (
    CronTrigger,
    IntervalTrigger,
    MisfirePolicy,
    OverlapPolicy,
    Schedule,
    Scheduler,
    SchedulerStore,
    add_repeatable,
    broker_sender,
    list_repeatables,
    remove_repeatable,
    repeatable_from_request,
    slots_between,
)
from runtime.scheduling.scheduler import Sender
from runtime.settings import Settings
from tests.runtime.scheduling.helpers import enqueued, slots_sent

JOB = JobSpec(QUEUE_MAINTENANCE, "tick_job")
# The simulated hour crosses New York's fall-back (01:00-02:00 EDT happens twice).
START = datetime(2024, 11, 3, 5, 2, 0, tzinfo=UTC)


@pytest.fixture
def broker(settings: Settings) -> dramatiq.Broker:
    return setup_broker(settings)


def make(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker,
    schedules: list[Schedule], name: str, **kwargs: Any,
) -> Scheduler:
    return Scheduler(SchedulerStore(redis_client, settings.namespace), broker_sender(broker),
                     schedules, instance_id=name, **kwargs)


def every(name: str, seconds: int, **kwargs: Any) -> Schedule:
    return Schedule(name, IntervalTrigger(seconds), JOB, **kwargs)


async def test_three_schedulers_one_hour_exactly_once_with_kill_and_stop(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    allow = OverlapPolicy.ALLOW  # no worker here finishes runs
    schedules = [
        every("every-5m", 300, overlap=allow),
        Schedule("ny-10m", CronTrigger.parse("*/10 * * * *", "America/New_York"), JOB,
                 overlap=allow),
        Schedule("ny-daily-0130", CronTrigger.parse("30 1 * * *", "America/New_York"), JOB,
                 overlap=allow),
        Schedule("report", CronTrigger.parse("45 1 * * *", "America/New_York"),
                 JobSpec(QUEUE_ANALYTICS, "report"), overlap=allow),
    ]
    instances = {n: make(redis_client, settings, broker, schedules, n) for n in ("a", "b", "c")}
    for s in schedules:  # the schedules exist from START on
        await SchedulerStore(redis_client, settings.namespace).init_cursor(s.name, START)
    alive = dict(instances)
    leaders: list[str] = []
    killed = stopped = None
    now, end, step = START, START + timedelta(hours=1), timedelta(seconds=10)
    while now <= end:
        order = sorted(alive, key=lambda n: hash((n, now)))  # a different order each step
        for name in order:
            report = await alive[name].tick(now)
            if report.leader and (not leaders or leaders[-1] != name):
                leaders.append(name)
        if killed is None and now >= START + timedelta(minutes=20):
            killed = leaders[-1]  # SIGKILL: it just stops, holding the lease
            del alive[killed]
        if stopped is None and now >= START + timedelta(minutes=40):
            stopped = leaders[-1]  # graceful stop: gives the lease up
            await alive.pop(stopped).store.release_lease(stopped)
        now += step

    assert len(leaders) == 3 and killed != stopped
    sent = slots_sent(settings, QUEUE_MAINTENANCE) + slots_sent(settings, QUEUE_ANALYTICS)
    expected = {
        (s.name, slot.isoformat())
        for s in schedules for slot in slots_between(s.trigger, START, now - step)
    }
    assert set(sent) == expected
    assert all(count == 1 for count in sent.values()), sent
    assert sum(1 for n, _ in sent if n == "every-5m") == 12
    assert sum(1 for n, _ in sent if n == "ny-10m") == 6
    assert [s for n, s in sent if n == "ny-daily-0130"] == ["2024-11-03T05:30:00+00:00"]
    # Fixed-time slots in the repeated hour run at the first 01:30 / 01:45 only.
    assert [s for n, s in sent if n == "report"] == ["2024-11-03T05:45:00+00:00"]
    lease = await SchedulerStore(redis_client, settings.namespace).lease()
    assert lease.term == 3


async def test_leadership_changing_every_step_still_sends_each_slot_once(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    """The lease expires before every step and two instances race for it concurrently; a
    paused ex-leader waking with a stale clock is refused by the claim script."""
    schedule = every("fenced", 60, overlap=OverlapPolicy.ALLOW)
    a = make(redis_client, settings, broker, [schedule], "a")
    b = make(redis_client, settings, broker, [schedule], "b")
    store = SchedulerStore(redis_client, settings.namespace)
    await store.init_cursor("fenced", START)
    now = START
    winners = set()
    for step in range(30):
        now += timedelta(seconds=20)
        await redis_client.hset(store.keys.lease, "expires_ms", 0)  # lease lapses
        pair = (a, b) if step % 2 else (b, a)
        reports = await asyncio.gather(*(s.tick(now) for s in pair))
        assert sum(r.leader for r in reports) == 1
        winner, loser = pair if reports[0].leader else pair[::-1]
        winners.add(winner.instance_id)
        # The loser, waking with a stale clock, changes nothing.
        assert (await loser.tick(now - timedelta(seconds=30))).leader is False
    sent = slots_sent(settings, QUEUE_MAINTENANCE)
    assert len(sent) == 10 and set(sent.values()) == {1}
    assert winners == {"a", "b"}


@pytest.mark.parametrize(("policy", "expected_runs", "missed"), [
    (MisfirePolicy.RUN_ONCE, ["2024-11-03T08:00:00+00:00"], 11),
    (MisfirePolicy.SKIP, [], 12),
])
async def test_misfire_after_a_three_hour_outage(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker,
    policy: MisfirePolicy, expected_runs: list[str], missed: int,
) -> None:
    schedule = every("quarterly", 900, misfire=policy)
    scheduler = make(redis_client, settings, broker, [schedule], "solo")
    await scheduler.tick(START)  # first sight: cursor starts now, no backfill
    assert enqueued(settings, QUEUE_MAINTENANCE) == []
    back = START + timedelta(hours=3, minutes=1)  # 05:15..08:00, all > 60 s late at 08:03
    report = await scheduler.tick(back)
    assert [s.isoformat() for _, s in report.sent] == expected_runs
    state = await scheduler.store.state("quarterly")
    assert state.stats.get("missed") == missed
    assert state.stats.get("late", 0) == len(expected_runs)  # the catch-up run is counted late
    assert state.cursor == datetime(2024, 11, 3, 8, 0, tzinfo=UTC)
    # Nothing more for the same span, and the next on-time slot runs normally.
    assert (await scheduler.tick(back)).sent == []
    await finish(scheduler.store.redis, scheduler.store, "quarterly")
    nxt = await scheduler.tick(datetime(2024, 11, 3, 8, 15, 5, tzinfo=UTC))
    assert [s.isoformat() for _, s in nxt.sent] == ["2024-11-03T08:15:00+00:00"]


async def test_a_slot_within_grace_is_sent_late_and_counted(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    schedule = every("graceful", 300, misfire_grace_s=120)
    scheduler = make(redis_client, settings, broker, [schedule], "solo")
    await scheduler.tick(START)
    report = await scheduler.tick(datetime(2024, 11, 3, 5, 6, 30, tzinfo=UTC))
    assert [s.isoformat() for _, s in report.sent] == ["2024-11-03T05:05:00+00:00"]


async def finish(redis_client: aioredis.Redis, store: SchedulerStore, name: str) -> None:
    """What the worker middleware does when a run ends: clear the in-flight marker."""
    await redis_client.delete(store.keys.inflight(name))


@pytest.mark.parametrize(("policy", "sent_while_running", "after_finish"), [
    (OverlapPolicy.SKIP, 1, 2),     # slot 2 skipped, slot 3 runs after the finish
    (OverlapPolicy.QUEUE, 1, 3),    # slot 2 waits, runs once the first finished
    (OverlapPolicy.ALLOW, 2, 3),
])
async def test_overlap_policies(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker,
    policy: OverlapPolicy, sent_while_running: int, after_finish: int,
) -> None:
    schedule = every("overlapping", 60, overlap=policy)
    scheduler = make(redis_client, settings, broker, [schedule], "solo")
    await scheduler.tick(START)
    t1 = datetime(2024, 11, 3, 5, 3, 1, tzinfo=UTC)
    await scheduler.tick(t1)  # slot 05:03 sent, its run "still going"
    await scheduler.tick(t1 + timedelta(minutes=1))  # slot 05:04 overlaps
    assert len(enqueued(settings, QUEUE_MAINTENANCE)) == sent_while_running
    await finish(redis_client, scheduler.store, "overlapping")
    if policy is OverlapPolicy.QUEUE:
        report = await scheduler.tick(t1 + timedelta(minutes=1, seconds=5))
        assert [s.isoformat() for _, s in report.sent] == ["2024-11-03T05:04:00+00:00"]
        await finish(redis_client, scheduler.store, "overlapping")
    await scheduler.tick(t1 + timedelta(minutes=2))  # slot 05:05, nothing running
    assert len(enqueued(settings, QUEUE_MAINTENANCE)) == after_finish
    stats = (await scheduler.store.state("overlapping")).stats
    if policy is OverlapPolicy.SKIP:
        assert stats["skipped_overlap"] == 1
    if policy is OverlapPolicy.QUEUE:
        assert stats["queued"] == 1


async def test_queue_policy_keeps_order_and_one_at_a_time(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    schedule = every("serial", 60, overlap=OverlapPolicy.QUEUE)
    scheduler = make(redis_client, settings, broker, [schedule], "solo")
    await scheduler.tick(START)
    now = START
    for _ in range(4):  # 05:03, 05:04 (queued), 05:05 (queued), 05:06 (queued)
        now += timedelta(minutes=1)
        await scheduler.tick(now)
    assert len(enqueued(settings, QUEUE_MAINTENANCE)) == 1
    order = []
    for _ in range(3):
        await finish(redis_client, scheduler.store, "serial")
        report = await scheduler.tick(now)
        assert len(report.sent) == 1
        order.append(report.sent[0][1].strftime("%H:%M"))
        assert (await scheduler.tick(now)).sent == []  # the new run is in flight
    assert order == ["05:04", "05:05", "05:06"]


async def test_a_claimed_but_unsent_slot_is_sent_again_after_the_sender_died(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    schedule = every("crashy", 300)
    store = SchedulerStore(redis_client, settings.namespace)
    await store.init_cursor("crashy", START)
    slot = datetime(2024, 11, 3, 5, 5, tzinfo=UTC)
    # Instance "dead" claimed the slot, then died before enqueueing it.
    assert await store.acquire_lease("dead", slot, 15)
    assert await store.claim(schedule, "dead", slot, slot, fire=True, message_id="m1") == "send"
    survivor = make(redis_client, settings, broker, [schedule], "survivor", resend_after_s=30)
    assert (await survivor.tick(slot + timedelta(seconds=10))).leader is False
    assert (await survivor.tick(slot + timedelta(seconds=20))).sent == []  # lease took over
    report = await survivor.tick(slot + timedelta(seconds=31))
    assert [s for _, s in report.sent] == [slot]
    assert (await survivor.tick(slot + timedelta(seconds=50))).sent == []
    assert slots_sent(settings, QUEUE_MAINTENANCE)[("crashy", slot.isoformat())] == 1


class Killed(BaseException):
    """SIGKILL of a scheduler in the middle of a tick: nothing after it runs."""


def killed_sender(broker: dramatiq.Broker, after_send: bool) -> Sender:
    """A sender whose process dies before the message reaches the broker, or right after
    (before the scheduler records the send)."""
    send = broker_sender(broker)

    async def die(message: dramatiq.Message[Any]) -> None:
        if after_send:
            await send(message)
        raise Killed

    return die


@pytest.mark.parametrize("after_send", [False, True], ids=["before-send", "after-send"])
async def test_a_dead_leaders_claim_is_neither_lost_nor_doubled_once_the_next_leader_claims_on(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker, after_send: bool
) -> None:
    """The leader claims a slot and is killed before its message is on the broker (or after,
    but before recording it). The survivor takes over and claims the next slots before the
    re-send delay has passed: the dead claim must still be sent once, and only once."""
    schedule = every("every-10s", 10, overlap=OverlapPolicy.ALLOW)
    store = SchedulerStore(redis_client, settings.namespace)
    await store.init_cursor(schedule.name, START)
    slot = START + timedelta(seconds=10)
    dead = Scheduler(store, killed_sender(broker, after_send), [schedule], instance_id="dead",
                     lease_s=15)
    with pytest.raises(Killed):
        await dead.tick(slot)
    assert await store.unsent(schedule.name) == [slot]
    survivor = make(redis_client, settings, broker, [schedule], "survivor", lease_s=15,
                    resend_after_s=30)
    now, leaders = slot, []
    while now < slot + timedelta(minutes=1):
        now += timedelta(seconds=5)
        leaders.append((await survivor.tick(now)).leader)
    assert leaders[0] is False and leaders[-1] is True  # took over after the lease lapsed
    sent = slots_sent(settings, QUEUE_MAINTENANCE)
    assert set(sent) == {(schedule.name, s.isoformat())
                         for s in slots_between(schedule.trigger, START, now)}
    assert set(sent.values()) == {1}, sent
    assert await store.unsent(schedule.name) == []
    assert (await store.state(schedule.name)).stats["resent"] == 1


async def test_repeatables_are_added_listed_removed_and_picked_up_live(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    builtin = every("builtin", 3600)
    scheduler = make(redis_client, settings, broker, [builtin], "solo")
    await scheduler.tick(START)
    body = {"name": "promo-mail", "queue": QUEUE_MAINTENANCE, "actor": "promo",
            "args": [42], "cron": "*/5 * * * *", "timezone": "Europe/London"}
    added = await add_repeatable(redis_client, settings.namespace,
                                 repeatable_from_request(body, "America/Sao_Paulo"), START,
                                 reserved_names=frozenset({"builtin"}))
    assert added.trigger.to_json() == {"cron": "*/5 * * * *", "timezone": "Europe/London"}
    assert [s.name for s in await list_repeatables(redis_client, settings.namespace)] == \
        ["promo-mail"]
    report = await scheduler.tick(START + timedelta(minutes=3, seconds=1))
    assert [(n, s.strftime("%H:%M")) for n, s in report.sent] == [("promo-mail", "05:05")]
    assert enqueued(settings, QUEUE_MAINTENANCE)[0].args == (42,)
    with pytest.raises(Conflict):
        await add_repeatable(redis_client, settings.namespace, added, START)
    with pytest.raises(Conflict):
        await add_repeatable(redis_client, settings.namespace,
                             Schedule("builtin", IntervalTrigger(60), JOB), START,
                             reserved_names=frozenset({"builtin"}))
    assert await remove_repeatable(redis_client, settings.namespace, "promo-mail")
    assert not await remove_repeatable(redis_client, settings.namespace, "promo-mail")
    report = await scheduler.tick(START + timedelta(minutes=10, seconds=1))
    assert report.sent == []


@pytest.mark.parametrize("body", [
    [], {"name": "x"}, {"name": "x", "queue": "maintenance", "actor": "a"},
    {"name": "x", "queue": "maintenance", "actor": "a", "cron": "* * *"},
    {"name": "x", "queue": "nope", "actor": "a", "every_s": 60},
    {"name": "bad name!", "queue": "maintenance", "actor": "a", "every_s": 60},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": "60"},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 0},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60, "overlap": "maybe"},
    {"name": "x", "queue": "maintenance", "actor": "a", "cron": "0 0 * * *",
     "timezone": "Nowhere/City"},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60, "args": "oops"},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 10**12},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60,
     "max_runtime_s": float("inf")},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60,
     "misfire_grace_s": float("nan")},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60, "max_runtime_s": 10**400},
    {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60, "max_runtime_s": 1e9},
])
def test_repeatable_requests_are_validated(body: Any) -> None:
    with pytest.raises(ValidationError):
        repeatable_from_request(body, "America/Sao_Paulo")


class BrokenTrigger(IntervalTrigger):
    def next_after(self, moment: datetime) -> datetime:
        raise ValueError("corrupt trigger")


async def test_one_broken_schedule_does_not_stop_the_others(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    broken = Schedule("broken", BrokenTrigger(60), JOB)
    fine = every("fine", 60)
    scheduler = make(redis_client, settings, broker, [broken, fine], "solo")
    await scheduler.tick(START)
    report = await scheduler.tick(START + timedelta(minutes=1, seconds=1))
    assert [n for n, _ in report.sent] == ["fine"]
    assert (await scheduler.store.state("broken")).stats["errors"] == 1


async def test_queue_policy_runs_slots_in_order_and_resends_a_dequeued_slot_whose_sender_died(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    """The previous run finishes just before a new slot while an older slot still waits: the
    older one runs first. A sender that dies right after dequeuing a slot loses nothing: the
    survivor re-sends it once the re-send delay passed."""
    schedule = every("in-order", 60, overlap=OverlapPolicy.QUEUE)
    scheduler = make(redis_client, settings, broker, [schedule], "first", resend_after_s=30)
    store = scheduler.store
    await scheduler.tick(START)
    await scheduler.tick(START + timedelta(minutes=1, seconds=1))  # 05:03 sent
    await scheduler.tick(START + timedelta(minutes=2, seconds=1))  # 05:04 queued
    await finish(redis_client, store, "in-order")  # 05:03 done just before 05:05 comes
    report = await scheduler.tick(START + timedelta(minutes=3, seconds=1))
    assert [s.strftime("%H:%M") for _, s in report.sent] == ["05:04"]  # not 05:05 first
    await finish(redis_client, store, "in-order")
    # "first" dies right after dequeuing the next slot (05:05), before sending it.
    dead_at = START + timedelta(minutes=3, seconds=2)
    outcome, slot = await store.next_deferred(schedule, "first", dead_at, "lost-msg", 30)
    assert (outcome, slot) == ("send", datetime(2024, 11, 3, 5, 5, tzinfo=UTC))
    survivor = make(redis_client, settings, broker, [schedule], "survivor", resend_after_s=30)
    await store.release_lease("first")
    resent = await survivor.tick(dead_at + timedelta(seconds=31))
    assert [s.strftime("%H:%M") for _, s in resent.sent] == ["05:05"]
    await finish(redis_client, store, "in-order")
    nxt = await survivor.tick(START + timedelta(minutes=4, seconds=1))
    assert [s.strftime("%H:%M") for _, s in nxt.sent] == ["05:06"]
    order = sorted(enqueued(settings, QUEUE_MAINTENANCE), key=lambda m: m.message_timestamp)
    assert [m.options["sched_slot"][11:16] for m in order] == ["05:03", "05:04", "05:05", "05:06"]


async def test_a_schedule_weeks_behind_runs_one_catch_up_on_one_tick(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    """An every-minute schedule whose scheduler was down for 15 days (21,600 slots, over the
    per-tick cap): one catch-up run, the cursor at the newest slot, nothing more after."""
    schedule = every("minutely", 60, overlap=OverlapPolicy.ALLOW)
    scheduler = make(redis_client, settings, broker, [schedule], "solo")
    await scheduler.tick(START)
    back = START + timedelta(days=15, seconds=30)
    report = await scheduler.tick(back)
    newest = datetime(2024, 11, 18, 5, 2, tzinfo=UTC)
    assert [s for _, s in report.sent] == [newest]
    for extra_s in (1, 2):
        assert (await scheduler.tick(back + timedelta(seconds=extra_s))).sent == []
    state = await scheduler.store.state("minutely")
    assert state.cursor == newest
    assert state.stats["missed"] >= 10_000
    assert len(enqueued(settings, QUEUE_MAINTENANCE)) == 1


async def test_a_re_added_repeatable_does_not_inherit_a_stale_cursor(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    """A tick that read the list before the job was removed recreates its cursor; adding the
    name again hours later starts afresh instead of firing a catch-up for the time between."""
    job = every("promo", 300)
    ns = settings.namespace
    scheduler = make(redis_client, settings, broker, [], "solo")
    await add_repeatable(redis_client, ns, job, START)
    assert await remove_repeatable(redis_client, ns, "promo")
    # The tick that had read the list before the removal goes on with the job.
    stale = make(redis_client, settings, broker, [job], "solo", load_repeatables=False)
    await stale.tick(START + timedelta(seconds=1))
    later = START + timedelta(hours=3)
    await add_repeatable(redis_client, ns, job, later)
    report = await scheduler.tick(later + timedelta(seconds=30))
    assert report.sent == [] and report.skipped == []
    state = await scheduler.store.state("promo")
    assert state.cursor == later and "missed" not in state.stats
    first = await scheduler.tick(datetime(2024, 11, 3, 8, 5, 1, tzinfo=UTC))
    assert [s.strftime("%H:%M") for _, s in first.sent] == ["08:05"]


async def test_replacing_a_repeatable_keeps_its_cursor(
    redis_client: aioredis.Redis, settings: Settings, broker: dramatiq.Broker
) -> None:
    ns = settings.namespace
    scheduler = make(redis_client, settings, broker, [], "solo")
    await add_repeatable(redis_client, ns, every("promo", 300), START)
    await scheduler.tick(START + timedelta(minutes=3, seconds=1))  # 05:05 sent
    await add_repeatable(redis_client, ns, every("promo", 600), START + timedelta(minutes=4),
                         replace=True)
    state = await scheduler.store.state("promo")
    assert state.cursor == datetime(2024, 11, 3, 5, 5, tzinfo=UTC)
    assert state.stats["sent"] == 1
