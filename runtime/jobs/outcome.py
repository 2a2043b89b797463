"""How a job's attempt ended, as the middleware decided it and the consumer records it.

The worker thread decides (``JobsMiddleware.after_process_message``) and the
same thread's ack or nack records it (``JobConsumer``), in one script call
that also lets go of the message. The outcome rides on Dramatiq's message
proxy between the two, under a private attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dramatiq.broker import MessageProxy

# completed | skipped | failed | cancelled | retry | requeue | ack (let go, record nothing)
OUTCOME_KINDS = ("completed", "skipped", "failed", "cancelled", "retry", "requeue", "ack")
_ATTRIBUTE = "_shopflow_outcome"
_TALLY_ATTRIBUTE = "_shopflow_tally"


@dataclass(frozen=True)
class Outcome:
    """One attempt's end; ``new_*`` and ``eta_ms`` describe the next run of retry/requeue."""

    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    limit_keys: tuple[str, ...] = ()
    new_rid: str = ""
    new_message: str = ""
    eta_ms: int = 0
    priority: int = 0

    def __post_init__(self) -> None:
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"unknown job outcome {self.kind!r}")


def set_outcome(message: MessageProxy, outcome: Outcome) -> None:
    """Attach the attempt's outcome to the message being processed (worker thread)."""
    setattr(message, _ATTRIBUTE, outcome)


def peek_outcome(message: MessageProxy) -> Outcome | None:
    """The outcome attached so far, if any."""
    outcome = message.__dict__.get(_ATTRIBUTE)
    return outcome if isinstance(outcome, Outcome) else None


def take_outcome(message: MessageProxy) -> Outcome | None:
    """Detach and return the outcome (the consumer, when it finishes the job)."""
    outcome = message.__dict__.pop(_ATTRIBUTE, None)
    return outcome if isinstance(outcome, Outcome) else None


@dataclass(frozen=True)
class Tally:
    """Add one to ``field`` of the Redis hash ``key`` (expiring after ``ttl_s``) when the job
    is finished: a count another part of the runtime keeps next to the job's outcome.

    Middleware attaches it before the ack or nack (``add_tally``); the job consumer writes
    it in the same script call that records the outcome, instead of a round trip of its own.
    """

    key: str
    field: str
    ttl_s: int


def add_tally(message: MessageProxy, tally: Tally) -> None:
    """Ask for ``tally`` to be written with this attempt's finish (worker thread, before ack)."""
    setattr(message, _TALLY_ATTRIBUTE, tally)


def peek_tally(message: MessageProxy) -> Tally | None:
    """The tally attached so far, if any (kept until the finish went through)."""
    tally = message.__dict__.get(_TALLY_ATTRIBUTE)
    return tally if isinstance(tally, Tally) else None


def take_tally(message: MessageProxy) -> Tally | None:
    """Detach the tally: the job consumer when it writes it, or the middleware that asked for
    it, after the ack, when no consumer did (a broker that is not a JobBroker)."""
    tally = message.__dict__.pop(_TALLY_ATTRIBUTE, None)
    return tally if isinstance(tally, Tally) else None
