"""In-process listeners for job lifecycle events, and the log line of each event.

The same events go to Redis (the ``jobs`` stream, written by jobs.lua with
the state change itself) for the dashboard, the notifier and other hosts.
Hooks are for code in the process where the event happened: the worker that
ran the job (active, progress, completed, retrying, failed, cancelled,
skipped), the keeper that found a stalled job (stalled, and failed or dead
when the sweep ended it), the producer (waiting, delayed), and whoever used
a :class:`~runtime.jobs.store.JobStore` to control it (cancelled,
cancel_requested, removed, progress). A hook's exception is logged and never
reaches the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("runtime.jobs.events")

EVENT_KINDS = ("waiting", "delayed", "active", "progress", "completed", "skipped", "failed",
               "retrying", "stalled", "dead", "cancel_requested", "cancelled", "removed")
# Events an operator wants in the log at INFO; the rest (one per job and step) are DEBUG.
_NOTABLE = frozenset({"failed", "retrying", "stalled", "dead", "cancel_requested", "cancelled",
                      "removed"})


@dataclass(frozen=True)
class JobEvent:
    """One lifecycle event of one job."""

    kind: str
    job_id: str
    queue: str
    actor: str
    attempt: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    # The job's arguments (for hooks that name the order a job is about).
    args: tuple[Any, ...] = ()


Hook = Callable[[JobEvent], None]


class JobHooks:
    """Listeners by event kind (None listens to all); safe to use from any thread."""

    def __init__(self) -> None:
        self._hooks: dict[str | None, list[Hook]] = {}
        self._lock = threading.Lock()

    def subscribe(self, kind: str | None, hook: Hook) -> Callable[[], None]:
        """Call ``hook`` for every event of ``kind``; returns a function that unsubscribes."""
        if kind is not None and kind not in EVENT_KINDS:
            raise ValueError(f"unknown job event {kind!r}; known: {', '.join(EVENT_KINDS)}")
        with self._lock:
            self._hooks.setdefault(kind, []).append(hook)

        def unsubscribe() -> None:
            with self._lock:
                self._hooks.get(kind, []).remove(hook)

        return unsubscribe

    def emit(self, event: JobEvent) -> None:
        """Log the event and call its listeners (in the calling thread)."""
        level = logging.INFO if event.kind in _NOTABLE else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "job %s %s", event.job_id, event.kind,
                    extra={"job_id": event.job_id, "queue": event.queue, "actor": event.actor,
                           "event": event.kind, "attempt": event.attempt,
                           "detail": event.detail})
        with self._lock:
            hooks = [*self._hooks.get(event.kind, ()), *self._hooks.get(None, ())]
        for hook in hooks:
            try:
                hook(event)
            except Exception:  # a listener's bug must not fail the job it listens to
                log.exception("job event hook %r failed on %s %s", hook, event.kind, event.job_id)
