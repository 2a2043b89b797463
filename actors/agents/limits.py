"""Limits shared by every process through Redis: rate, daily budget, circuit.

All state lives in Redis under the settings' namespace, so ten workers on
three hosts share one per-agent limit. Each check is one Lua script: the read
and the write happen atomically, and the clock is Redis's own (``TIME``), so
hosts with skewed clocks still agree.

- Rate: two token buckets per agent (requests/min, tokens/min) that refill
  continuously; a call takes one request and its estimated tokens, and is told
  how long to wait when either bucket is short.
- Budget: tokens used per agent per day of the shop's time zone; a call
  reserves its estimate up front and the reservation is corrected afterwards
  with the tokens the API reported.
- Circuit: consecutive failures per agent; at the threshold the agent skips
  the API until the counter expires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

# Bucket state outlives a quiet minute; after that a full bucket is the same as none.
_BUCKET_TTL_MS = 120_000
# A day's budget counter is kept a little past the day for inspection.
_BUDGET_TTL_S = 2 * 24 * 3600

# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm, cost tokens.
# Returns 0 when taken, else the milliseconds to wait before trying again.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl = tonumber(v[1])
  local ts = tonumber(v[2])
  if lvl == nil or ts == nil then return cap end
  return math.min(cap, lvl + (now - ts) * cap / 60000)
end
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local r = level(KEYS[1], rpm)
local k = level(KEYS[2], tpm)
-- a single call larger than a whole minute's tokens waits for a full bucket
local need = math.min(cost, tpm)
local wait = 0
if r < 1 then wait = math.max(wait, (1 - r) * 60000 / rpm) end
if k < need then wait = math.max(wait, (need - k) * 60000 / tpm) end
if wait > 0 then return math.max(1, math.ceil(wait)) end
redis.call('HSET', KEYS[1], 'level', tostring(r - 1), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], 'level', tostring(k - cost), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""

# KEYS: tokens bucket. ARGV: tpm, delta (positive gives tokens back).
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'level', 'ts')
local lvl = tonumber(v[1])
local ts = tonumber(v[2])
if lvl == nil or ts == nil then lvl = tpm else lvl = math.min(tpm, lvl + (now - ts) * tpm / 60000) end
lvl = math.min(tpm, lvl + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'level', tostring(lvl), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
"""

# KEYS: day counter. ARGV: limit, cost, ttl. Returns the new total, or -1 when over.
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[2])
if used + cost > tonumber(ARGV[1]) then return -1 end
local total = redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return total
"""


@dataclass(frozen=True)
class AgentLimits:
    """The limits of one agent."""

    requests_per_min: int
    tokens_per_min: int
    daily_tokens: int


class SharedLimits:
    """Rate buckets, daily budget and circuit of the agents, kept in Redis."""

    def __init__(self, redis: Redis, namespace: str, zone: ZoneInfo) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:agents"
        self._zone = zone
        self._take = redis.register_script(_TAKE)
        self._adjust = redis.register_script(_ADJUST)
        self._reserve = redis.register_script(_RESERVE)

    def _key(self, agent: str, *parts: str) -> str:
        return ":".join([self._prefix, agent, *parts])

    def day(self, now: datetime) -> str:
        """The budget day of ``now``: the calendar date in the shop's time zone."""
        return now.astimezone(self._zone).date().isoformat()

    async def take_rate(self, agent: str, limits: AgentLimits, tokens: int) -> int:
        """Take one request and ``tokens``; 0 if granted, else milliseconds to wait."""
        wait_ms = await self._take(
            keys=[self._key(agent, "rate", "req"), self._key(agent, "rate", "tok")],
            args=[limits.requests_per_min, limits.tokens_per_min, tokens, _BUCKET_TTL_MS],
        )
        return int(wait_ms)

    async def give_back_tokens(self, agent: str, limits: AgentLimits, tokens: int) -> None:
        """Correct the tokens bucket by ``tokens`` (negative when a call used more than taken)."""
        if tokens == 0:
            return
        await self._adjust(
            keys=[self._key(agent, "rate", "tok")],
            args=[limits.tokens_per_min, tokens, _BUCKET_TTL_MS],
        )

    async def reserve_budget(self, agent: str, limits: AgentLimits, now: datetime, tokens: int) -> bool:
        """Reserve ``tokens`` of today's budget; False (nothing reserved) when it would overrun."""
        total = await self._reserve(
            keys=[self._key(agent, "budget", self.day(now))],
            args=[limits.daily_tokens, tokens, _BUDGET_TTL_S],
        )
        return int(total) >= 0

    async def correct_budget(self, agent: str, now: datetime, delta_tokens: int) -> None:
        """Add ``delta_tokens`` (negative to give back) to the day's counter of ``now``."""
        if delta_tokens == 0:
            return
        key = self._key(agent, "budget", self.day(now))
        await self._redis.incrby(key, delta_tokens)

    async def budget_used(self, agent: str, now: datetime) -> int:
        """Tokens counted against the agent's budget on the day of ``now``."""
        raw = await self._redis.get(self._key(agent, "budget", self.day(now)))
        return int(raw or 0)

    async def circuit_open(self, agent: str, threshold: int) -> bool:
        """True when the agent failed ``threshold`` times in a row within the cooldown."""
        raw = await self._redis.get(self._key(agent, "circuit"))
        return int(raw or 0) >= threshold

    async def consecutive_failures(self, agent: str) -> int:
        """Failed calls in a row, as the circuit counts them (0 after a success or the cooldown)."""
        return int(await self._redis.get(self._key(agent, "circuit")) or 0)

    async def record_failure(self, agent: str, cooldown_s: int) -> int:
        """Count one more failure in a row; the count expires after the cooldown."""
        key = self._key(agent, "circuit")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, cooldown_s)
            count, _ = await pipe.execute()
        return int(count)

    async def record_success(self, agent: str) -> None:
        """A good answer closes the circuit."""
        await self._redis.delete(self._key(agent, "circuit"))
