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

Nothing is skipped silently. Every read comes with the streams' positions
(:data:`~actors.notifier.streams.POSITIONS_LUA`): entries trimmed before this
process or a replay got to them turn into a ``resync`` for the subscriptions
concerned (:func:`advance`, :func:`entries_lost_after`), and a replay whose
entries are gone altogether ends with one instead of waiting for them.
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
    POSITIONS_LUA,
    StreamEvent,
    StreamId,
    StreamPosition,
    id_text,
    parse_entry,
    parse_id,
    parse_position,
    resync_text,
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
# The close code of a connection whose token expired (web/realtime.py documents them all).
CLOSE_TOKEN_EXPIRED = 4401
# The resync reason when events a client should have had were trimmed (or lost) unread.
RETENTION = "retention"
# ... and when its ``since`` names an id the stream never had.
UNKNOWN_SINCE = "unknown_since"


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
    # Times this process found entries trimmed before it read them (live or in a replay),
    # each answered with a resync to the subscriptions concerned.
    gaps: int = 0


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
        self._keys = {c: stream_key(namespace, c) for c in self._channels}
        self._expired = expired
        self._cursors: dict[str, StreamId] = {}
        # How many entries the stream had ever been given when its cursor entry was added
        # (its "entries-added" then): what tells a trim past the cursor from one before it.
        # None where unknown (Redis before 7).
        self._counts: dict[str, int | None] = {}
        self._first_seen: dict[str, FirstSeen] = {c: FirstSeen() for c in self._channels}
        self._duplicates = 0
        self._gaps = 0
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
            pipe = self._redis.pipeline(transaction=True)
            pipe.xrevrange(self._keys[channel], count=DEDUP_WINDOW)
            _positions(pipe, [self._keys[channel]])
            newest, positions = await pipe.execute()
            position = parse_position(positions[0])
            if position is None:  # no stream yet: whatever comes is new
                self._cursors[channel], self._counts[channel] = (0, 0), 0
            else:
                self._cursors[channel], self._counts[channel] = position.newest, position.added
            for entry_id, fields in reversed(newest):
                event = parse_entry(channel, text(entry_id), text_fields(fields))
                if event is not None:
                    self._first_seen[channel].record(event)

    async def _tail(self) -> None:
        """Read every channel after its cursor until stopped."""
        while not self._stopping:
            await self._read_round()

    async def _read_round(self) -> None:
        """One blocking XREAD after every cursor, with the streams' positions; dispatch it.

        The positions are pipelined right behind the XREAD, so they describe
        the state it read: an XREAD answered at once is followed by the script
        before any other client's command; one that blocked is answered with
        entries added while it waited, after which no trim can have removed
        unread ones (Redis serves a blocked reader after each write). A channel
        whose stream trimmed entries this process had not read resyncs its
        live subscriptions before the batch is dispatched (see :func:`advance`).
        """
        keys = [self._keys[c] for c in self._channels]
        pipe = self._redis.pipeline(transaction=False)
        pipe.xread({k: id_text(self._cursors[c]) for k, c in zip(keys, self._channels)},
                   count=READ_BATCH, block=self._block_ms)
        _positions(pipe, keys)
        reply, positions = await pipe.execute()
        self._set_connected(True)
        read = {text(key).rsplit(":", 1)[-1]: entries for key, entries in reply or []}
        for channel, position in zip(self._channels, positions):
            entries = read.get(channel, [])
            self._account(channel, parse_position(position), entries)
            for entry_id, fields in entries:
                self._dispatch(channel, text(entry_id), fields)
        if reply:
            self._notify_changed()

    def _account(self, channel: str, position: StreamPosition | None,
                 entries: list[Any]) -> None:
        """Move the channel's count with a read; resync live subscriptions if it skipped a gap."""
        ids = [i for i in (parse_id(text(e[0])) for e in entries) if i is not None]
        cursor = self._cursors[channel]
        lost, end, count = advance(cursor, self._counts[channel], position, ids)
        self._counts[channel] = count
        if not lost:
            return
        self._gaps += 1
        log.warning("notifier: entries of %s after %s were trimmed before this process read "
                    "them; resyncing its live subscriptions from %s", channel, id_text(cursor),
                    id_text(end))
        if not ids:  # nothing left to read up to the stream's end: move there
            self._cursors[channel] = max(cursor, end)
        for sub in list(self._subs.get(channel, ())):
            if sub.live:
                self._resync_live(sub, end)

    def _resync_live(self, sub: Subscription, last_id: StreamId) -> None:
        """Tell a live subscription it missed events; the ones up to ``last_id`` it skips."""
        if not sub.active or last_id <= sub.last_id:
            return
        sub.last_id = last_id
        if not self._token_valid(sub):
            return
        sub.subscriber.offer(resync_text(sub.channel, RETENTION, last_id))

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
        if not self._token_valid(sub):
            return False
        if not sub.wants(event):
            return True
        return sub.subscriber.offer(event.wire_text)

    def _token_valid(self, sub: Subscription) -> bool:
        """False (and the client closed 4401) once the subscriber's token has expired."""
        if not self._expired(sub.subscriber.viewer):
            return True
        sub.active = False
        sub.subscriber.refuse(CLOSE_TOKEN_EXPIRED, "token expired")
        return False

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
        A stream that is gone altogether (deleted, or lost with a Redis that
        kept no data) held everything up to our cursor: a ``since`` before it
        lost those events.
        """
        key = self._keys[channel]
        positions = await self._with_redis(lambda: self._redis.eval(POSITIONS_LUA, 1, key))
        position = parse_position(positions[0])
        cursor = self._cursors[channel]
        if position is None:
            if since == cursor:
                return None
            return Resync(channel, UNKNOWN_SINCE if since > cursor else RETENTION,
                          id_text(cursor))
        # After a resync the client reloads state, so live events start after the newest entry.
        restart = id_text(max(position.newest, cursor))
        if since > position.newest:
            return Resync(channel, UNKNOWN_SINCE, restart)
        if entries_lost_after(position, since):
            return Resync(channel, RETENTION, restart)
        return None

    async def _catch_up(self, sub: Subscription) -> None:
        """Replay the stream after ``sub.last_id`` until it meets the live cursor.

        Live events dispatched meanwhile are skipped for this subscription
        (it is not live yet), but they are in Redis, so the next XRANGE reads
        them; the loop ends when nothing is left between the subscription's
        cursor and the notifier's. Each batch is read with the stream's
        position: if what the replay needs was trimmed (a slow client, a
        stream lost with Redis), the client gets a ``resync`` and the replay
        jumps to the stream's end, so the loop always ends. A token that
        expires during the replay closes the client 4401.
        """
        shared = self._first_seen[sub.channel]
        replayed = FirstSeen()  # repeats within the replay that the shared memory forgot
        while sub.active:
            # Read before the batch: every entry up to here was in Redis before the XRANGE.
            cursor = self._cursors[sub.channel]
            position, batch = await self._with_redis(
                functools.partial(self._range_after, sub.channel, sub.last_id))
            if _replay_lost(position, sub.last_id, cursor, bool(batch)):
                newest = position.newest if position is not None else cursor
                if not self._resync_replay(sub, max(newest, cursor)):
                    return
                continue
            for entry_id, fields in batch:
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
                if not self._token_valid(sub):
                    return
                if not await sub.subscriber.offer_backlog(event.wire_text):
                    sub.active = False
                    return
            if not batch and self._cursors[sub.channel] <= sub.last_id:
                return

    def _resync_replay(self, sub: Subscription, last_id: StreamId) -> bool:
        """The replay hit a gap: resync the client, go on after ``last_id``; False if closed."""
        self._gaps += 1
        log.warning("replay of %s after %s hit trimmed entries; resyncing the client from %s",
                    sub.channel, id_text(sub.last_id), id_text(last_id))
        sub.last_id = last_id
        if not self._token_valid(sub):
            return False
        if not sub.subscriber.offer(resync_text(sub.channel, RETENTION, last_id)):
            sub.active = False
            return False
        return True

    async def _range_after(self, channel: str, after: StreamId
                           ) -> tuple[StreamPosition | None, list[Any]]:
        """One batch after ``after`` and the stream's position, in one MULTI."""
        key = self._keys[channel]
        pipe = self._redis.pipeline(transaction=True)
        _positions(pipe, [key])
        pipe.xrange(key, min="(" + id_text(after), max="+", count=READ_BATCH)
        positions, batch = await pipe.execute()
        return parse_position(positions[0]), list(batch or [])

    async def _with_redis(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a read, retrying through a Redis outage (the caller's task may be cancelled)."""
        delay_s = RECONNECT_MIN_S
        while True:
            try:
                return await call()
            except REDIS_DOWN:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)

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
            gaps=self._gaps,
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


def _positions(pipe: Any, keys: list[str]) -> None:
    """Queue :data:`POSITIONS_LUA` for ``keys`` on a pipeline (EVAL: Redis caches the script
    by its hash; EVALSHA would cost a SCRIPT EXISTS round trip per pipeline in redis-py)."""
    pipe.eval(POSITIONS_LUA, len(keys), *keys)


def entries_lost_after(position: StreamPosition, since: StreamId) -> bool:
    """Whether entries newer than ``since`` may have been removed from the stream.

    Trimming removes the oldest entries, so a ``since`` older than the first
    kept entry means the client's last event was trimmed, and maybe more
    after it (the one false alarm, when it was exactly the last one trimmed,
    only costs the client a needless resync). XDEL'd entries are covered by
    the ``max-deleted-entry-id`` that Redis 7+ and Valkey report.
    """
    if position.max_deleted is not None and position.max_deleted > since:
        return True
    if position.first is None:  # empty: whatever came after ``since`` is gone
        return since < position.newest
    if position.removed == 0:  # nothing was ever trimmed
        return False
    return since < position.first


def _replay_lost(position: StreamPosition | None, since: StreamId, cursor: StreamId,
                 got_entries: bool) -> bool:
    """Whether a replay batch read after ``since`` misses entries.

    ``cursor`` is the notifier's, taken before the batch was read: everything
    up to it was in Redis then. A stream that trimmed past ``since`` lost
    entries; so did one that has nothing after ``since`` although the
    notifier had read further (the stream was deleted, or Redis came back
    without its newest writes). Without this last check the replay would
    wait forever for entries that will never come back.
    """
    if position is not None and entries_lost_after(position, since):
        return True
    return not got_entries and since < cursor


def advance(cursor: StreamId, count: int | None, position: StreamPosition | None,
            read: list[StreamId]) -> tuple[bool, StreamId, int | None]:
    """Judge one atomic read of a stream after ``cursor``: ``(lost, end, count at end)``.

    ``count`` is how many entries the stream had ever been given when the
    cursor's entry was added; ``read`` the ids that came back, ``position``
    the stream's position in the same MULTI. Trimming removes entries in the
    order they were added, so the entry right after the cursor (the
    ``count + 1``-th) was trimmed unread exactly when more than ``count``
    entries were ever removed: ``lost``. Then the client-facing answer is a
    resync, and ``end`` is where live delivery goes on: after the last entry
    read (or the stream's end when nothing is left). Exact on Redis 7+ and
    Valkey, which count entries ever added; before that the check is the
    first kept entry being newer than the cursor, which can be a needless
    resync on a stream that was emptied. XDEL, which the relay never uses,
    would upset the count.
    """
    if position is None:  # no stream: whatever is written next starts a new count
        return False, cursor, 0
    removed, added = position.removed, position.added
    if removed is not None and added is not None and count is not None:
        # Fewer entries ever added than the cursor had seen: the stream was made anew.
        lost = removed > count if added >= count else True
    else:
        lost = position.first is not None and position.first > cursor and cursor != (0, 0)
    if not read:
        if lost:
            return True, max(cursor, position.newest), added
        return False, cursor, added if cursor >= position.newest else count
    if position.first is not None and read[0] == position.first and removed is not None:
        end_count: int | None = removed + len(read)
    elif count is not None and not lost:
        end_count = count + len(read)
    elif read[-1] == position.newest:
        end_count = added
    else:
        end_count = None
    return lost, read[-1], end_count
