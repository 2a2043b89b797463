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

**Nothing the webhook refused is lost.** A notification (page, resolve, or
the page of a job that failed for good) that the webhook did not accept after
its attempts is kept in the Redis hash ``{namespace}:alerts:undelivered``,
one entry per incident, status and start (so it is kept once however often
it is reported), and :meth:`Alerter.deliver_pending` sends the kept ones
again, oldest first, each incident's in order: the queue monitor calls it on
every check (every 60 s), any process of any host can, and ``fire`` of an
open incident retries that incident's own. A later notification of an
incident that still has one waiting queues behind it, so a resolve never
overtakes its page. An entry is dropped, with an error logged, after
``UNDELIVERED_MAX_AGE_S``.

**Hysteresis.** With ``SHOPFLOW_ALERT_RESOLVE_AFTER_S`` > 0 an incident is
closed only by a ``resolve`` that comes that long after the first ``resolve``
of an unbroken run of them; a ``fire`` in between cancels the pending close.
A condition flapping at its threshold is therefore one incident: one page,
and one resolve message once it has really cleared. ``resolve(alert,
hold=False)`` skips the hold, for conditions that end with one event.

Threads (Dramatiq's, the stock-sync main thread) never wait for a
notification: :class:`AlertDispatcher` hands the work to the process's event
loop, keeps every future and logs every failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import aiohttp
import dramatiq
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
# Incident record field: when the first resolve of the current clear run came (epoch s).
CLEAR_SINCE = "clear_since_s"
# Compare-and-set rounds before an incident update gives way to a concurrent one.
CAS_ROUNDS = 5
# The argument name that marks a job's order id (page_job_failed puts it in the page).
ORDER_ID_ARG = "order_id"
# An undelivered notification is retried this long, then dropped with an error logged.
UNDELIVERED_MAX_AGE_S = 7 * 24 * 3600

# Atomically replace (or, with an empty new value, delete) a hash field still
# holding the value the caller read: KEYS[1] hash, ARGV field, expected, new.
_CAS_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


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


def undelivered_key(namespace: str) -> str:
    """Redis hash delivery id -> JSON of each notification the webhook has not accepted yet."""
    return f"{namespace}:alerts:undelivered"


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

        Opens the incident and notifies only if it was not open already. For
        an open incident it cancels a pending close (resolve hysteresis) and
        retries the incident's notifications the webhook has not accepted yet.
        """
        now_s = self._clock()
        record: dict[str, Any] = {
            "name": alert.name, "severity": alert.severity.value, "summary": alert.summary,
            "labels": dict(alert.labels), "details": dict(alert.details),
            "started_at": _iso(now_s)}
        opened = await self._redis.hsetnx(self._key, alert.fingerprint, json.dumps(record))
        if opened:
            return await self._notify(alert, "firing", record["started_at"], None)
        await self._cancel_close(alert.fingerprint)
        return bool(await self.deliver_pending(alert.fingerprint))

    async def _cancel_close(self, fingerprint: str) -> None:
        """For an open incident: forget a pending close (the condition holds again)."""
        for _ in range(CAS_ROUNDS):
            raw = await self._redis.hget(self._key, fingerprint)
            if raw is None:
                return  # closed a moment ago
            record: dict[str, Any] = json.loads(raw)
            if record.pop(CLEAR_SINCE, None) is None:
                return
            if await self._cas(fingerprint, raw, json.dumps(record)):
                return

    def max_delivery_s(self) -> float:
        """The longest one delivery can take: every attempt timing out, plus the pauses."""
        return self._delivery_s()

    def _delivery_s(self) -> float:
        attempts = self._settings.alert_webhook_attempts
        pauses_s = float(WEBHOOK_BACKOFF_S * 2.0 ** attempts)
        return attempts * self._settings.alert_webhook_timeout_s + pauses_s

    async def resolve(self, alert: Alert, *, hold: bool = True) -> bool:
        """Report that ``alert``'s condition cleared; True if an open incident was closed.

        With a resolve hysteresis (``alert_resolve_after_s``) the first call
        of a clear run only notes when it started; the incident closes on the
        first call at least that long after. ``hold=False`` closes at once:
        for a condition whose end is one event, not a measurement that may
        flap at a threshold (a FATAL program that runs again), where waiting
        for a second clear report would keep the incident open and swallow
        the next page. Exactly one caller wins the close (compare-and-delete
        in Redis), so the resolve message is sent once.
        """
        now_s = self._clock()
        hold_s = self._settings.alert_resolve_after_s if hold else 0.0
        for _ in range(CAS_ROUNDS):
            raw = await self._redis.hget(self._key, alert.fingerprint)
            if raw is None:
                return False
            record: dict[str, Any] = json.loads(raw)
            clear_since = record.get(CLEAR_SINCE)
            if hold_s > 0 and (clear_since is None or now_s - clear_since < hold_s):
                if clear_since is not None:
                    return False  # clear, but not for long enough yet
                record[CLEAR_SINCE] = now_s
                if await self._cas(alert.fingerprint, raw, json.dumps(record)):
                    return False
                continue
            if await self._cas(alert.fingerprint, raw, ""):
                await self._notify(alert, "resolved", record["started_at"], _iso(now_s))
                return True
        return False

    async def _cas(self, fingerprint: str, expected: bytes | str, new: str,
                   key: str | None = None) -> bool:
        """Set (or with ``new == ""`` delete) the incident (or a field of ``key``) if it
        still reads ``expected``."""
        done = await self._redis.eval(_CAS_SCRIPT, 1, key or self._key, fingerprint, expected,
                                      new)
        return bool(done)

    async def _change(self, fingerprint: str,
                      change: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        """Apply ``change`` to an open incident's record; False if it is not open."""
        for _ in range(CAS_ROUNDS):
            raw = await self._redis.hget(self._key, fingerprint)
            if raw is None:
                return False
            if await self._cas(fingerprint, raw, json.dumps(change(json.loads(raw)))):
                return True
        return False

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
        started_at = _iso(self._clock())
        if not await self._redis.set(key, started_at, nx=True, ex=memory_s):
            return False
        # Not delivered: kept and retried by deliver_pending (the event is not reported again).
        return await self._notify(alert, "firing", started_at, None)

    # --- delivery ---------------------------------------------------------------

    async def _notify(self, alert: Alert, status: str, started_at: str,
                      ended_at: str | None) -> bool:
        """Log it, add it to the alert stream, POST it to the webhook; True if delivered.

        Not delivered, it is kept for :meth:`deliver_pending`; while an earlier
        notification of the same incident waits there, this one queues behind it.
        """
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
        delivery_id = f"{alert.fingerprint}:{status}:{started_at}"
        if await self._pending_of(alert.fingerprint):
            await self._keep(delivery_id, alert.fingerprint, body)
            return delivery_id in await self.deliver_pending(alert.fingerprint)
        delivered = await self._post(body)
        self._count_delivery(delivered)
        if not delivered:
            await self._keep(delivery_id, alert.fingerprint, body)
        return delivered

    def _count_delivery(self, delivered: bool) -> None:
        if self._metrics is not None:
            self._metrics.alert_deliveries.labels("delivered" if delivered else "failed").inc()

    # --- notifications the webhook did not accept ---------------------------------

    async def _keep(self, delivery_id: str, fingerprint: str, body: dict[str, Any]) -> None:
        """Keep a refused notification for :meth:`deliver_pending` (once per delivery id).

        It is not tried again before one delivery's length has passed (the
        webhook just refused it, or another process may be posting it now).
        """
        now_s = self._clock()
        entry = {"fingerprint": fingerprint, "body": body, "queued_s": now_s,
                 "not_before_s": now_s + self._delivery_s(), "attempts": 1}
        if await self._redis.hsetnx(undelivered_key(self._settings.namespace), delivery_id,
                                    json.dumps(entry)):
            log.warning("alert notification %s kept for a later delivery", delivery_id,
                        extra={"fingerprint": fingerprint})

    async def _pending_of(self, fingerprint: str) -> bool:
        """Whether a notification of ``fingerprint`` still waits to be delivered."""
        raw = await self._redis.hgetall(undelivered_key(self._settings.namespace))
        return any(json.loads(v)["fingerprint"] == fingerprint for v in raw.values())

    async def undelivered(self) -> dict[str, dict[str, Any]]:
        """Every kept notification by delivery id (for the dashboard, the CLI and tests)."""
        raw = await self._redis.hgetall(undelivered_key(self._settings.namespace))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    async def deliver_pending(self, fingerprint: str | None = None) -> list[str]:
        """Send kept notifications again (only ``fingerprint``'s, if given); the ids delivered.

        Oldest first, and an incident's in order: one that is not due yet (tried
        less than a delivery's length ago, possibly by another process right
        now) holds back the later ones of its incident. Each is claimed in Redis
        for one delivery's length before it is posted, so two processes calling
        this at once do not both send it. The round stops at the first refusal
        (the webhook is still down): what is left waits for the next call.
        """
        key = undelivered_key(self._settings.namespace)
        raw_entries = await self._redis.hgetall(key)
        entries = sorted(((_text(k), _text(v), json.loads(v)) for k, v in raw_entries.items()),
                         key=lambda e: (e[2]["queued_s"], e[0]))
        delivered: list[str] = []
        held: set[str] = set()
        for delivery_id, raw, entry in entries:
            fp = entry["fingerprint"]
            if (fingerprint is not None and fp != fingerprint) or fp in held:
                continue
            now_s = self._clock()
            if now_s - entry["queued_s"] > UNDELIVERED_MAX_AGE_S:
                if await self._cas(delivery_id, raw, "", key=key):
                    log.error("alert notification %s was never accepted by the webhook; "
                              "dropped after %d attempts", delivery_id, entry["attempts"])
                continue
            claimed = json.dumps({**entry, "not_before_s": now_s + self._delivery_s(),
                                  "attempts": entry["attempts"] + 1})
            if entry["not_before_s"] > now_s or not await self._cas(delivery_id, raw, claimed,
                                                                    key=key):
                held.add(fp)  # not due, or another process took it first
                continue
            ok = await self._post(entry["body"])
            self._count_delivery(ok)
            if not ok:
                break  # the claim stays: tried again once a delivery's length has passed
            await self._cas(delivery_id, claimed, "", key=key)
            log.info("alert notification %s delivered on attempt %d", delivery_id,
                     entry["attempts"] + 1)
            delivered.append(delivery_id)
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


class AlertDispatcher:
    """Runs alert work on the process's event loop without making the calling thread wait.

    :meth:`submit` may be called from any thread (a Dramatiq worker thread, a
    daemon's main thread); it returns at once. Every future is kept until it
    finishes and every failure is logged with its traceback, so nothing is
    fire-and-forget. Work submitted under the same ``key`` runs in submission
    order (a fire is not overtaken by the resolve that follows it).
    :meth:`drain` (from a thread) and :meth:`drain_async` (on the loop) wait
    for what is pending, for a clean stop.
    """

    def __init__(self, bridge: LoopBridge) -> None:
        self._bridge = bridge
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._tails: dict[str, concurrent.futures.Future[Any]] = {}

    def submit(self, coro: Coroutine[Any, Any, Any], what: str,
               key: str | None = None) -> concurrent.futures.Future[Any]:
        """Schedule ``coro`` on the loop; ``what`` names it in the log if it fails."""
        with self._lock:
            previous = self._tails.get(key) if key is not None else None
            try:
                future = asyncio.run_coroutine_threadsafe(self._after(previous, coro),
                                                          self._bridge.loop)
            except BaseException:
                coro.close()
                raise
            self._pending.add(future)
            if key is not None:
                self._tails[key] = future
        future.add_done_callback(lambda done: self._finished(done, what, key))
        return future

    @staticmethod
    async def _after(previous: concurrent.futures.Future[Any] | None,
                     coro: Coroutine[Any, Any, Any]) -> Any:
        if previous is not None and not previous.done():
            await asyncio.wait([asyncio.wrap_future(previous)])
        return await coro

    def _finished(self, future: concurrent.futures.Future[Any], what: str,
                  key: str | None) -> None:
        with self._lock:
            self._pending.discard(future)
            if key is not None and self._tails.get(key) is future:
                del self._tails[key]
        if future.cancelled():
            log.warning("%s was cancelled before it finished", what)
        elif (exc := future.exception()) is not None:
            log.error("%s failed: %s", what, exc, exc_info=exc)

    def pending(self) -> int:
        """How many submitted notifications have not finished."""
        with self._lock:
            return len(self._pending)

    def drain(self, timeout_s: float) -> bool:
        """Wait (in a thread, not the loop's) until nothing is pending; False on timeout."""
        with self._lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout_s)
        return not not_done

    async def drain_async(self, timeout_s: float) -> bool:
        """Wait on the loop until nothing is pending; False on timeout."""
        with self._lock:
            pending = [asyncio.wrap_future(f) for f in self._pending]
        if not pending:
            return True
        _, not_done = await asyncio.wait(pending, timeout=timeout_s)
        return not not_done


def order_id_from_args(broker: dramatiq.Broker) -> Callable[[FailedJob], int | None]:
    """A failed job's order id: the argument its actor's function calls ``order_id``, if any.

    Actors take their order as ``def ...(order_id: int)``; the function
    signature says which positional argument it is, so no actor has to
    declare it twice.
    """

    def order_id_of(job: FailedJob) -> int | None:
        actor = broker.actors.get(job.actor)
        if actor is None:
            return None
        try:
            names = list(inspect.signature(actor.fn).parameters)
        except (TypeError, ValueError):
            return None
        if ORDER_ID_ARG not in names or names.index(ORDER_ID_ARG) >= len(job.args):
            return None
        value = job.args[names.index(ORDER_ID_ARG)]
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return order_id_of


class JobFailurePager:
    """The ``on_failed_for_good`` callback of the metrics middleware: pages, never blocks.

    Called on the Dramatiq thread that runs ``after_nack`` (in Dramatiq 2.2 the
    worker thread that ran the job); it hands the page to the process's event
    loop and returns, so a slow or unreachable webhook never holds up the
    jobs behind it. Failures of a page are logged by the dispatcher.
    """

    def __init__(self, alerter: Alerter, bridge: LoopBridge,
                 order_id_of: Callable[[FailedJob], int | None] = lambda job: None) -> None:
        self._alerter = alerter
        self._order_id_of = order_id_of
        self.dispatcher = AlertDispatcher(bridge)

    def __call__(self, job: FailedJob) -> None:
        """Dramatiq's thread: queue the page on the loop and return at once."""
        order_id = self._order_id_of(job)
        self.dispatcher.submit(
            page_job_failed(self._alerter, job.queue, job.actor, job.message_id, job.error,
                            order_id=order_id),
            what=f"page for job {job.message_id} ({job.actor})")

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait (from a thread) for pages still being delivered."""
        return self.dispatcher.drain(self._timeout(timeout_s))

    async def aclose(self) -> None:
        """On the loop at shutdown: let pages in flight finish (bounded by one delivery)."""
        if not await self.dispatcher.drain_async(self._timeout(None)):
            log.error("pages still undelivered at shutdown: %d", self.dispatcher.pending())

    def _timeout(self, timeout_s: float | None) -> float:
        return timeout_s if timeout_s is not None else self._alerter.max_delivery_s() + 1.0


def job_failure_pager(
    alerter: Alerter, bridge: LoopBridge,
    order_id_of: Callable[[FailedJob], int | None] = lambda job: None,
) -> JobFailurePager:
    """The ``on_failed_for_good`` callback of the metrics middleware, paging through ``alerter``.

    Runs on a Dramatiq thread and does not wait for the page: it is
    delivered on the process's event loop (``bridge``); see
    :class:`JobFailurePager`. ``order_id_of`` finds the job's order (e.g.
    :func:`order_id_from_args`), named in the page.
    """
    return JobFailurePager(alerter, bridge, order_id_of)
