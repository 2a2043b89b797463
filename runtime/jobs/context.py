"""The running job, as the job itself sees it: its id, its progress, cancellation.

Inside a Dramatiq actor, :func:`current_job` returns the job the calling
worker thread runs. A concern whose work happens in a pykka actor passes the
context along in its message explicitly (threads do not share it).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import redis

from runtime.errors import JobCancelled, ValidationError
from runtime.jobs.hooks import JobEvent, JobHooks
from runtime.jobs.script import JobKeys, JobScript

# Progress is a number or a small JSON object; bigger belongs in the job's result.
MAX_PROGRESS_BYTES = 4_096

_local = threading.local()


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

    @property
    def attempts_left(self) -> int:
        """Attempts after this one (0 on the last attempt)."""
        return max(0, self.max_attempts - self.attempt)

    def progress(self, value: Any) -> None:
        """Report progress (a number or a small JSON object); readers and subscribers see it."""
        text = progress_text(value)
        reply = self.script("progress", self.job_id, text)
        if self.hooks is not None and reply and reply[0] == "ok":
            self.hooks.emit(JobEvent("progress", self.job_id, self.queue, self.actor,
                                     self.attempt, {"progress": json.loads(text)}))

    def cancel_requested(self) -> bool:
        """Whether someone asked this job to stop (checked in Redis, from any process)."""
        return self.client.hget(self.keys.job(self.job_id), "cancel_requested") in (b"1", "1")

    def check_cancelled(self) -> None:
        """Raise JobCancelled if a stop was requested; call it between steps and clean up."""
        if self.cancel_requested():
            raise JobCancelled(f"job {self.job_id} was cancelled")


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
    """The job this worker thread is running, or None outside a job."""
    job: JobContext | None = getattr(_local, "job", None)
    return job


def enter_job(job: JobContext | None) -> None:
    """Set (or clear, with None) the current job of this thread (the middleware does this)."""
    _local.job = job
