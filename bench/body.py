"""The one job body every peer runs, and how its start times reach the harness.

The body does nothing but note ``(enqueued_at, started_at)`` in a per-process
buffer; a daemon thread (started lazily in each worker process, so forking
workers get their own) ships the buffer to a Redis list every few
milliseconds. The timestamps are taken in the body, so the shipping delay
does not count in any figure, and the body itself costs a ``time.time()`` and
a ``list.append`` for every peer alike.
"""

from __future__ import annotations

import os
import threading
import time

import redis

# Environment of a bench worker process (set by the harness, read once here).
ENV_RESULTS_URL = "BENCH_RESULTS_URL"
ENV_RESULTS_KEY = "BENCH_RESULTS_KEY"
# How often the shipping thread pushes buffered start times to Redis.
FLUSH_INTERVAL_S = 0.01


class StartRecorder:
    """Buffers start records and pushes them to a Redis list from a daemon thread."""

    def __init__(self, results_url: str, results_key: str) -> None:
        self._client = redis.Redis.from_url(results_url)
        self._key = results_key
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._ship_forever, name="bench-recorder", daemon=True)
        self._thread.start()

    def add(self, enqueued_at: float, started_at: float) -> None:
        """Called in the job body's thread (or event loop): must stay cheap."""
        with self._lock:
            self._buffer.append(f"{enqueued_at!r} {started_at!r}")

    def _ship_forever(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            with self._lock:
                batch, self._buffer = self._buffer, []
            if batch:
                self._client.rpush(self._key, *batch)


_recorder: StartRecorder | None = None
_recorder_pid = 0
_recorder_lock = threading.Lock()


def _recorder_for_this_process() -> StartRecorder:
    global _recorder, _recorder_pid
    pid = os.getpid()
    if _recorder is None or _recorder_pid != pid:
        with _recorder_lock:
            if _recorder is None or _recorder_pid != pid:
                _recorder = StartRecorder(os.environ[ENV_RESULTS_URL], os.environ[ENV_RESULTS_KEY])
                _recorder_pid = pid
    return _recorder


def noop(enqueued_at: float) -> None:
    """The no-op job: note when it started. Every peer runs exactly this."""
    started_at = time.time()
    _recorder_for_this_process().add(float(enqueued_at), started_at)


async def noop_async(enqueued_at: float) -> None:
    """The same body for the asyncio peers (arq, BullMQ)."""
    noop(enqueued_at)
