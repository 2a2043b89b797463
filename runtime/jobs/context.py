"""The running job, as the job itself sees it: its id, its progress, cancellation, deadline.

Inside a Dramatiq actor, :func:`current_job` returns the job the calling
worker thread runs. Most concerns do their work in a pykka actor the thin
Dramatiq actor asks (another thread, or a task on the process's loop): the
job goes along. :meth:`runtime.supervision.Supervisor.ask` wraps the message
in a :class:`WithJob` envelope (:func:`carry`) when a job is current, and the
runtime's actors (:mod:`runtime.actor`) take it off and install the job
(:func:`job_scope`) while they handle the message, so ``current_job()`` works
in the actor's handler too, including in a coroutine it runs on the loop.

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


@dataclass(frozen=True)
class WithJob:
    """An actor message and the job it is handled for: the envelope of an ask (see module doc)."""

    message: Any
    job: JobContext


def carry(message: Any) -> Any:
    """``message`` in a :class:`WithJob` envelope if a job is current here, else as it is."""
    job = _current.get()
    return message if job is None else WithJob(message, job)


def unwrap(message: Any) -> tuple[Any, JobContext | None]:
    """The message an actor handles and the job it came with (None if it came without)."""
    if isinstance(message, WithJob):
        return message.message, message.job
    return message, None
