"""Ready-made implementations of the :mod:`web.seams` Protocols for concerns already on main.

``create_app`` plugs them in (see docs/web.md, "Wiring"); each one is a thin
translation from a concern's own function to the JSON the API documents.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import dramatiq
import redis.asyncio as aioredis

from actors.agents.messages import MODERATE_REVIEW
from actors.housekeeping.schedules import shop_schedules
from runtime.errors import NotFound
from runtime.jobs.store import MAX_LIST, JobStore
from runtime.scheduling.overview import schedules_overview
from runtime.settings import Settings

JsonDict = dict[str, Any]


class ScheduleOverview:
    """:class:`web.seams.ScheduleView` over the scheduler's store in Redis."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    async def schedules(self) -> list[JsonDict]:
        """Built-in and repeatable schedules, each with ``next_run_at`` and ``last_run_at``."""
        views = await schedules_overview(
            self._redis, self._settings.namespace, shop_schedules(self._settings),
            datetime.now(UTC), self._settings.timezone)
        return [schedule_json(view) for view in views]


def schedule_json(view: JsonDict) -> JsonDict:
    """A :func:`runtime.scheduling.overview.schedule_view` dict with the API's summary fields."""
    next_runs = view.get("next_runs") or []
    last = view.get("last_run") or {}
    return {
        **view,
        "cron": view.get("describe", ""),
        "next_run_at": next_runs[0]["utc"] if next_runs else None,
        "last_run_at": last.get("started_at"),
    }


class BrokerModeration:
    """:class:`web.seams.ReviewModeration` that sends the agents' MODERATE_REVIEW message."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self._broker = broker

    async def request_moderation(self, review_id: int) -> None:
        """Enqueue the moderation (Dramatiq's enqueue blocks on Redis: run it off the loop)."""
        await asyncio.to_thread(MODERATE_REVIEW.send, self._broker, review_id)


class StoreJobsAdmin:
    """:class:`web.seams.JobsAdmin` over the job layer's :class:`JobStore`."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def queues(self) -> list[JsonDict]:
        return [c.as_json() for c in await self._store.counts()]

    async def list_jobs(self, state: str, queue: str | None, limit: int,
                        offset: int = 0) -> list[JsonDict]:
        """One queue's jobs, or every queue's merged (ended ones newest first), from ``offset``."""
        if queue is not None:
            return await self._store.list_jobs(queue, state, limit, offset)
        jobs: list[JsonDict] = []
        for name in self._store.queues:
            # The merged page's jobs are among each queue's first offset + limit.
            jobs.extend(await self._first_of(name, state, offset + limit))
        if state not in ("waiting", "delayed"):
            jobs.sort(key=lambda j: j.get("finished_at") or j.get("started_at") or "",
                      reverse=True)
        return jobs[offset:offset + limit]

    async def _first_of(self, queue: str, state: str, count: int) -> list[JsonDict]:
        """The first ``count`` jobs of one queue in ``state``, read a store page at a time."""
        jobs: list[JsonDict] = []
        while len(jobs) < count:
            want = min(MAX_LIST, count - len(jobs))
            page = await self._store.list_jobs(queue, state, want, len(jobs))
            jobs.extend(page)
            if len(page) < want:
                break
        return jobs

    async def get_job(self, job_id: str) -> JsonDict | None:
        return await self._store.get(job_id)

    async def retry_job(self, job_id: str) -> bool:
        try:
            await self._store.retry(job_id)
        except NotFound:
            return False
        return True

    async def remove_job(self, job_id: str) -> bool:
        try:
            await self._store.remove(job_id)
        except NotFound:
            return False
        return True

    async def cancel_job(self, job_id: str) -> str:
        return await self._store.cancel(job_id)

    async def pause_queue(self, queue: str) -> bool:
        return await self._store.pause(queue)

    async def resume_queue(self, queue: str) -> bool:
        return await self._store.resume(queue)

    async def empty_dead(self, queue: str | None) -> int:
        return await self._store.empty_dead(queue)

    async def send_job(self, queue: str, actor: str, args: list[Any],
                       options: JsonDict) -> JsonDict:
        sent = await self._store.send(queue, actor, args, options)
        return {"job_id": sent.job_id, "state": sent.state, "duplicate": sent.duplicate}
