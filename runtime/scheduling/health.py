"""The cron heartbeat and the health view of the scheduler.

A scheduled job writes ``<ns>:cron:heartbeat`` (the time it ran) with a
10-minute expiry every 5 minutes. The key is written by a *worker* running a
*scheduled* message, so a fresh heartbeat proves the whole path works:
scheduler elected, slot claimed, message sent, worker consuming. /health calls
:func:`scheduler_health`; a missing key means no heartbeat job ran for 10
minutes, so the scheduler (or the maintenance worker) is stale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from runtime.scheduling.store import Keys, SchedulerStore, text
from runtime.scheduling.triggers import require_aware

# The heartbeat key outlives two missed beats before it is gone.
DEFAULT_HEARTBEAT_TTL_S = 10 * 60
DEFAULT_HEARTBEAT_EVERY_S = 5 * 60
# The name of the schedule that writes the heartbeat (the shop's built-in one).
HEARTBEAT_SCHEDULE = "cron-heartbeat"


async def write_heartbeat(
    redis: aioredis.Redis, namespace: str, now: datetime,
    ttl_s: int = DEFAULT_HEARTBEAT_TTL_S,
) -> None:
    """Set the heartbeat key to ``now`` (ISO, UTC) with its expiry."""
    await redis.set(Keys(namespace).heartbeat, require_aware(now).isoformat(), ex=ttl_s)


@dataclass(frozen=True)
class SchedulerHealth:
    """A snapshot for /health: is cron alive, and who leads."""

    ok: bool
    heartbeat_at: datetime | None
    heartbeat_age_s: float | None
    leader: str | None
    lease_expires_at: datetime | None
    detail: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready form (ISO datetimes)."""
        out = asdict(self)
        for key in ("heartbeat_at", "lease_expires_at"):
            value = out[key]
            out[key] = value.isoformat() if value else None
        return out


async def scheduler_health(
    redis: aioredis.Redis, namespace: str, now: datetime,
    stale_after_s: int = DEFAULT_HEARTBEAT_TTL_S,
    heartbeat_schedule: str = HEARTBEAT_SCHEDULE,
) -> SchedulerHealth:
    """Stale when the heartbeat key is gone or older than ``stale_after_s``.

    A freshly deployed scheduler has not beaten yet: while the
    ``heartbeat_schedule`` was first seen less than ``stale_after_s`` ago the
    missing key counts as "starting", not stale. Works with any client
    (decoding responses or not). Also reports the lease holder (``None`` when
    no scheduler is running at all).
    """
    now = require_aware(now)
    store = SchedulerStore(redis, namespace)
    raw = text(await redis.get(Keys(namespace).heartbeat))
    lease = await store.lease()
    leader = lease.holder if lease.expires_at and lease.expires_at >= now else None
    beat = datetime.fromisoformat(raw) if raw else None
    age_s = (now - beat).total_seconds() if beat else None
    created = await store.created_at(heartbeat_schedule) if beat is None else None
    if beat is None and created is not None and (now - created).total_seconds() <= stale_after_s:
        detail = "ok"  # starting: the first heartbeat slot has not come yet
    elif beat is None:
        detail = f"no cron heartbeat in the last {stale_after_s}s"
    elif age_s is not None and age_s > stale_after_s:
        detail = f"last cron heartbeat {age_s:.0f}s ago"
    else:
        detail = "ok"
    if leader is None:
        detail += "; no scheduler holds the lease"
    return SchedulerHealth(
        ok=detail == "ok", heartbeat_at=beat, heartbeat_age_s=age_s, leader=leader,
        lease_expires_at=lease.expires_at, detail=detail,
    )
