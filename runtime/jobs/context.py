"""The running job, as the job itself sees it: its id, its progress, cancellation, deadline.

Inside a Dramatiq actor, :func:`current_job` returns the job the calling
worker thread runs. Most concerns do their work in a pykka actor the thin
Dramatiq actor asks (another thread, or a task on the process's loop): the
job goes along. :meth:`runtime.supervision.Supervisor.ask` wraps the message
in a :class:`WithJob` envelope (:func:`carry`) with the current job and the
ask's deadline, and the runtime's actors (:mod:`runtime.actor`) take it off
and install both (:func:`ask_scope`) while they handle the message, so
``current_job()`` works in the actor's handler too, including in a coroutine
it runs on the loop, and the handler is ended before its asker gives up
(:func:`ask_time_left_s`); a message whose asker has given up by the time the
actor takes it is not run at all.

The current job is a context variable, not a thread-local: each worker
thread has its own, and asyncio tasks and ``asyncio.to_thread`` take a copy
of their creator's, which is how the job reaches a handler's coroutine.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from runtime.errors import JobCancelled, ValidationError
from runtime.jobs.hooks import JobEvent, JobHooks
from runtime.jobs.script import JobKeys, JobScript

log = logging.getLogger(__name__)

# Progress is a number or a small JSON object; bigger belongs in the job's result.
MAX_PROGRESS_BYTES = 4_096

_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "shopflow_current_job", default=None)


@dataclass(frozen=True)
class JobContext:
    """One attempt of one job; safe to call from any thread."""

    job_id: str
    queue: str
    actor: str
    attempt: int
    max_attempts: int
    client: redis.Redis
    keys: JobKeys
    script: JobScript
    # The broker's hooks: progress is an event of the worker's process too.
    hooks: JobHooks | None = None
    # When the attempt's time limit (timeout_ms) interrupts it, on time.monotonic(); None: no limit.
    deadline_s: float | None = None
    # The run (the Redis message id) this attempt is: its progress is written only while
    # the job is still active with it ("" writes whatever the state, as an operator does).
    rid: str = ""

    @property
    def attempts_left(self) -> int:
        """Attempts after this one (0 on the last attempt)."""
        return max(0, self.max_attempts - self.attempt)

    def time_left_s(self) -> float | None:
        """Seconds until the attempt's time limit (0 once it passed), None without one.

        An actor bounds its own work by it: the worker thread that asked it is
        interrupted at the limit, and an answer after that is wasted.
        """
        if self.deadline_s is None:
            return None
        return max(0.0, self.deadline_s - time.monotonic())

    def progress(self, value: Any) -> bool:
        """Report progress (a number or a small JSON object); readers and subscribers see it.

        False, and nothing written, when the job is no longer running this attempt: an
        actor may outlive the attempt that asked it (the attempt timed out, its worker
        handed the job back at a stop, the stall sweep ran it again), and its late
        progress must not land on the job's next run or on a job that has ended.
        """
        text = progress_text(value)
        reply = self.script("progress", self.job_id, text, self.rid)
        if not reply or reply[0] != "ok":
            log.info("job %s: progress of a run the job has moved on from was not recorded "
                     "(%s)", self.job_id, " ".join(str(r) for r in reply or ()))
            return False
        if self.hooks is not None:
            self.hooks.emit(JobEvent("progress", self.job_id, self.queue, self.actor,
                                     self.attempt, {"progress": json.loads(text)}))
        return True

    def cancel_requested(self) -> bool:
        """Whether someone asked this job to stop (checked in Redis, from any process)."""
        return self.client.hget(self.keys.job(self.job_id), "cancel_requested") in (b"1", "1")

    def check_cancelled(self) -> None:
        """Raise JobCancelled if a stop was requested; call it between steps and clean up."""
        if self.cancel_requested():
            raise JobCancelled(f"job {self.job_id} was cancelled")

    async def progress_async(self, value: Any) -> bool:
        """:meth:`progress` for a coroutine on the loop (the Redis call runs off the loop)."""
        return await asyncio.to_thread(self.progress, value)

    async def check_cancelled_async(self) -> None:
        """:meth:`check_cancelled` for a coroutine on the loop (the Redis call runs off it)."""
        await asyncio.to_thread(self.check_cancelled)


def progress_text(value: Any) -> str:
    """``value`` as the JSON the job record stores; ValidationError if it is not small JSON."""
    if isinstance(value, bool) or not isinstance(value, int | float | dict | list | str):
        raise ValidationError(f"job progress must be a number or a JSON object, got {value!r}")
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"job progress is not JSON: {exc}") from None
    if len(text.encode()) > MAX_PROGRESS_BYTES:
        raise ValidationError(f"job progress is larger than {MAX_PROGRESS_BYTES} bytes")
    return text


def current_job() -> JobContext | None:
    """The job being run here (this worker thread, or the actor handling its message),
    or None outside a job."""
    return _current.get()


def enter_job(job: JobContext | None) -> None:
    """Set (or clear, with None) the current job of this thread (the middleware does this)."""
    _current.set(job)


async def checkpoint(progress: Any = None) -> None:
    """Between two steps of a concern's work, on the loop: report ``progress`` (if given)
    and raise JobCancelled if the job was asked to stop. Outside a job it does nothing, so
    the same code runs from a command line or a test."""
    job = _current.get()
    if job is None:
        return
    if progress is not None:
        await job.progress_async(progress)
    await job.check_cancelled_async()


@contextmanager
def job_scope(job: JobContext | None) -> Iterator[None]:
    """Make ``job`` the current job for the block (nothing changes for None)."""
    if job is None:
        yield
        return
    token = _current.set(job)
    try:
        yield
    finally:
        _current.reset(token)


# An actor ends its handler this long before its asker stops waiting, so the answer (an
# error, if it was cut) reaches the asker before the ask gives up on it...
ANSWER_MARGIN_S = 0.5
# ...or this share of the ask's whole timeout, if that is less (a short ask still runs).
ANSWER_MARGIN_SHARE = 0.1


def answer_by(deadline_s: float, timeout_s: float) -> float:
    """When an actor must answer an ask that gives up at ``deadline_s`` (``timeout_s`` after
    it was sent): the deadline less the answer's margin, on ``time.monotonic()``."""
    return deadline_s - min(ANSWER_MARGIN_S, timeout_s * ANSWER_MARGIN_SHARE)


@dataclass(frozen=True)
class WithJob:
    """An actor message with what its ask brings along: the envelope of an ask.

    ``job``: the job it is handled for (see module doc). ``deadline_s``: when the
    answer is due (:func:`answer_by`: the moment the asker stops waiting, counted
    from when it asked, less a margin), on ``time.monotonic()``. The message may
    wait in the actor's mailbox behind others first, so an actor must not start
    it once that moment has passed, and must end the handler by then
    (:func:`ask_time_left_s`); otherwise the asker gives up while the handler
    still runs, and its job is retried beside it.
    """

    message: Any
    job: JobContext | None
    deadline_s: float | None = None

    def time_left_s(self) -> float | None:
        """Seconds until the answer is due (0 once past), None without a deadline."""
        if self.deadline_s is None:
            return None
        return max(0.0, self.deadline_s - time.monotonic())


_ask_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "shopflow_ask_deadline", default=None)


def carry(message: Any, deadline_s: float | None = None) -> Any:
    """``message`` in a :class:`WithJob` envelope if a job is current here or the answer
    has a deadline (:func:`answer_by`), else as it is."""
    job = _current.get()
    if job is None and deadline_s is None:
        return message
    return WithJob(message, job, deadline_s)


def unwrap(message: Any) -> WithJob:
    """The envelope of an actor message (one without a job or deadline if it came bare)."""
    if isinstance(message, WithJob):
        return message
    return WithJob(message, None)


@contextmanager
def ask_scope(envelope: WithJob) -> Iterator[None]:
    """Handle ``envelope``'s message with its job current and its deadline known to
    :func:`ask_time_left_s`, for the block (the actor's handler runs in it)."""
    token = _ask_deadline.set(envelope.deadline_s)
    try:
        with job_scope(envelope.job):
            yield
    finally:
        _ask_deadline.reset(token)


def ask_time_left_s() -> float | None:
    """Seconds the message being handled here may still take before its answer is due
    (its asker stops waiting soon after; 0 once past), None outside an ask with a
    deadline. A handler is cut at it: its answer after that would reach nobody."""
    deadline_s = _ask_deadline.get()
    if deadline_s is None:
        return None
    return max(0.0, deadline_s - time.monotonic())
