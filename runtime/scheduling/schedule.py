"""What a schedule is, and the pure decision of which due slots to run.

A :class:`Schedule` names a trigger (when), a job (what: a Dramatiq actor
addressed by :class:`~runtime.broker.JobSpec`) and two policies:

- misfire: what to do with slots that were due while no scheduler ran
  (``run_once``, the default: run one catch-up for all of them; ``skip``:
  run none). Either way every missed slot is logged and counted.
- overlap: what to do when a slot comes while the schedule's previous run
  has not finished (``skip``, the default; ``queue``: run it after the
  current one; ``allow``: run it now, concurrently).

:func:`plan_due_slots` is the misfire decision as a pure function of the due
slots and "now", so it is tested without Redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from runtime.broker import ALL_QUEUES, JobSpec
from runtime.errors import ValidationError
from runtime.scheduling.triggers import CronTrigger, IntervalTrigger, trigger_from_json

# A slot that starts more than this late counts as missed (a scheduler was down).
DEFAULT_MISFIRE_GRACE_S = 60.0
# The longest a run may count as "still running" for the overlap policy, when the
# worker never reports back (it died). Above Dramatiq's 10-minute time limit.
DEFAULT_MAX_RUNTIME_S = 15 * 60
# Upper bound of the two policy durations: a week (they become Redis expiries in ms).
MAX_POLICY_S = 7 * 24 * 3600
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class MisfirePolicy(str, Enum):
    """What happens to slots missed while no scheduler was running."""

    RUN_ONCE = "run_once"
    SKIP = "skip"


class OverlapPolicy(str, Enum):
    """What happens to a slot while the schedule's previous run is still going."""

    SKIP = "skip"
    QUEUE = "queue"
    ALLOW = "allow"


@dataclass(frozen=True)
class Schedule:
    """One schedule: when, what, and its misfire and overlap policies."""

    name: str
    trigger: CronTrigger | IntervalTrigger
    job: JobSpec
    args: tuple[Any, ...] = ()
    misfire: MisfirePolicy = MisfirePolicy.RUN_ONCE
    overlap: OverlapPolicy = OverlapPolicy.SKIP
    misfire_grace_s: float = DEFAULT_MISFIRE_GRACE_S
    max_runtime_s: float = DEFAULT_MAX_RUNTIME_S
    # "builtin" for the shop's own schedules, "repeatable" for ones added at run time.
    source: str = field(default="builtin", compare=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.job.queue not in ALL_QUEUES:
            raise ValidationError(
                f"unknown queue {self.job.queue!r}; known: {', '.join(ALL_QUEUES)}", field="queue"
            )
        if not self.job.actor:
            raise ValidationError("a schedule needs an actor name", field="actor")
        # "not (a <= x <= b)" also refuses NaN, which every comparison fails.
        if not (0 <= self.misfire_grace_s <= MAX_POLICY_S
                and 0 < self.max_runtime_s <= MAX_POLICY_S):
            raise ValidationError(
                f"misfire_grace_s must be 0 to {MAX_POLICY_S} and max_runtime_s above 0 "
                f"and at most {MAX_POLICY_S}")

    def to_json(self) -> dict[str, Any]:
        """The JSON form a repeatable job is stored as."""
        return {
            "name": self.name,
            "trigger": self.trigger.to_json(),
            "queue": self.job.queue,
            "actor": self.job.actor,
            "args": list(self.args),
            "misfire": self.misfire.value,
            "overlap": self.overlap.value,
            "misfire_grace_s": self.misfire_grace_s,
            "max_runtime_s": self.max_runtime_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "repeatable") -> Schedule:
        """Rebuild a schedule from :meth:`to_json`; raises :class:`ValidationError` on bad data."""
        try:
            return cls(
                name=str(data["name"]),
                trigger=trigger_from_json(dict(data["trigger"])),
                job=JobSpec(str(data["queue"]), str(data["actor"])),
                args=tuple(data.get("args") or ()),
                misfire=MisfirePolicy(data.get("misfire", MisfirePolicy.RUN_ONCE.value)),
                overlap=OverlapPolicy(data.get("overlap", OverlapPolicy.SKIP.value)),
                misfire_grace_s=float(data.get("misfire_grace_s", DEFAULT_MISFIRE_GRACE_S)),
                max_runtime_s=float(data.get("max_runtime_s", DEFAULT_MAX_RUNTIME_S)),
                source=source,
            )
        except (KeyError, TypeError) as exc:
            raise ValidationError(f"malformed schedule: missing or bad {exc}") from None
        except (ValueError, OverflowError) as exc:
            raise ValidationError(f"malformed schedule: {exc}") from None


def validate_name(name: str) -> str:
    """Schedule names go into Redis keys: letters, digits and ``_ . : -``, at most 100."""
    if not _NAME.match(name):
        raise ValidationError(
            f"schedule name {name!r} must be 1-100 letters, digits or _ . : - "
            "and start with a letter or digit", field="name",
        )
    return name


@dataclass(frozen=True)
class SlotPlan:
    """The misfire decision for one schedule at one tick."""

    run: tuple[datetime, ...]
    missed: tuple[datetime, ...]  # due slots not run (skipped or folded into a catch-up run)
    late: tuple[datetime, ...]  # the slots of ``run`` that start past the grace period


def plan_due_slots(
    due: list[datetime], now: datetime, misfire: MisfirePolicy, grace_s: float
) -> SlotPlan:
    """Decide which of the ``due`` slots (in order, all <= now) to run.

    Slots within ``grace_s`` of ``now`` are on time and always run. Older ones
    were missed: with ``run_once`` the newest of them runs (unless an on-time
    slot runs anyway, which already does the catch-up), with ``skip`` none does.
    """
    on_time = [s for s in due if (now - s).total_seconds() <= grace_s]
    missed = [s for s in due if (now - s).total_seconds() > grace_s]
    if on_time or not missed or misfire is MisfirePolicy.SKIP:
        return SlotPlan(tuple(on_time), tuple(missed), ())
    catch_up = missed[-1]
    return SlotPlan((catch_up,), tuple(missed[:-1]), (catch_up,))
