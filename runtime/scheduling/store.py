"""Scheduler coordination in Redis: the leader lease, slot claims, run state, repeatables.

Nothing here lives in process memory, so any number of scheduler processes
on any number of hosts can share one Redis:

- The **lease** (``<ns>:sched:lease``) names the one active scheduler. Its
  expiry is an instant written by the holder from its own clock (so tests
  inject the clock); a standby takes the lease once that instant has passed.
- The **cursor** (``cursor_ms`` in ``<ns>:sched:state:<name>``) is the newest
  slot already decided for a schedule. A slot is claimed by a Lua script that
  checks, atomically, that the caller still holds the lease and that the slot
  is newer than the cursor, then moves the cursor. So even two schedulers
  that both believe they lead (a paused process, clock skew) cannot send one
  slot twice: the cursor is the fence.
- The **in-flight** key (``<ns>:sched:inflight:<name>``) holds the message id of
  the run still going; the overlap policy reads it in the same script.
- The **unsent claims** (``<ns>:sched:unsent:<name>``, a hash slot_ms ->
  ``claimed_ms|message_id``) hold every slot claimed to be sent whose send is
  not recorded yet. Claiming a slot adds it, recording the send of *that*
  message removes it, and any slot left there longer than the re-send delay
  (its sender died, or its send failed) is sent again. One entry per slot,
  not one "pending" field per schedule: a new leader claiming the next slots
  must not overwrite the dead leader's claim, or that slot is lost.
- The **run guard** (``<ns>:sched:run:<name>:<slot_ms>``) is set by the worker
  middleware: one message per slot runs, any duplicate is skipped.

Every function takes ``now`` explicitly where time matters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from runtime.errors import Conflict, NotFound, ValidationError
from runtime.fields import reject_unknown_fields
from runtime.scheduling.schedule import Schedule, validate_name
from runtime.scheduling.triggers import require_aware

log = logging.getLogger(__name__)
# Keys that only record history expire after this long.
RUN_GUARD_TTL_MS = 3 * 24 * 3600 * 1000


def text(value: str | bytes | None) -> str | None:
    """A Redis reply as ``str`` whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def text_map(raw: dict[Any, Any]) -> dict[str, str]:
    """A Redis hash reply with ``str`` keys and values, whatever the client."""
    return {str(text(k)): str(text(v)) for k, v in raw.items()}


def to_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime."""
    return int(require_aware(moment).timestamp() * 1000)


def from_ms(value: int | str | None) -> datetime | None:
    """The aware UTC datetime of epoch milliseconds (``None`` stays ``None``)."""
    if value is None or value == "":
        return None
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


@dataclass(frozen=True)
class Keys:
    """The Redis key names of one namespace's scheduler."""

    namespace: str

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:sched"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"

    @property
    def repeatables(self) -> str:
        return f"{self.prefix}:repeatables"

    @property
    def heartbeat(self) -> str:
        return f"{self.namespace}:cron:heartbeat"

    def state(self, name: str) -> str:
        return f"{self.prefix}:state:{name}"

    def stats(self, name: str) -> str:
        return f"{self.prefix}:stats:{name}"

    def inflight(self, name: str) -> str:
        return f"{self.prefix}:inflight:{name}"

    def queued(self, name: str) -> str:
        return f"{self.prefix}:queued:{name}"

    def unsent(self, name: str) -> str:
        return f"{self.prefix}:unsent:{name}"

    def run_guard(self, name: str, slot_ms: int) -> str:
        return f"{self.prefix}:run:{name}:{slot_ms}"


# KEYS: lease. ARGV: instance, now_ms, ttl_ms. Returns 1 if the caller holds the lease now.
_ACQUIRE = """
local holder = redis.call('HGET', KEYS[1], 'holder')
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_ms') or '0')
local now = tonumber(ARGV[2])
if holder and holder ~= ARGV[1] and expires >= now then return 0 end
if holder ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 'term', 1)
  redis.call('HSET', KEYS[1], 'since_ms', ARGV[2])
end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'expires_ms', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 20)
return 1
"""

# KEYS: lease. ARGV: instance. Gives the lease up so a standby takes over at once.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'expires_ms', 0)
  return 1
end
return 0
"""

_LEADER_CHECK = """
local holder = redis.call('HGET', KEYS[1], 'holder')
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_ms') or '0')
if holder ~= ARGV[1] or expires < tonumber(ARGV[2]) then return {'not-leader', ''} end
"""

# KEYS: lease, state, inflight, queued, stats, unsent.
# ARGV: instance, now_ms, slot_ms, action ('fire' | 'advance'), overlap, message_id,
#       inflight_ttl_ms.
# Moves the cursor to slot_ms if the caller leads and the slot is new; for 'fire' also
# applies the overlap policy. Under 'queue', a slot waits while a run is going *or* older
# slots still wait, so slots run in order even when the previous run finished just before
# this one came. A slot to send is added to the unsent claims (next to any other claim
# still unsent). Returns {outcome, slot_ms}.
_CLAIM = _LEADER_CHECK + """
local cursor = tonumber(redis.call('HGET', KEYS[2], 'cursor_ms') or '-1')
if tonumber(ARGV[3]) <= cursor then return {'stale', ''} end
redis.call('HSET', KEYS[2], 'cursor_ms', ARGV[3])
if ARGV[4] ~= 'fire' then return {'advanced', ARGV[3]} end
local running = redis.call('EXISTS', KEYS[3]) == 1
if ARGV[5] == 'queue' and (running or redis.call('LLEN', KEYS[4]) > 0) then
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('HINCRBY', KEYS[5], 'queued', 1)
  return {'queued', ARGV[3]}
end
if running and ARGV[5] == 'skip' then
  redis.call('HINCRBY', KEYS[5], 'skipped_overlap', 1)
  return {'skipped-overlap', ARGV[3]}
end
redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
redis.call('HSET', KEYS[6], ARGV[3], ARGV[2] .. '|' .. ARGV[6])
return {'send', ARGV[3]}
"""

# KEYS: lease, state, inflight, queued, unsent. ARGV: instance, now_ms, message_id,
# inflight_ttl_ms, resend_after_ms. Picks the next slot to send outside the normal claim:
# the oldest unsent claim older than the re-send delay ('resend': its sender died or its
# send failed; it is now claimed by message_id), else a queued slot once the previous run
# finished ('send'). Returns {outcome, slot_ms}.
_NEXT_DEFERRED = _LEADER_CHECK + """
local now = tonumber(ARGV[2])
local claims = redis.call('HGETALL', KEYS[5])
local oldest = nil
for i = 1, #claims, 2 do
  local claimed_at = tonumber(string.match(claims[i + 1], '^(%d+)|')) or 0
  if now - claimed_at > tonumber(ARGV[5])
     and (oldest == nil or tonumber(claims[i]) < tonumber(oldest)) then
    oldest = claims[i]
  end
end
if oldest then
  redis.call('HSET', KEYS[5], oldest, ARGV[2] .. '|' .. ARGV[3])
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  return {'resend', oldest}
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  local slot = redis.call('LPOP', KEYS[4])
  if slot then
    redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
    redis.call('HSET', KEYS[5], slot, ARGV[2] .. '|' .. ARGV[3])
    return {'send', slot}
  end
end
return {'none', ''}
"""

# KEYS: state, stats, unsent. ARGV: slot_ms, now_ms, message_id. Records that a slot's
# message is on the broker. Only the message the slot is claimed by settles its claim (a
# sender that was paused and records a send late, after the slot was claimed again for a
# re-send, leaves the re-send's claim in place).
_MARK_SENT = """
local claim = redis.call('HGET', KEYS[3], ARGV[1])
if claim and string.match(claim, '|(.+)$') == ARGV[3] then
  redis.call('HDEL', KEYS[3], ARGV[1])
  local sent = tonumber(redis.call('HGET', KEYS[1], 'sent_slot_ms') or '-1')
  if tonumber(ARGV[1]) > sent then redis.call('HSET', KEYS[1], 'sent_slot_ms', ARGV[1]) end
  redis.call('HSET', KEYS[1], 'sent_at_ms', ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'sent', 1)
return 1
"""


@dataclass(frozen=True)
class LeaseInfo:
    """Who leads, since when, until when (by the holder's clock), and the leadership term."""

    holder: str | None
    expires_at: datetime | None
    since: datetime | None
    term: int


@dataclass(frozen=True)
class ScheduleState:
    """What Redis knows about one schedule: cursor, last send, last run and its counters."""

    cursor: datetime | None
    sent_slot: datetime | None
    sent_at: datetime | None
    last_status: str | None
    last_slot: datetime | None
    last_started_at: datetime | None
    last_finished_at: datetime | None
    last_error: str | None
    last_result: str | None
    running: bool
    queued: int
    stats: dict[str, int]


def connect_redis(url: str) -> aioredis.Redis:
    """An async Redis client as this module expects it (responses decoded to ``str``)."""
    return aioredis.Redis.from_url(url, decode_responses=True)


class SchedulerStore:
    """The scheduler's Redis operations for one namespace.

    Works with clients that decode responses (:func:`connect_redis`) and ones that do not.
    """

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.keys = Keys(namespace)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._claim = redis.register_script(_CLAIM)
        self._next_deferred = redis.register_script(_NEXT_DEFERRED)
        self._mark_sent = redis.register_script(_MARK_SENT)

    async def acquire_lease(self, instance: str, now: datetime, ttl_s: float) -> bool:
        """Take or renew the lease; False while another live instance holds it."""
        got = await self._acquire(
            keys=[self.keys.lease], args=[instance, to_ms(now), int(ttl_s * 1000)]
        )
        return bool(got)

    async def release_lease(self, instance: str) -> bool:
        """Give the lease up (graceful stop) so a standby takes over on its next tick."""
        return bool(await self._release(keys=[self.keys.lease], args=[instance]))

    async def lease(self) -> LeaseInfo:
        """The current lease, as written by its holder."""
        raw = text_map(await self.redis.hgetall(self.keys.lease))
        return LeaseInfo(
            holder=raw.get("holder"), expires_at=from_ms(raw.get("expires_ms")),
            since=from_ms(raw.get("since_ms")), term=int(raw.get("term") or 0),
        )

    async def claim(
        self, schedule: Schedule, instance: str, now: datetime, slot: datetime,
        fire: bool, message_id: str = "",
    ) -> str:
        """Move the schedule's cursor to ``slot``; with ``fire``, also decide whether to send.

        Returns ``send``, ``skipped-overlap``, ``queued``, ``advanced``, ``stale``
        (the slot was already decided) or ``not-leader``.
        """
        name = schedule.name
        outcome, _ = await self._claim(
            keys=[self.keys.lease, self.keys.state(name), self.keys.inflight(name),
                  self.keys.queued(name), self.keys.stats(name), self.keys.unsent(name)],
            args=[instance, to_ms(now), to_ms(slot), "fire" if fire else "advance",
                  schedule.overlap.value, message_id, int(schedule.max_runtime_s * 1000)],
        )
        return str(text(outcome))

    async def next_deferred(
        self, schedule: Schedule, instance: str, now: datetime, message_id: str,
        resend_after_s: float,
    ) -> tuple[str, datetime | None]:
        """A slot to send now that the normal claim did not: ``resend`` (the oldest claim
        unsent for over ``resend_after_s``) or ``send`` (a queued slot), claimed by
        ``message_id``; ``none`` when there is neither."""
        name = schedule.name
        outcome, slot_ms = await self._next_deferred(
            keys=[self.keys.lease, self.keys.state(name), self.keys.inflight(name),
                  self.keys.queued(name), self.keys.unsent(name)],
            args=[instance, to_ms(now), message_id, int(schedule.max_runtime_s * 1000),
                  int(resend_after_s * 1000)],
        )
        return str(text(outcome)), from_ms(text(slot_ms) or None)

    async def mark_sent(self, name: str, slot: datetime, now: datetime, message_id: str) -> None:
        """Record that ``slot``'s message is on the broker (settles the slot's claim if
        ``message_id`` is the message it is claimed by)."""
        await self._mark_sent(
            keys=[self.keys.state(name), self.keys.stats(name), self.keys.unsent(name)],
            args=[to_ms(slot), to_ms(now), message_id],
        )

    async def unsent(self, name: str) -> list[datetime]:
        """The slots claimed to be sent whose send is not recorded (yet), oldest first."""
        raw = await self.redis.hkeys(self.keys.unsent(name))
        return sorted(datetime.fromtimestamp(int(str(text(v))) / 1000, tz=UTC) for v in raw)

    async def count(self, name: str, counter: str, amount: int = 1) -> None:
        """Add to one of a schedule's counters (missed, late, ...)."""
        if amount:
            await self.redis.hincrby(self.keys.stats(name), counter, amount)

    async def init_cursor(self, name: str, now: datetime) -> None:
        """Start a new schedule's cursor at ``now`` unless it has one: no backfill from the past.

        Also records when the schedule was first seen (``created_ms``), which
        lets /health tell "no heartbeat yet" from "heartbeat stopped".
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.keys.state(name), "cursor_ms", to_ms(now))
            pipe.hsetnx(self.keys.state(name), "created_ms", to_ms(now))
            await pipe.execute()

    async def reset(self, name: str, now: datetime) -> None:
        """Start ``name`` afresh at ``now``: forget its state, counters and queue, and set its
        cursor and first-seen time to ``now`` (one transaction)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.state(name), self.keys.stats(name), self.keys.queued(name),
                        self.keys.inflight(name), self.keys.unsent(name))
            pipe.hset(self.keys.state(name),
                      mapping={"cursor_ms": to_ms(now), "created_ms": to_ms(now)})
            await pipe.execute()

    async def created_at(self, name: str) -> datetime | None:
        """When the schedule was first seen by a scheduler (``None``: never)."""
        return from_ms(text(await self.redis.hget(self.keys.state(name), "created_ms")))

    async def state(self, name: str) -> ScheduleState:
        """Everything known about ``name`` (all fields ``None`` for a schedule never run)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.state(name))
            pipe.hgetall(self.keys.stats(name))
            pipe.exists(self.keys.inflight(name))
            pipe.llen(self.keys.queued(name))
            raw_state, raw_stats, running, queued = await pipe.execute()
        raw, stats = text_map(raw_state), text_map(raw_stats)
        return ScheduleState(
            cursor=from_ms(raw.get("cursor_ms")),
            sent_slot=from_ms(raw.get("sent_slot_ms")),
            sent_at=from_ms(raw.get("sent_at_ms")),
            last_status=raw.get("last_status"),
            last_slot=from_ms(raw.get("last_slot_ms")),
            last_started_at=from_ms(raw.get("last_started_at_ms")),
            last_finished_at=from_ms(raw.get("last_finished_at_ms")),
            last_error=raw.get("last_error") or None,
            last_result=raw.get("last_result") or None,
            running=bool(running),
            queued=int(queued),
            stats={k: int(v) for k, v in stats.items()},
        )

    async def forget(self, name: str) -> None:
        """Drop a schedule's state, counters and queue (after removing a repeatable)."""
        await self.redis.delete(
            self.keys.state(name), self.keys.stats(name), self.keys.queued(name),
            self.keys.inflight(name), self.keys.unsent(name),
        )


# --- repeatable jobs: the Python API (web/ exposes these over HTTP) ---


async def add_repeatable(
    redis: aioredis.Redis, namespace: str, schedule: Schedule, now: datetime,
    reserved_names: frozenset[str] = frozenset(), replace: bool = False,
) -> Schedule:
    """Store ``schedule`` as a repeatable job; running schedulers pick it up on their next tick.

    Its first slot is the first one after ``now`` (no backfill): a new job
    starts from a fresh state, whatever a job of the same name left behind (a
    scheduler tick that had read the list before a ``remove_repeatable`` can
    recreate the removed job's cursor; re-adding the name must not inherit it
    and fire a catch-up for the time in between). Only ``replace`` of a job
    that exists keeps its cursor, so replacing it neither re-runs nor skips a
    slot. A name in ``reserved_names`` (the built-in schedules) or, unless
    ``replace``, an existing repeatable's name is a :class:`Conflict`.
    """
    validate_name(schedule.name)
    if schedule.name in reserved_names:
        raise Conflict(f"{schedule.name!r} is a built-in schedule and cannot be replaced")
    keys = Keys(namespace)
    payload = json.dumps(schedule.to_json())
    if replace:
        new = bool(await redis.hset(keys.repeatables, schedule.name, payload))
    else:
        new = bool(await redis.hsetnx(keys.repeatables, schedule.name, payload))
        if not new:
            raise Conflict(f"a repeatable job named {schedule.name!r} already exists")
    store = SchedulerStore(redis, namespace)
    if new:
        await store.reset(schedule.name, now)
    else:
        await store.init_cursor(schedule.name, now)
    return Schedule.from_json(schedule.to_json())


async def list_repeatables(redis: aioredis.Redis, namespace: str) -> list[Schedule]:
    """Every stored repeatable job, by name. A corrupt entry is skipped with an error logged."""
    raw = text_map(await redis.hgetall(Keys(namespace).repeatables))
    out: list[Schedule] = []
    for name in sorted(raw):
        try:
            out.append(Schedule.from_json(json.loads(raw[name])))
        except (ValidationError, json.JSONDecodeError) as exc:
            log.error(
                "repeatable job %r is unreadable and is ignored: %s", name, exc
            )
    return out


async def get_repeatable(redis: aioredis.Redis, namespace: str, name: str) -> Schedule:
    """One repeatable job, or :class:`NotFound`."""
    raw = await redis.hget(Keys(namespace).repeatables, name)
    if raw is None:
        raise NotFound(f"no repeatable job named {name!r}")
    return Schedule.from_json(json.loads(raw))


async def remove_repeatable(redis: aioredis.Redis, namespace: str, name: str) -> bool:
    """Remove a repeatable job and its state; False if there was none by that name.

    A run already sent still runs; no further slot is sent.
    """
    removed = await redis.hdel(Keys(namespace).repeatables, name)
    if removed:
        await SchedulerStore(redis, namespace).forget(name)
    return bool(removed)


# What a repeatable job request may say; any other field is refused (runtime.fields).
REPEATABLE_FIELDS = ("name", "queue", "actor", "args", "cron", "timezone", "every_s", "misfire",
                     "overlap", "misfire_grace_s", "max_runtime_s")


def repeatable_from_request(data: Any, default_timezone: str) -> Schedule:
    """Build a repeatable schedule from untrusted JSON (an HTTP body), validating every field.

    Accepts ``name``, ``queue``, ``actor``, optional ``args`` (a list),
    ``cron`` + optional ``timezone`` or ``every_s``, and optional ``misfire``,
    ``overlap``, ``misfire_grace_s``, ``max_runtime_s``; nothing else.
    """
    if not isinstance(data, dict):
        raise ValidationError("expected a JSON object")
    reject_unknown_fields(data, REPEATABLE_FIELDS)
    if ("cron" in data) == ("every_s" in data):
        raise ValidationError("give exactly one of 'cron' or 'every_s'", field="cron")
    args = data.get("args", [])
    if not isinstance(args, list):
        raise ValidationError("'args' must be a list", field="args")
    if "cron" in data:
        trigger: dict[str, Any] = {
            "cron": data["cron"], "timezone": data.get("timezone") or default_timezone,
        }
        if not isinstance(trigger["cron"], str) or not isinstance(trigger["timezone"], str):
            raise ValidationError("'cron' and 'timezone' must be strings", field="cron")
    else:
        every = data["every_s"]
        if not isinstance(every, int) or isinstance(every, bool):
            raise ValidationError("'every_s' must be a whole number of seconds", field="every_s")
        trigger = {"every_s": every}
    for name in ("name", "queue", "actor"):
        if not isinstance(data.get(name), str):
            raise ValidationError(f"{name!r} must be a string", field=name)
    body = {k: data[k] for k in ("misfire", "overlap", "misfire_grace_s", "max_runtime_s")
            if k in data}
    return Schedule.from_json(
        {"name": data["name"], "queue": data["queue"], "actor": data["actor"], "args": args,
         "trigger": trigger, **body}
    )
