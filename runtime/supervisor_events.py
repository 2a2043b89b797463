"""``shopflow supervisor-events``: supervisord event listener that raises alerts.

supervisord gives up on a program that keeps dying during its ``startsecs``
(after ``startretries``) and leaves it FATAL: it will not restart it again.
That must not be silent. This listener speaks supervisord's event listener
protocol on stdin/stdout (write ``READY``, read a header line and a payload
of ``len`` bytes, answer ``RESULT 2\\nOK`` or ``RESULT 4\\nFAIL``) and for

- ``PROCESS_STATE_FATAL``: logs at CRITICAL and XADDs an alert
  (``type=process.fatal``) to ``{namespace}:events:alerts``;
- ``PROCESS_STATE_EXITED`` with ``expected:0``: logs and XADDs a
  ``process.exited`` event to ``{namespace}:events:supervision`` (supervisord
  restarts it; the event makes the restart visible).

A Redis failure answers FAIL, so supervisord re-sends the event later
instead of losing the alert. stdout belongs to the protocol: logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from typing import IO, Any

import redis

from runtime.settings import Settings
from runtime.tree import STREAM_MAXLEN, event_fields, stream_key

log = logging.getLogger(__name__)

Publish = Callable[[str, dict[str, str]], None]


def parse_tokens(line: str) -> dict[str, str]:
    """``a:1 b:2`` → ``{"a": "1", "b": "2"}`` (supervisord's header and payload headers)."""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def handle_event(headers: dict[str, str], payload: str, publish: Publish) -> None:
    """Turn one supervisord event into a log line and a stream entry."""
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
    elif event_name == "PROCESS_STATE_EXITED" and info.get("expected") == "0":
        log.error("program %s exited unexpectedly; supervisord restarts it",
                  info.get("processname"), extra={"event": info})
        publish("supervision", event_fields("process.exited", info))


def serve(stdin: IO[str], stdout: IO[str], publish: Publish) -> None:
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
            handle_event(headers, payload, publish)
        except redis.RedisError as exc:
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


def cmd_supervisor_events(args: argparse.Namespace, settings: Settings) -> int:
    """Entry of ``shopflow supervisor-events`` (run by supervisord as an eventlistener)."""
    serve(sys.stdin, sys.stdout, redis_publisher(settings))
    return 0
