"""The job store's Lua script and the names of its Redis keys.

Every state change of a job is one call of ``jobs.lua`` (see its header for
the key layout), so a change and the event it causes happen together or not
at all. :class:`JobScript` calls it on a blocking client (Dramatiq's threads),
:class:`AsyncJobScript` on an asyncio one (the api process); both pass the
current time in, which keeps the script deterministic and lets tests use a
clock of their own.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

Clock = Callable[[], float]


@functools.cache
def script_text() -> str:
    """The Lua source, read once on first use."""
    return (Path(__file__).with_name("jobs.lua")).read_text(encoding="utf-8")


def events_stream(namespace: str) -> str:
    """The stream of job and queue lifecycle events (the notifier's ``jobs`` channel)."""
    return f"{namespace}:events:jobs"


@dataclass(frozen=True)
class JobKeys:
    """Redis key names under the broker's namespace (``{settings.namespace}-jobs``)."""

    namespace: str
    events: str

    def queue(self, queue: str, suffix: str = "") -> str:
        """A queue's key: the waiting list itself, or ``.msgs``, ``.hi``, ``.delayed`` ..."""
        return f"{self.namespace}:{queue}" + (f".{suffix}" if suffix else "")

    def job(self, job_id: str) -> str:
        """The record of one job."""
        return f"{self.namespace}:job:{job_id}"

    def history(self, job_id: str) -> str:
        """The last events of one job, newest first."""
        return f"{self.namespace}:jobhist:{job_id}"

    def dedup(self, job_id: str) -> str:
        """Set while a finished, trimmed job id still blocks re-sends."""
        return f"{self.namespace}:dedup:{job_id}"

    def acks(self, worker_id: str, queue: str) -> str:
        """Message ids a worker fetched and has not finished (Dramatiq's name)."""
        return f"{self.namespace}:__acks__.{worker_id}.{queue}"

    @property
    def heartbeats(self) -> str:
        """Worker id -> last heartbeat in ms (Dramatiq's name)."""
        return f"{self.namespace}:__heartbeats__"

    @property
    def paused(self) -> str:
        """The set of paused queue names."""
        return f"{self.namespace}:paused"

    @property
    def actors(self) -> str:
        """Actor name -> queue of every actor a worker has declared (for outside producers)."""
        return f"{self.namespace}:__actors__"

    @property
    def actor_policies(self) -> str:
        """Actor name -> its retry policy JSON (settings + actor options), for the same."""
        return f"{self.namespace}:__actor_policies__"

    def alone(self, worker_id: str) -> str:
        """The id of the job that keeps a worker to itself (it runs alone there)."""
        return f"{self.namespace}:__alone__.{worker_id}"

    def limit(self, key: str) -> str:
        """Holders of a concurrency limit."""
        return f"{self.namespace}:limit:{key}"


def text(value: Any) -> Any:
    """A script reply with bytes turned into str, lists walked."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [text(v) for v in value]
    return value


def _now_args(clock: Clock) -> tuple[int, str]:
    now_s = clock()
    return int(now_s * 1000), datetime.fromtimestamp(now_s, UTC).isoformat()


class JobScript:
    """Runs ``jobs.lua`` commands on a blocking Redis client (any thread)."""

    def __init__(self, client: redis.Redis, keys: JobKeys, clock: Clock = time.time) -> None:
        self.keys = keys
        self._clock = clock
        self._client = client
        self._script = client.register_script(script_text())
        self._local = threading.local()

    def __call__(self, command: str, *args: Any) -> Any:
        """One atomic command; the reply with bytes decoded."""
        return text(self.raw(command, *args))

    def raw(self, command: str, *args: Any) -> Any:
        """One atomic command; the reply as Redis sent it (the consumer's fetch: message
        bodies stay bytes for ``Message.decode``, not decoded and encoded again)."""
        now_ms, now_iso = _now_args(self._clock)
        return self._script(keys=[self.keys.namespace, self.keys.events],
                            args=[command, now_ms, now_iso, *args], client=self.connection())

    def connection(self) -> redis.Redis:
        """A client holding one connection of the broker's pool for the calling thread.

        Every job takes several script calls from the same worker thread; through the
        pool each one also pays a pool lock, two ``os.getpid()`` and a read probe that
        toggles the socket's blocking mode (about five syscalls), which showed up in
        profiles of the worker. A thread keeps its connection until it ends (then it
        goes back to the pool); a forked child gets a connection of its own, as the
        pool would give it. Like the pool, it reconnects a connection the server has
        closed (a Redis restart) before using it, so that costs no failed command.
        """
        pid = os.getpid()
        held: tuple[int, redis.Redis] | None = getattr(self._local, "held", None)
        if held is None or held[0] != pid:
            client = redis.Redis(connection_pool=self._client.connection_pool,
                                 single_connection_client=True)
            held = (pid, client)
            self._local.held = held
        _reconnect_if_stale(held[1])
        return held[1]


def _reconnect_if_stale(client: redis.Redis) -> None:
    """Drop the held connection if the server closed it or left bytes on it (the check the
    pool makes before every command), so the next command connects afresh."""
    conn: Any = client.connection  # typed as Any: redis-py 5 and 8 type it differently
    sock: socket.socket | None = getattr(conn, "_sock", None)
    if conn is None or sock is None:
        return  # not connected yet: the command connects
    try:
        # One syscall in the common case. select, not a recv with MSG_DONTWAIT: a socket
        # with a timeout (redis-py 8 sets one) makes Python wait that long in recv first.
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return  # nothing to read: the connection is fine
        # Readable: b"" is end-of-file (closed by the server), bytes are a stray reply.
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    except ValueError:
        # TLS sockets take no recv flags: ask redis-py itself, as its pool does.
        try:
            if not conn.can_read():
                return
        except (redis.ConnectionError, OSError):
            pass
    except OSError:
        pass
    conn.disconnect()


class AsyncJobScript:
    """Runs ``jobs.lua`` commands on an asyncio Redis client (the process loop)."""

    def __init__(self, client: aioredis.Redis, keys: JobKeys, clock: Clock = time.time) -> None:
        self.keys = keys
        self._clock = clock
        self._script = client.register_script(script_text())

    async def __call__(self, command: str, *args: Any) -> Any:
        """One atomic command; the reply with bytes decoded."""
        now_ms, now_iso = _now_args(self._clock)
        reply = await self._script(keys=[self.keys.namespace, self.keys.events],
                                   args=[command, now_ms, now_iso, *args])
        return text(reply)
