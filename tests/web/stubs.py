"""In-memory implementations of the web seams (the real ones live in other concerns)."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime.errors import NotFound

JsonDict = dict[str, Any]


class StubJobsAdmin:
    """Failed jobs in a dict; retry and remove move them out and record the call."""

    def __init__(self) -> None:
        self.jobs: dict[str, JsonDict] = {
            f"job-{n}": {"id": f"job-{n}", "queue": "emails", "actor": "send_email",
                         "state": "failed", "attempts": 3, "error": "SMTP timeout"}
            for n in (1, 2)
        }
        self.counts: dict[str, JsonDict] = {
            "emails": {"name": "emails", "pending": 3, "delayed": 0, "failed": 2, "dead": 0,
                       "processed_per_min": 12.0},
            "inventory": {"name": "inventory", "pending": 0, "delayed": 1, "failed": 0,
                          "dead": 0, "processed_per_min": 40.0},
        }
        self.retried: list[str] = []
        self.retried_event = asyncio.Event()

    async def queues(self) -> list[JsonDict]:
        return list(self.counts.values())

    async def list_jobs(self, state: str, queue: str | None, limit: int,
                        offset: int = 0) -> list[JsonDict]:
        return [j for j in self.jobs.values()
                if j["state"] == state and queue in (None, j["queue"])][offset:offset + limit]

    async def get_job(self, job_id: str) -> JsonDict | None:
        return self.jobs.get(job_id)

    async def retry_job(self, job_id: str) -> bool:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        self.retried.append(job_id)
        self.retried_event.set()
        return True

    async def remove_job(self, job_id: str) -> bool:
        return self.jobs.pop(job_id, None) is not None

    async def cancel_job(self, job_id: str) -> str:
        if job_id not in self.jobs:
            raise NotFound(f"no job {job_id!r}")
        self.jobs[job_id]["state"] = "cancelled"
        return "cancelled"

    async def pause_queue(self, queue: str) -> bool:
        was = bool(self._queue(queue).get("paused"))
        self.counts[queue]["paused"] = True
        return not was

    async def resume_queue(self, queue: str) -> bool:
        was = bool(self._queue(queue).get("paused"))
        self.counts[queue]["paused"] = False
        return was

    async def empty_dead(self, queue: str | None) -> int:
        dead = [j for j, job in self.jobs.items()
                if job["state"] == "dead" and queue in (None, job["queue"])]
        for job_id in dead:
            del self.jobs[job_id]
        return len(dead)

    async def send_job(self, queue: str, actor: str, args: list[Any],
                       options: JsonDict) -> JsonDict:
        self._queue(queue)
        job_id = str(options.get("job_id") or f"job-{len(self.jobs) + 1}")
        duplicate = job_id in self.jobs
        self.jobs.setdefault(job_id, {"id": job_id, "queue": queue, "actor": actor,
                                      "state": "waiting", "args": args})
        return {"job_id": job_id, "state": self.jobs[job_id]["state"], "duplicate": duplicate}

    def _queue(self, queue: str) -> JsonDict:
        if queue not in self.counts:
            raise NotFound(f"no queue {queue!r}")
        return self.counts[queue]


class StubSchedules:
    """One schedule; tests move ``next_run_at`` as a scheduler would."""

    def __init__(self) -> None:
        self.next_run_at = "2026-12-03T20:05:00+00:00"

    async def schedules(self) -> list[JsonDict]:
        return [{"name": "release-expired-reservations", "cron": "*/5 * * * *",
                 "next_run_at": self.next_run_at, "last_run_at": None}]


class StubSupervision:
    """A root and one child; tests raise ``restarts`` as a supervisor would."""

    def __init__(self) -> None:
        self.restarts = 2

    async def tree(self) -> JsonDict:
        return {"name": "api", "kind": "supervisor", "alive": True, "restarts": 0,
                "children": [{"name": "notifier", "kind": "actor", "alive": True,
                              "restarts": self.restarts, "children": []}]}


class StubRecommender:
    async def recommend(self, customer_id: int, limit: int) -> JsonDict:
        return {"customer_id": customer_id, "source": "offline-fallback",
                "items": [{"product_id": 1, "name": "Album", "reason": "popular"}][:limit]}


class StubSupportDesk:
    async def ask(self, customer_id: int, question: str) -> JsonDict:
        return {"id": 1, "answer": f"(offline) we got: {question[:20]}", "source": "offline"}


class StubModeration:
    def __init__(self) -> None:
        self.requested: list[int] = []

    async def request_moderation(self, review_id: int) -> None:
        self.requested.append(review_id)
