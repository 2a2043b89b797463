"""The notifier actor: one XREAD loop per process, fanning events out to subscribers.

Its state (cursors, subscriptions) is touched only from the event loop, so
there are no locks: every mutation happens between two awaits. ``run()`` is
the actor's life: it resolves where each stream ends, then tails all
channels, and on a Redis error reconnects with back-off and resumes from the
last id it dispatched, so a Redis restart loses nothing that Redis kept.

Delivery is exactly-once and ordered per channel because each subscription
keeps the last stream id it has been given and only ever moves it forward,
and because an event is its outbox row, not its stream entry: the relay may
publish a row twice (a crash between XADD and marking the row published,
runtime/outbox.py), so only the first entry carrying an outbox ``id`` on a
channel is delivered. Each notifier remembers the first stream id of the
newest :data:`DEDUP_WINDOW` outbox ids per channel (learnt from the stream's
tail at start, then from every entry it reads), so every api process makes
the same choice for live events and for replays alike.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.notifier.channels import CHANNELS, FILTER_FIELDS, Viewer, may_receive
from actors.notifier.streams import (
    ZERO_ID,
    StreamEvent,
    StreamId,
    id_text,
    parse_entry,
    parse_id,
    stream_key,
    text,
    text_fields,
)

log = logging.getLogger(__name__)

# Entries fetched per XREAD / XRANGE round trip.
READ_BATCH = 500
# Reconnect back-off after a Redis error: starts small, doubles, capped.
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0
# Outbox ids remembered per channel for de-duplication. A re-published row follows its
# first copy within one relay batch (RELAY_BATCH = 200 rows); ten batches leave room.
DEDUP_WINDOW = 2_048
# The errors that mean "Redis went away", as opposed to a bug.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class Subscriber(Protocol):
    """A live client (a WebSocket connection) as the notifier sees it."""

    @property
    def viewer(self) -> Viewer: ...

    def offer(self, text: str) -> bool:
        """Queue ``text`` without waiting; False if the client is too slow (it is then closed)."""

    async def offer_backlog(self, text: str) -> bool:
        """Queue ``text``, waiting a bounded time for room; False if the client is too slow."""

    def refuse(self, code: int, reason: str) -> None:
        """Close the client with a close code (e.g. its token expired)."""


class FirstSeen:
    """The stream id of the first entry of each of the newest ``capacity`` outbox ids.

    Bounded: the oldest ids are forgotten first. Touched only from the event loop.
    """

    def __init__(self, capacity: int = DEDUP_WINDOW) -> None:
        self._first: OrderedDict[str, StreamId] = OrderedDict()
        self._capacity = capacity

    def is_repeat(self, event: StreamEvent) -> bool:
        """True if an earlier entry of the stream carried the same outbox id."""
        first = self._first.get(event.event_id) if event.event_id else None
        return first is not None and first < event.stream_id

    def record(self, event: StreamEvent) -> None:
        """Remember ``event`` as the first entry of its outbox id unless an earlier one is known."""
        if not event.event_id:
            return
        first = self._first.get(event.event_id)
        if first is not None and first <= event.stream_id:
            return
        self._first[event.event_id] = event.stream_id
        if len(self._first) > self._capacity:
            self._first.popitem(last=False)


@dataclass(eq=False)
class Subscription:
    """One subscriber's interest in one channel, with its own cursor."""

    subscriber: Subscriber
    channel: str
    # Only events whose payload[FILTER_FIELDS[channel]] is in here; None means all.
    keys: frozenset[int | str] | None
    last_id: StreamId
    live: bool = False
    active: bool = True

    def wants(self, event: StreamEvent) -> bool:
        """Filter and authorization, checked for every event."""
        if self.keys is not None:
            value = event.payload.get(FILTER_FIELDS.get(self.channel, ""))
            if isinstance(value, bool) or not isinstance(value, int | str) \
                    or value not in self.keys:
                return False
        return may_receive(self.subscriber.viewer, self.channel, event.payload)


@dataclass(frozen=True)
class Resync:
    """The client's ``since`` is past the retention window (or unknown): it must reload."""

    channel: str
    reason: str
    last_id: str


@dataclass(frozen=True)
class NotifierStats:
    """An immutable snapshot for health checks, tests and the dashboard."""

    connected: bool
    subscribers: int
    subscriptions: int
    reconnects: int
    events_dispatched: int
    cursors: dict[str, str] = field(default_factory=dict)
    # Entries not delivered because an earlier entry carried the same outbox id.
    duplicates_skipped: int = 0


class Notifier:
    """The per-process notifier actor. Build it, run ``run()`` as a kept task, cancel to stop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        block_ms: int = 1_000,
        channels: Iterable[str] = CHANNELS,
        expired: Callable[[Viewer], bool] = lambda viewer: False,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self._block_ms = block_ms
        self._channels = tuple(channels)
        self._expired = expired
        self._cursors: dict[str, StreamId] = {}
        self._first_seen: dict[str, FirstSeen] = {c: FirstSeen() for c in self._channels}
        self._duplicates = 0
        self._subs: dict[str, list[Subscription]] = {c: [] for c in self._channels}
        self._ready = asyncio.Event()
        self._stopping = False
        self._connected = False
        self._reconnects = 0
        self._dispatched = 0
        self._changed = asyncio.Event()

    # --- the actor's life ------------------------------------------------------

    def stop(self) -> None:
        """Make the running :meth:`run` return within one ``XREAD`` block (on the loop).

        The owner still cancels the task to cut the block short; the flag makes
        the notifier stop even when that cancel is swallowed, as redis-py's
        ``asyncio.wait_for`` around socket writes can on Python 3.11. A later
        :meth:`run` (a restart) runs again.
        """
        self._stopping = True

    async def run(self) -> None:
        """Tail every channel until stopped or cancelled, reconnecting on any Redis outage."""
        self._stopping = False  # this object outlives its actor's incarnations
        delay_s = RECONNECT_MIN_S
        while not self._stopping:
            try:
                await self._redis.ping()
                if not self._ready.is_set():
                    await self._resolve_cursors()
                    self._ready.set()
                self._set_connected(True)
                await self._tail()
            except REDIS_DOWN as exc:
                if self._connected:
                    self._reconnects += 1
                    log.warning("notifier lost redis (%s); reconnecting", exc)
                self._set_connected(False)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)
                continue
            delay_s = RECONNECT_MIN_S

    async def _resolve_cursors(self) -> None:
        """Start each channel at its current end: a fresh process replays nothing.

        The stream's tail also teaches which outbox ids it already carries, so
        a copy of one of them is known as a repeat, here as in older processes.
        """
        for channel in self._channels:
            newest: Any = await self._redis.xrevrange(stream_key(self._namespace, channel),
                                                      count=DEDUP_WINDOW)
            last = parse_id(text(newest[0][0])) if newest else None
            self._cursors[channel] = last or (0, 0)
            for entry_id, fields in reversed(newest):
                event = parse_entry(channel, text(entry_id), text_fields(fields))
                if event is not None:
                    self._first_seen[channel].record(event)

    async def _tail(self) -> None:
        while not self._stopping:
            streams: dict[Any, Any] = {stream_key(self._namespace, c): id_text(self._cursors[c])
                                       for c in self._channels}
            reply: Any = await self._redis.xread(streams, count=READ_BATCH, block=self._block_ms)
            self._set_connected(True)
            for key, entries in reply or []:
                channel = text(key).rsplit(":", 1)[-1]
                for entry_id, fields in entries:
                    self._dispatch(channel, text(entry_id), fields)
            if reply:
                self._notify_changed()

    def _dispatch(self, channel: str, entry_id: str, fields: dict[Any, Any]) -> None:
        stream_id = parse_id(entry_id)
        if stream_id is None or stream_id <= self._cursors.get(channel, (0, 0)):
            return
        self._cursors[channel] = stream_id
        event = parse_entry(channel, entry_id, text_fields(fields))
        if event is None:
            log.error("skipping malformed event %s on %s", entry_id, channel)
            return
        first_seen = self._first_seen[channel]
        if first_seen.is_repeat(event):
            self._duplicates += 1
            log.info("skipping %s on %s: outbox event %s was already published",
                     entry_id, channel, event.event_id)
            return
        first_seen.record(event)
        self._dispatched += 1
        for sub in list(self._subs.get(channel, ())):
            if sub.live:
                self._deliver(sub, event)

    def _deliver(self, sub: Subscription, event: StreamEvent) -> bool:
        """Hand one event to one live subscription; advances its cursor either way."""
        if not sub.active or event.stream_id <= sub.last_id:
            return True
        sub.last_id = event.stream_id
        if self._expired(sub.subscriber.viewer):
            sub.subscriber.refuse(4401, "token expired")
            return False
        if not sub.wants(event):
            return True
        return sub.subscriber.offer(event.wire_text)

    # --- subscriptions -----------------------------------------------------------

    async def subscribe(
        self,
        subscriber: Subscriber,
        channel: str,
        keys: frozenset[int | str] | None,
        since: StreamId | None,
        announce: Callable[[str, Resync | None], Awaitable[None]],
    ) -> Subscription:
        """Subscribe; with ``since``, first replay what came after it.

        ``announce(last_id, resync)`` is awaited once the subscription's start
        point is known and before any event is queued, so the client hears
        "subscribed" (or "resync") first.
        """
        await self._ready.wait()
        self.unsubscribe(subscriber, channel)
        start = self._cursors[channel] if since is None else since
        sub = Subscription(subscriber, channel, keys, start)
        self._subs[channel].append(sub)
        self._notify_changed()
        resync = None
        if since is not None:
            resync = await self._check_retention(channel, since)
            if resync is not None:
                sub.last_id = parse_id(resync.last_id) or self._cursors[channel]
        await announce(id_text(sub.last_id), resync)
        if since is not None and resync is None:
            await self._catch_up(sub)
        sub.live = sub.active
        return sub

    def unsubscribe(self, subscriber: Subscriber, channel: str) -> bool:
        """Drop ``subscriber``'s subscription to ``channel``; True if there was one."""
        subs = self._subs.get(channel, [])
        kept = [s for s in subs if s.subscriber is not subscriber]
        for sub in subs:
            if sub.subscriber is subscriber:
                sub.active = False
        self._subs[channel] = kept
        self._notify_changed()
        return len(kept) != len(subs)

    def drop(self, subscriber: Subscriber) -> None:
        """Forget every subscription of a subscriber that went away."""
        for channel in self._channels:
            self.unsubscribe(subscriber, channel)

    async def _check_retention(self, channel: str, since: StreamId) -> Resync | None:
        """A Resync if entries after ``since`` may be gone (trimmed, or never existed).

        Judged from the stream itself, not this process's cursor: a client
        may come from another api process that has read further than we have.
        """
        key = stream_key(self._namespace, channel)
        current = id_text(self._cursors[channel])
        info = await self._with_redis(lambda: self._redis.xinfo_stream(key))
        if info is None:
            return None if since == (0, 0) else Resync(channel, "unknown_since", current)
        newest = parse_id(text(info.get("last-generated-id", ZERO_ID))) or (0, 0)
        # After a resync the client reloads state, so live events start after the newest entry.
        restart = id_text(max(newest, self._cursors[channel]))
        if since > newest:
            return Resync(channel, "unknown_since", restart)
        if _entries_lost_after(info, since, newest):
            return Resync(channel, "retention", restart)
        return None

    async def _catch_up(self, sub: Subscription) -> None:
        """Replay the stream after ``sub.last_id`` until it meets the live cursor.

        Live events dispatched meanwhile are skipped for this subscription
        (it is not live yet), but they are in Redis, so the next XRANGE reads
        them; the loop ends only when nothing is left between the
        subscription's cursor and the notifier's.
        """
        key = stream_key(self._namespace, sub.channel)
        shared = self._first_seen[sub.channel]
        replayed = FirstSeen()  # repeats within the replay that the shared memory forgot
        while sub.active:
            start = "(" + id_text(sub.last_id)
            batch = await self._with_redis(
                functools.partial(self._redis.xrange, key, min=start, max="+", count=READ_BATCH))
            for entry_id, fields in batch or []:
                event = parse_entry(sub.channel, text(entry_id), text_fields(fields))
                stream_id = parse_id(text(entry_id))
                if stream_id is None or stream_id <= sub.last_id:
                    continue
                sub.last_id = stream_id
                if event is None or shared.is_repeat(event) or replayed.is_repeat(event):
                    continue
                replayed.record(event)
                if not sub.wants(event):
                    continue
                if not await sub.subscriber.offer_backlog(event.wire_text):
                    sub.active = False
                    return
            if not batch and self._cursors[sub.channel] <= sub.last_id:
                return

    async def _with_redis(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a read, retrying through a Redis outage (the caller's task may be cancelled)."""
        delay_s = RECONNECT_MIN_S
        while True:
            try:
                return await call()
            except REDIS_DOWN:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)
            except Exception as exc:  # "no such key" from XINFO: an empty stream
                if "no such key" in str(exc).lower():
                    return None
                raise

    # --- observation -------------------------------------------------------------

    def _set_connected(self, value: bool) -> None:
        if value != self._connected:
            self._connected = value
            self._notify_changed()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def stats(self) -> NotifierStats:
        """A snapshot of connection state, subscriber counts and cursors."""
        subscribers = {id(s.subscriber) for subs in self._subs.values() for s in subs}
        return NotifierStats(
            connected=self._connected,
            subscribers=len(subscribers),
            subscriptions=sum(len(s) for s in self._subs.values()),
            reconnects=self._reconnects,
            events_dispatched=self._dispatched,
            cursors={c: id_text(i) for c, i in self._cursors.items()},
            duplicates_skipped=self._duplicates,
        )

    async def wait_for(self, predicate: Callable[[NotifierStats], bool], timeout_s: float) -> None:
        """Wait until ``predicate(stats())`` holds (tests and health checks; no polling)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.stats()):
                await self._changed.wait()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the stream ends are known (subscriptions can start)."""
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()


def _entries_lost_after(info: dict[Any, Any], since: StreamId, newest: StreamId) -> bool:
    """Whether entries newer than ``since`` may have been removed from the stream.

    Trimming removes the oldest entries, so a ``since`` older than the first
    kept entry means the client's last event was trimmed, and maybe more
    after it (the one false alarm, when it was exactly the last one trimmed,
    only costs the client a needless resync). XDEL'd entries are covered by
    the ``max-deleted-entry-id`` that Redis 7+ and Valkey report.
    """
    deleted = parse_id(text(info.get("max-deleted-entry-id", ZERO_ID))) or (0, 0)
    if deleted > since:
        return True
    first = info.get("first-entry")
    first_id = parse_id(text(first[0])) if first else None
    if first_id is None:
        return since < newest
    added, length = info.get("entries-added"), info.get("length")
    nothing_removed = isinstance(added, int) and added == length
    return since < first_id and not nothing_removed

