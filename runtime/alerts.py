"""Alerts that page once per incident and say when it is over.

An :class:`Alert` names a condition (``QueueBacklog`` for queue ``emails``).
Its fingerprint (name + identifying labels) keys an *incident* kept in Redis,
so every process on every host agrees on what is already open:

- :meth:`Alerter.fire` opens the incident if none is open and notifies: the
  on-call webhook (``ALERT_WEBHOOK_URL``, JSON in Alertmanager's webhook
  shape), the Redis Stream ``{namespace}:events:alerts`` the dashboard reads,
  and the log. While the incident stays open, firing again notifies nobody.
- :meth:`Alerter.resolve` closes an open incident and sends a resolve message.
- :func:`page_job_failed` pages (critical) for a job that failed for good;
  each job pages once, however often its failure is reported.

A page the webhook did not accept is retried on the next ``fire`` of the same
open incident, so an on-call webhook that was down still gets the page.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from runtime.loop import LoopBridge
from runtime.metrics import Metrics
from runtime.metrics_middleware import FailedJob
from runtime.settings import Settings

log = logging.getLogger(__name__)

# The dashboard keeps this many alert events (approximate trimming).
ALERT_STREAM_MAXLEN = 10_000
# A job that failed for good is remembered this long, so reporting it again does not re-page.
JOB_FAILED_MEMORY_S = 7 * 24 * 3600
# First pause between webhook attempts; doubles after each failed attempt.
WEBHOOK_BACKOFF_S = 0.5
# Name of the alert raised by page_job_failed.
JOB_FAILED_ALERT = "JobFailedForGood"


class Severity(str, Enum):
    """How urgent: ``critical`` wakes someone up, ``warning`` waits for office hours."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Alert:
    """A condition worth telling a human about.

    ``labels`` identify the incident (same labels, same incident); ``details``
    describe it now (how many jobs wait) and may change while it stays open.
    """

    name: str
    severity: Severity
    summary: str
    labels: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None

    @property
    def fingerprint(self) -> str:
        """A stable id of the incident: hash of the name and the sorted labels."""
        ident = json.dumps([self.name, sorted(self.labels.items())])
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


def incidents_key(namespace: str) -> str:
    """Redis hash fingerprint -> JSON of each open incident."""
    return f"{namespace}:alerts:incidents"


def alerts_stream(namespace: str) -> str:
    """The Redis Stream the dashboard reads alerts from."""
    return f"{namespace}:events:alerts"


def _iso(at_s: float) -> str:
    return datetime.fromtimestamp(at_s, UTC).isoformat().replace("+00:00", "Z")


class Alerter:
    """Opens and closes incidents and delivers their notifications (one event loop)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        metrics: Metrics | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._metrics = metrics
        self._session = session
        self._clock = clock
        self._key = incidents_key(settings.namespace)

    async def fire(self, alert: Alert) -> bool:
        """Report that ``alert``'s condition holds; True if this call paged.

        Opens the incident and notifies only if it was not open already (or
        its earlier page never reached the webhook).
        """
        now_s = self._clock()
        record: dict[str, Any] = {"name": alert.name, "severity": alert.severity.value, "summary": alert.summary,
                  "labels": dict(alert.labels), "details": dict(alert.details),
                  "started_at": _iso(now_s), "paged": False}
        record["attempted_s"] = now_s
        opened = await self._redis.hsetnx(self._key, alert.fingerprint, json.dumps(record))
        if not opened:
            raw = await self._redis.hget(self._key, alert.fingerprint)
            if raw is None:
                return False  # closed a moment ago
            record = json.loads(raw)
            if record.get("paged") or now_s - record.get("attempted_s", 0) < self._delivery_s():
                return False  # delivered, or another process is delivering it right now
            record["attempted_s"] = now_s
            await self._redis.hset(self._key, alert.fingerprint, json.dumps(record))
            log.info("retrying undelivered page", extra={"fingerprint": alert.fingerprint})
        paged = await self._notify(alert, "firing", record["started_at"], None)
        if paged:
            record["paged"] = True
            # Only mark it paged if it is still open (resolve may have run meanwhile).
            if await self._redis.hexists(self._key, alert.fingerprint):
                await self._redis.hset(self._key, alert.fingerprint, json.dumps(record))
        return paged

    def _delivery_s(self) -> float:
        """The longest one delivery can take: every attempt timing out, plus the pauses."""
        attempts = self._settings.alert_webhook_attempts
        pauses_s = float(WEBHOOK_BACKOFF_S * 2.0 ** attempts)
        return attempts * self._settings.alert_webhook_timeout_s + pauses_s

    async def resolve(self, alert: Alert) -> bool:
        """Report that ``alert``'s condition cleared; True if an open incident was closed.

        Exactly one caller wins the close (HGET+HDEL in one transaction), so the
        resolve message is sent once.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._key, alert.fingerprint)
            pipe.hdel(self._key, alert.fingerprint)
            raw, deleted = await pipe.execute()
        if not deleted or raw is None:
            return False
        record = json.loads(raw)
        await self._notify(alert, "resolved", record["started_at"], _iso(self._clock()))
        return True

    async def update(self, alert: Alert, firing: bool) -> bool:
        """Fire or resolve by a check's result; True if a notification went out."""
        return await (self.fire(alert) if firing else self.resolve(alert))

    async def open_incidents(self) -> dict[str, dict[str, Any]]:
        """Every open incident by fingerprint (for the dashboard and the CLI)."""
        raw = await self._redis.hgetall(self._key)
        return {_text(k): json.loads(v) for k, v in raw.items()}

    async def notify_once(self, alert: Alert, memory_s: int = JOB_FAILED_MEMORY_S) -> bool:
        """Notify about a one-off event (no resolve) unless it was notified already."""
        key = f"{self._settings.namespace}:alerts:once:{alert.fingerprint}"
        if not await self._redis.set(key, _iso(self._clock()), nx=True, ex=memory_s):
            return False
        paged = await self._notify(alert, "firing", _iso(self._clock()), None)
        if not paged:
            await self._redis.delete(key)  # let the next report try again
        return paged

    # --- delivery ---------------------------------------------------------------

    async def _notify(self, alert: Alert, status: str, started_at: str,
                      ended_at: str | None) -> bool:
        """Log it, add it to the alert stream, POST it to the webhook; True if delivered."""
        body = self._webhook_body(alert, status, started_at, ended_at)
        level = logging.INFO if status == "resolved" else (
            logging.ERROR if alert.severity is Severity.CRITICAL else logging.WARNING)
        log.log(level, "alert %s: %s", status, alert.summary,
                extra={"alert": alert.name, "severity": alert.severity.value, "status": status,
                       "fingerprint": alert.fingerprint, "labels": dict(alert.labels)})
        await self._redis.xadd(
            alerts_stream(self._settings.namespace),
            {"id": f"{alert.fingerprint}:{status}:{int(self._clock() * 1000)}",
             "type": f"alert.{status}", "payload": json.dumps(body["alerts"][0]),
             "correlation_id": alert.correlation_id or "", "at": _iso(self._clock())},
            maxlen=ALERT_STREAM_MAXLEN, approximate=True,
        )
        if self._metrics is not None:
            self._metrics.alerts.labels(alert.name, alert.severity.value, status).inc()
        if not self._settings.alert_webhook_url:
            return True  # the log and the dashboard are the on-call channel
        delivered = await self._post(body)
        if self._metrics is not None:
            self._metrics.alert_deliveries.labels("delivered" if delivered else "failed").inc()
        return delivered

    def _webhook_body(self, alert: Alert, status: str, started_at: str,
                      ended_at: str | None) -> dict[str, Any]:
        """Alertmanager's webhook shape, so existing on-call receivers understand it."""
        labels = {"alertname": alert.name, "severity": alert.severity.value, **alert.labels}
        item = {"status": status, "labels": labels,
                "annotations": {"summary": alert.summary,
                                "details": json.dumps(dict(alert.details), default=str)},
                "startsAt": started_at, "endsAt": ended_at or "0001-01-01T00:00:00Z",
                "fingerprint": alert.fingerprint}
        if alert.correlation_id:
            item["correlation_id"] = alert.correlation_id
        return {"version": "4", "receiver": "shopflow", "status": status,
                "groupKey": alert.fingerprint, "commonLabels": labels, "alerts": [item]}

    async def _post(self, body: dict[str, Any]) -> bool:
        """POST with a few retries; False (and logged) if the webhook never accepted it."""
        url = self._settings.alert_webhook_url or ""
        timeout = aiohttp.ClientTimeout(total=self._settings.alert_webhook_timeout_s)
        session = self._session or aiohttp.ClientSession(timeout=timeout)
        try:
            for attempt in range(self._settings.alert_webhook_attempts):
                if attempt:
                    await asyncio.sleep(WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
                try:
                    async with session.post(url, json=body, timeout=timeout) as resp:
                        if resp.status < 300:
                            return True
                        log.warning("alert webhook answered %s", resp.status,
                                    extra={"attempt": attempt + 1})
                except (TimeoutError, aiohttp.ClientError) as exc:
                    log.warning("alert webhook unreachable: %s", exc,
                                extra={"attempt": attempt + 1})
            log.error("alert webhook did not accept the notification",
                      extra={"attempts": self._settings.alert_webhook_attempts})
            return False
        finally:
            if self._session is None:
                await session.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def page_job_failed(
    alerter: Alerter,
    queue: str,
    actor: str,
    message_id: str,
    error: str | None,
    order_id: int | None = None,
    correlation_id: str | None = None,
) -> bool:
    """Page (critical) for a job that failed for good; True if this call paged.

    Each job pages once: the message id is part of the fingerprint and is
    remembered, so a redelivered failure report does not page again.
    """
    details: dict[str, Any] = {"message_id": message_id, "error": error}
    if order_id is not None:
        details["order_id"] = order_id
    alert = Alert(
        name=JOB_FAILED_ALERT, severity=Severity.CRITICAL,
        summary=f"{actor} on {queue} failed for good"
        + (f" (order {order_id})" if order_id is not None else "") + f": {error or 'no error'}",
        labels={"queue": queue, "actor": actor, "message_id": message_id},
        details=details, correlation_id=correlation_id,
    )
    return await alerter.notify_once(alert)


def job_failure_pager(
    alerter: Alerter, bridge: LoopBridge, order_id_of: Callable[[FailedJob], int | None] = (
        lambda job: None),
) -> Callable[[FailedJob], None]:
    """The ``on_failed_for_good`` callback of the metrics middleware, paging through ``alerter``.

    Runs on a Dramatiq consumer thread and waits for the page on the
    process's event loop (``bridge``).
    """

    def page(job: FailedJob) -> None:
        bridge.run(page_job_failed(alerter, job.queue, job.actor, job.message_id, job.error,
                                   order_id=order_id_of(job)))

    return page
