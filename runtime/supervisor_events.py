"""``shopflow supervisor-events``: supervisord event listener that raises alerts.

supervisord gives up on a program that keeps dying during its ``startsecs``
(after ``startretries``) and leaves it FATAL: it will not restart it again.
That must not be silent. This listener speaks supervisord's event listener
protocol on stdin/stdout (write ``READY``, read a header line and a payload
of ``len`` bytes, answer ``RESULT 2\\nOK`` or ``RESULT 4\\nFAIL``) and for

- ``PROCESS_STATE_FATAL``: logs at CRITICAL, XADDs an alert
  (``type=process.fatal``) to ``{namespace}:events:alerts``, counts
  ``shopflow_process_fatal_total{program}`` and **pages** (critical) through
  :class:`~runtime.alerts.Alerter` to ``ALERT_WEBHOOK_URL``: once per
  incident, however many FATAL events come. An incident is one *process*
  (supervisord's ``processname``, e.g. ``api-2`` of the ``api`` program
  run x4) on one host: each process of a program fails and recovers on its
  own. The metric stays labelled by program (bounded);
- ``PROCESS_STATE_RUNNING``: resolves that process's incident at once if one
  is open (someone restarted it; no resolve hysteresis: the process runs,
  which is a fact, not a reading that may flap), so its next FATAL pages
  again, however soon;
- ``PROCESS_STATE_EXITED`` with ``expected:0``: logs and XADDs a
  ``process.exited`` event to ``{namespace}:events:supervision`` (supervisord
  restarts it; the event makes the restart visible).

A Redis failure answers FAIL, so supervisord re-sends the event later
instead of losing the alert (the page is idempotent: one incident). A page
the webhook refuses waits in Redis for the alerter's next delivery round
(the queue monitor's check). stdout belongs to the protocol: logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol

import redis
import redis.asyncio as aioredis

from runtime.alerts import Alert, Alerter, Severity
from runtime.errors import TransientJobError
from runtime.loop import LoopBridge
from runtime.metrics import get_metrics
from runtime.settings import Settings
from runtime.tree import STREAM_MAXLEN, event_fields, stream_key

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, str]], None]
# The alert a FATAL process raises (one incident per process and host).
PROCESS_FATAL_ALERT = "ProcessFatal"


class FatalPager(Protocol):
    """Pages FATAL processes and resolves them when they run again (the listener's thread).

    ``program`` is supervisord's group (``api``), ``process`` the process of
    it the event is about (``api-2``; the same name for a program run once).
    """

    def fatal(self, program: str, process: str, info: dict[str, Any]) -> None:
        """supervisord gave up restarting ``process``."""
        ...

    def running(self, program: str, process: str, info: dict[str, Any]) -> None:
        """``process`` runs (again)."""
        ...


def fatal_alert(program: str, process: str, host: str,
                info: dict[str, Any] | None = None) -> Alert:
    """The incident of ``process`` (of ``program``) being FATAL on ``host``."""
    return Alert(PROCESS_FATAL_ALERT, Severity.CRITICAL,
                 f"supervisord gave up restarting {process} on {host} (FATAL); "
                 "it stays down until restarted by hand",
                 labels={"program": program, "process": process, "host": host},
                 details=dict(info or {}))


class AlertingFatalPager:
    """:class:`FatalPager` through :class:`~runtime.alerts.Alerter` on a loop of its own.

    The listener is a plain blocking loop on stdin, so the alerter (async)
    runs on a :class:`~runtime.loop.LoopBridge`; each event waits for its
    page (bounded by one delivery), then supervisord gets its answer.
    """

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self._settings = settings
        self._bridge = LoopBridge("supervisor-events").start()
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=5.0)
        self._metrics = get_metrics(settings)
        self._alerter = Alerter(settings, self._redis, self._metrics)
        self._timeout_s = self._alerter.max_delivery_s() + 10.0

    def fatal(self, program: str, process: str, info: dict[str, Any]) -> None:
        """Count it (by program) and page (once per incident of the process)."""
        self._metrics.process_fatal.labels(program).inc()
        alert = fatal_alert(program, process, _host(info), info)
        self._bridge.run(self._alerter.fire(alert), self._timeout_s)

    def running(self, program: str, process: str, info: dict[str, Any]) -> None:
        """Resolve the process's incident at once, if open (no hysteresis hold)."""
        alert = fatal_alert(program, process, _host(info))
        self._bridge.run(self._alerter.resolve(alert, hold=False), self._timeout_s)

    def close(self) -> None:
        """Close the Redis client and stop the loop."""
        self._bridge.run(self._redis.aclose(), 10.0)
        self._bridge.stop()


def parse_tokens(line: str) -> dict[str, str]:
    """``a:1 b:2`` → ``{"a": "1", "b": "2"}`` (supervisord's header and payload headers)."""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def handle_event(headers: dict[str, str], payload: str, publish: Publish,
                 pager: FatalPager | None = None) -> None:
    """Turn one supervisord event into a log line, a stream entry and, for FATAL, a page."""
    event_name = headers.get("eventname", "")
    body_header, _, body = payload.partition("\n")
    info: dict[str, Any] = parse_tokens(body_header)
    info["host"] = socket.gethostname()
    if body:
        info["data"] = body[-2000:]
    if event_name == "PROCESS_STATE_FATAL":
        log.critical("program %s is FATAL: supervisord gave up restarting it",
                     info.get("processname"), extra={"alert": info})
        publish("alerts", event_fields("process.fatal", info))
        if pager is not None:
            pager.fatal(_program(info), _process(info), info)
    elif event_name == "PROCESS_STATE_RUNNING":
        if pager is not None:
            pager.running(_program(info), _process(info), info)
    elif event_name == "PROCESS_STATE_EXITED" and info.get("expected") == "0":
        log.error("program %s exited unexpectedly; supervisord restarts it",
                  info.get("processname"), extra={"event": info})
        publish("supervision", event_fields("process.exited", info))


def _program(info: dict[str, Any]) -> str:
    """The program's name in supervisord.conf (bounded: a metric label and alert label)."""
    return str(info.get("groupname") or info.get("processname") or "unknown")


def _process(info: dict[str, Any]) -> str:
    """The process's own name (``api-2``): what an incident is about."""
    return str(info.get("processname") or info.get("groupname") or "unknown")


def _host(info: dict[str, Any]) -> str:
    return str(info.get("host") or socket.gethostname())


def serve(stdin: IO[str], stdout: IO[str], publish: Publish,
          pager: FatalPager | None = None) -> None:
    """The listener loop: until stdin closes (supervisord stopping)."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return
        headers = parse_tokens(line)
        payload = stdin.read(int(headers.get("len", "0")))
        try:
            handle_event(headers, payload, publish, pager)
        except (redis.RedisError, TransientJobError) as exc:
            # Redis away, or the page outlasted its bound: supervisord sends the event again.
            log.error("could not record supervisord event %s: %s", headers.get("eventname"), exc)
            stdout.write("RESULT 4\nFAIL")
        else:
            stdout.write("RESULT 2\nOK")
        stdout.flush()


def redis_publisher(settings: Settings) -> Publish:
    """XADD to ``{namespace}:events:{channel}`` on the settings' Redis (log only without one)."""
    redis_url = settings.redis_url
    if redis_url is None:
        log.warning("REDIS_URL is not set: supervisord events are only logged")
        return lambda channel, fields: None
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)

    def publish(channel: str, fields: dict[str, str]) -> None:
        client.xadd(stream_key(settings.namespace, channel), fields,  # type: ignore[arg-type]
                    maxlen=STREAM_MAXLEN, approximate=True)

    return publish


def _exit_ok(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def exit_ok_on_sigterm() -> None:
    """End this event listener with exit status 0 on SIGTERM (call in its main thread).

    supervisord stops its event listeners with SIGTERM whenever the tree stops.
    Killed by the signal, a listener shows as "terminated by SIGTERM", a WARN,
    in supervisord's log on every normal shutdown, which teaches operators to
    skip WARN lines. ``SystemExit`` unwinds the listener's loop instead, so its
    ``finally`` blocks run; supervisord re-sends an event left unanswered.
    """
    signal.signal(signal.SIGTERM, _exit_ok)


def cmd_supervisor_events(args: argparse.Namespace, settings: Settings) -> int:
    """Entry of ``shopflow supervisor-events`` (run by supervisord as an eventlistener)."""
    exit_ok_on_sigterm()
    pager = AlertingFatalPager(settings, settings.redis_url) if settings.redis_url else None
    try:
        serve(sys.stdin, sys.stdout, redis_publisher(settings), pager)
    finally:
        if pager is not None:
            pager.close()
    return 0
