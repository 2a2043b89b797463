"""Limits that hold across every process and host: concurrency and rate, global or per key.

Declared on an actor (``declare_actor(..., limits=(Limit(...),))``, or the
shorthand ``concurrency=N``). The job's start script takes every limit of the
job atomically in Redis, or none; a job that cannot start waits a little in
its worker and is then handed back to its queue without using an attempt.

- ``Limit("reserve-stock", concurrency=5)``: at most 5 such jobs run at once,
  whatever the number of workers (the original reserved stock with 5).
- ``Limit("warehouse-api", rate=10, per_s=1.0)``: at most 10 starts a second.
- ``Limit("customer", concurrency=1, per_key=True)``: at most one job at once
  per value of the message's ``limit_key`` option (``customer:42``).

A concurrency slot is a lease: the worker's keeper renews it while the job
runs, so a worker that dies frees its slots after the lease instead of
holding them forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError


@dataclass(frozen=True)
class Limit:
    """One named limit; at least one of ``concurrency`` and ``rate`` is set."""

    name: str
    concurrency: int | None = None
    rate: int | None = None
    per_s: float = 1.0
    per_key: bool = False

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ConfigError(f"a limit needs a name without ':', got {self.name!r}")
        if not self.concurrency and not self.rate:
            raise ConfigError(f"limit {self.name!r} sets neither concurrency nor rate")
        if (self.concurrency or 0) < 0 or (self.rate or 0) < 0 or self.per_s <= 0:
            raise ConfigError(f"limit {self.name!r} has a negative bound or a zero window")

    def key_for(self, options: Mapping[str, Any]) -> str | None:
        """The Redis key suffix for one message; None when a per-key limit has no key."""
        if not self.per_key:
            return self.name
        key = options.get("limit_key")
        return f"{self.name}:{key}" if key else None


@dataclass(frozen=True)
class HeldLimit:
    """A limit as the start script takes it for one message."""

    key: str
    concurrency: int
    rate: int
    window_ms: int

    def as_json(self, lease_ms: int) -> dict[str, Any]:
        """The shape jobs.lua's ``take_limits`` reads."""
        return {"key": self.key, "concurrency": self.concurrency, "rate": self.rate,
                "window_ms": self.window_ms, "lease_ms": lease_ms}


def actor_limits(actor_name: str, actor_options: Mapping[str, Any]) -> tuple[Limit, ...]:
    """The limits an actor declared: ``limits=`` plus the ``concurrency=`` shorthand."""
    limits = tuple(actor_options.get("limits") or ())
    for limit in limits:
        if not isinstance(limit, Limit):
            raise ConfigError(f"actor {actor_name!r}: limits must be Limit objects, got {limit!r}")
    concurrency = actor_options.get("concurrency")
    if concurrency:
        limits = (Limit(actor_name, concurrency=int(concurrency)), *limits)
    return limits


def resolve(limits: Iterable[Limit], options: Mapping[str, Any]) -> list[HeldLimit]:
    """The limits that apply to one message (per-key limits need its ``limit_key``)."""
    held = []
    for limit in limits:
        key = limit.key_for(options)
        if key is not None:
            held.append(HeldLimit(key, limit.concurrency or 0, limit.rate or 0,
                                  max(1, int(limit.per_s * 1000))))
    return held
