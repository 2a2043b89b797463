"""The small interfaces the HTTP API calls for features other concerns own.

Jobs and queues, schedules, the supervision tree, recommendations, support
answers and review moderation are built by other concerns. The API talks to
them only through these Protocols, found in the app under the keys below, so
each can be plugged in by ``create_app`` (or by a test, with a stub) without
``web`` knowing their internals. A key left unset makes its endpoints answer
503 ``not_available`` with a message naming what is missing.

All methods are coroutines running on the api process's event loop; values
are plain JSON-able dicts (the OpenAPI document describes their fields).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

JsonDict = dict[str, Any]


class JobsAdmin(Protocol):
    """Queues and jobs, as the job layer keeps them (runtime/jobs, docs/jobs.md).

    Methods raise the runtime's errors (NotFound, Conflict, ValidationError,
    QueueFull), which the handlers translate to HTTP answers.
    """

    async def queues(self) -> list[JsonDict]:
        """One dict per queue: name, waiting (pending), active, delayed, failed, dead, paused."""

    async def list_jobs(self, state: str, queue: str | None, limit: int,
                        offset: int = 0) -> list[JsonDict]:
        """Jobs in ``state``: waiting ones in run order, ended ones newest first; the first
        ``offset`` of that order are skipped."""

    async def get_job(self, job_id: str) -> JsonDict | None:
        """One job with its history, or None."""

    async def retry_job(self, job_id: str) -> bool:
        """Enqueue a failed, dead or cancelled job again; False if there is no such job."""

    async def remove_job(self, job_id: str) -> bool:
        """Delete a job that is not running; False if there is no such job."""

    async def cancel_job(self, job_id: str) -> str:
        """``cancelled`` (it had not started) or ``requested`` (the running job will stop)."""

    async def pause_queue(self, queue: str) -> bool:
        """Stop workers taking jobs of ``queue``; True if it was running."""

    async def resume_queue(self, queue: str) -> bool:
        """Let workers take jobs of ``queue`` again; True if it was paused."""

    async def empty_dead(self, queue: str | None) -> int:
        """Delete the dead (quarantined) jobs of one queue or all; how many."""

    async def send_job(self, queue: str, actor: str, args: list[Any],
                       options: JsonDict) -> JsonDict:
        """Enqueue a job: {job_id, state, duplicate}.

        :class:`~runtime.errors.NotFound` if there is no queue ``queue`` (the
        API answers it as a bad body field), ValidationError for an undeclared
        actor or a bad option, QueueFull for a full queue.
        """


class ScheduleView(Protocol):
    """The cron schedules (issue: scheduling)."""

    async def schedules(self) -> list[JsonDict]:
        """One dict per schedule: name, cron, actor, next_run_at, last_run_at."""


class SupervisionView(Protocol):
    """The supervision tree of the processes (issue: supervision)."""

    async def tree(self) -> JsonDict:
        """The tree: {name, kind, alive, restarts, children: [...]}."""


class Recommender(Protocol):
    """Product recommendations (issue: agents)."""

    async def recommend(self, customer_id: int, limit: int) -> JsonDict:
        """{customer_id, source, items: [{product_id, name, reason}]}."""


class SupportDesk(Protocol):
    """Answers to customers' support questions (issue: agents)."""

    async def ask(self, customer_id: int, question: str) -> JsonDict:
        """{id, answer, source}: the answer, stored as a support interaction."""


class ReviewModeration(Protocol):
    """Starts the moderation of a submitted review (issue: agents)."""

    async def request_moderation(self, review_id: int) -> None:
        """Queue the review for moderation (idempotent per review)."""


JOBS_ADMIN = web.AppKey("jobs_admin", JobsAdmin)
SCHEDULES = web.AppKey("schedules", ScheduleView)
SUPERVISION = web.AppKey("supervision", SupervisionView)
RECOMMENDER = web.AppKey("recommender", Recommender)
SUPPORT_DESK = web.AppKey("support_desk", SupportDesk)
REVIEW_MODERATION = web.AppKey("review_moderation", ReviewModeration)
