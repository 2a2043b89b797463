"""Per-job options: the names a producer may put on a message, checked when it is built.

A message carries its options in Dramatiq's ``options`` dict, so they survive
retries, redeliveries and other languages' producers. :func:`check_options`
is called wherever a message is built (``JobSpec.message``, the HTTP enqueue
endpoint, ``shopflow jobs send``) and again when any message is sent through a
``JobBroker`` (so Dramatiq's own ``actor.send_with_options`` is checked too):
an unknown name or a bad value raises :class:`~runtime.errors.ValidationError`
there, not later in a worker.

Options (all optional):

=================  ===========================================================
``job_id``         de-duplication key: a second send while the first job is
                   waiting, delayed, active or recently completed is a no-op
                   that returns the existing job
``attempts``       total attempts before the job fails for good (>= 1)
``backoff``        ``exponential`` (default) or ``fixed``
``backoff_ms``     first retry delay (exponential) or every delay (fixed)
``backoff_max_ms`` cap on an exponential delay
``jitter``         spread retry delays by up to +-25 % (default true)
``delay_ms``       run no earlier than this many ms from now (producer side)
``eta``            Dramatiq's spelling of a delay: run no earlier than this time
                   (ms since the epoch); turned into the delay when the message
                   is sent, never carried on the stored message
``priority``       -10 (background) .. 10 (urgent), default 0
``timeout_ms``     the job is interrupted after this long (Dramatiq's time limit)
``keep_completed`` how many completed jobs of the queue to keep (default 100)
``keep_failed``    how many failed jobs of the queue to keep (default 500)
``limit_key``      the key of the actor's per-key limits (e.g. ``customer:42``)
``dedup_s``        how long a completed ``job_id`` keeps blocking re-sends
``critical``       page on-call when the job fails for good
``correlation_id`` follows an order through every job it causes
=================  ===========================================================
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import ValidationError

PRIORITY_MIN = -10
PRIORITY_MAX = 10
# The original kept the last 100 completed and 500 failed jobs per queue (Bull's removeOn*).
DEFAULT_KEEP_COMPLETED = 100
DEFAULT_KEEP_FAILED = 500
# A completed job id blocks re-sends this long after it finished, even once trimmed.
DEFAULT_DEDUP_S = 24 * 3600
# Jitter spreads a retry delay over +-25 % so retries of one outage do not arrive together.
JITTER_FRACTION = 0.25
BACKOFF_KINDS = ("exponential", "fixed")
# Ids are keys in Redis and path segments in the HTTP API: keep them plain.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._\-]{0,199}$")
# Options the runtime's own parts put on messages; producers may pass them through.
RUNTIME_OPTIONS = frozenset({
    "sched_name", "sched_slot", "sched_slot_ms", "sched_source",  # runtime.scheduling
    "redis_message_id", "retries", "traceback", "time_limit", "eta",  # Dramatiq's own
    "job_id_explicit",  # runtime.jobs.broker, on a message already sent once
})


def _int_in(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"job option {name!r} must be a whole number, got {value!r}",
                                  field=name)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValidationError(f"job option {name!r} must be {bound}, got {value}", field=name)
        return value
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"job option {name!r} must be true or false, got {value!r}",
                              field=name)
    return value


def _text(pattern: re.Pattern[str] | None = None) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or not value or len(value) > 200:
            raise ValidationError(f"job option {name!r} must be a non-empty string of at most "
                                  f"200 characters", field=name)
        if pattern is not None and not pattern.match(value):
            raise ValidationError(f"job option {name!r} may hold letters, digits and : . _ - "
                                  f"only, got {value!r}", field=name)
        return value
    return check


def _backoff(name: str, value: Any) -> str:
    if value not in BACKOFF_KINDS:
        raise ValidationError(f"job option {name!r} must be one of {', '.join(BACKOFF_KINDS)}, "
                              f"got {value!r}", field=name)
    return str(value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "job_id": _text(_JOB_ID),
    "attempts": _int_in(1, 1000),
    "backoff": _backoff,
    "backoff_ms": _int_in(0, 7 * 24 * 3600 * 1000),
    "backoff_max_ms": _int_in(0, 7 * 24 * 3600 * 1000),
    "jitter": _bool,
    "delay_ms": _int_in(0, 366 * 24 * 3600 * 1000),
    "priority": _int_in(PRIORITY_MIN, PRIORITY_MAX),
    "timeout_ms": _int_in(1, 24 * 3600 * 1000),
    "keep_completed": _int_in(0, 100_000),
    "keep_failed": _int_in(0, 100_000),
    "limit_key": _text(_JOB_ID),
    "dedup_s": _int_in(0, 30 * 24 * 3600),
    "critical": _bool,
    "correlation_id": _text(),
}
JOB_OPTIONS = frozenset(_CHECKS)


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate producer options; return the message options (``delay_ms`` excluded).

    ``timeout_ms`` becomes Dramatiq's ``time_limit``. Raises ValidationError
    naming the first bad option.
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in RUNTIME_OPTIONS:
            out[name] = value
            continue
        check = _CHECKS.get(name)
        if check is None:
            raise ValidationError(
                f"unknown job option {name!r}; known: {', '.join(sorted(JOB_OPTIONS))}",
                field=name)
        out[name] = check(name, value)
    if "timeout_ms" in out:
        out["time_limit"] = out.pop("timeout_ms")
    out.pop("delay_ms", None)
    # Dramatiq's eta is a delay (delay_of reads it): left on the message, Dramatiq's worker
    # would park the job in its own memory and send it again, which de-duplication refuses.
    out.pop("eta", None)
    return out


def delay_of(options: Mapping[str, Any], now_ms: int | None = None) -> int | None:
    """The delay ``options`` ask for, in ms, or None for none.

    ``delay_ms`` wins; else Dramatiq's ``eta`` (a due time in ms since the
    epoch, as Dramatiq's own delayed messages carry it) becomes the delay from
    ``now_ms`` (default: now), 0 for a time already past. A non-number eta is
    a ValidationError.
    """
    if "delay_ms" in options:
        return int(_CHECKS["delay_ms"]("delay_ms", options["delay_ms"]))
    eta = options.get("eta")
    if eta is None:
        return None
    if isinstance(eta, bool) or not isinstance(eta, int | float):
        raise ValidationError(f"job option 'eta' must be a time in ms since the epoch, got "
                              f"{eta!r}", field="eta")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return max(0, int(eta) - now)


@dataclass(frozen=True)
class RetryPolicy:
    """How a job is retried: attempts and the delay before each retry."""

    attempts: int
    backoff: str = "exponential"
    backoff_ms: int = 2_000
    backoff_max_ms: int = 32_000
    jitter: bool = True

    def delay_ms(self, retries_so_far: int, unit_random: float = 0.5) -> int:
        """Delay before retry number ``retries_so_far + 1``.

        ``unit_random`` is a number in [0, 1) (a parameter so tests pass one);
        0.5 means no jitter.
        """
        if self.backoff == "fixed":
            base = self.backoff_ms
        else:
            base = min(self.backoff_ms * 2 ** min(retries_so_far, 30), self.backoff_max_ms)
        if self.jitter:
            base = int(base * (1 + JITTER_FRACTION * (2 * unit_random - 1)))
        return max(0, int(base))

    def as_json(self) -> str:
        """The policy as the job record keeps it: the stall sweep (jobs.lua) runs a stalled
        job again under it, without the actor's code at hand."""
        return json.dumps({"attempts": self.attempts, "backoff": self.backoff,
                           "backoff_ms": self.backoff_ms, "backoff_max_ms": self.backoff_max_ms,
                           "jitter": self.jitter}, separators=(",", ":"))

    def with_options(self, options: Mapping[str, Any]) -> RetryPolicy:
        """This policy overridden by an actor's or a message's options."""
        attempts = options.get("attempts")
        if attempts is None and options.get("max_retries") is not None:
            attempts = int(options["max_retries"]) + 1  # Dramatiq's spelling, kept for actors
        backoff_ms = int(options.get("backoff_ms", self.backoff_ms))
        # A base given without a cap gets the default ratio (16x), as the settings do.
        default_max = self.backoff_max_ms if "backoff_ms" not in options else 16 * backoff_ms
        return RetryPolicy(
            attempts=int(attempts if attempts is not None else self.attempts),
            backoff=str(options.get("backoff", self.backoff)),
            backoff_ms=backoff_ms,
            backoff_max_ms=int(options.get("backoff_max_ms", default_max)),
            jitter=bool(options.get("jitter", self.jitter)),
        )
