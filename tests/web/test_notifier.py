"""The notifier actor on its own, against the real Redis, with a stand-in subscriber.

For what a WebSocket client cannot arrange: a notifier that falls behind the
stream's trim, a token that expires in the middle of a replay.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.notifier.notifier import Notifier, Resync, advance
from actors.notifier.streams import StreamId, StreamPosition, parse_id
from runtime.settings import Settings
from tests.web.conftest import Publisher

CHANNEL = "stock-updated"


@dataclass(frozen=True)
class Staff:
    is_staff: bool = True
    customer_id: int | None = None


class StandInClient:
    """A subscriber that keeps what it is sent, in order, and how it was closed."""

    def __init__(self) -> None:
        self.viewer = Staff()
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.refused: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def offer(self, text: str) -> bool:
        self.frames.put_nowait(json.loads(text))
        return True

    async def offer_backlog(self, text: str) -> bool:
        return self.offer(text)

    def refuse(self, code: int, reason: str) -> None:
        if not self.refused.done():
            self.refused.set_result(code)

    async def next(self, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            return await self.frames.get()


async def _announced(last_id: str, resync: Resync | None) -> None:
    """Subscribe's announce hook: the tests read the start point from the subscription."""


@dataclass
class Running:
    """A running notifier; a test may stop it and run it again (as its actor's restart does)."""

    notifier: Notifier
    tasks: list[asyncio.Task[None]]
    tokens_expired: bool = False

    async def stop(self) -> None:
        self.notifier.stop()
        async with asyncio.timeout(10):
            await self.tasks[-1]

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.notifier.run()))


@pytest.fixture
async def running(redis: aioredis.Redis, web_settings: Settings) -> AsyncIterator[Running]:
    state = Running(Notifier(redis, web_settings.namespace, block_ms=100,
                             expired=lambda viewer: state.tokens_expired), [])
    state.start()
    await state.notifier.wait_ready(10)
    yield state
    state.notifier.stop()
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)


async def test_a_notifier_that_fell_behind_the_trim_resyncs_its_live_clients(
        running: Running, publish: Publisher) -> None:
    """Entries trimmed before this process read them are gone for its live subscribers: they
    get a ``resync`` (then live events again), never a silent skip."""
    notifier = running.notifier
    client = StandInClient()
    await publish(CHANNEL, {"n": 0}, maxlen=3)
    await notifier.wait_for(lambda s: s.events_dispatched == 1, timeout_s=5)
    await notifier.subscribe(client, CHANNEL, None, None, _announced)
    await publish(CHANNEL, {"n": 1}, maxlen=3)
    assert (await client.next())["payload"]["n"] == 1

    await running.stop()  # as if the process stalled while the relay went on
    ids = [await publish(CHANNEL, {"n": n}, maxlen=3) for n in range(2, 8)]  # 2..4 trimmed
    running.start()

    resync = await client.next()
    assert resync == {"type": "resync", "channel": CHANNEL, "reason": "retention",
                      "last_id": ids[-1]}  # no ref: it answers no client message
    await publish(CHANNEL, {"n": 8}, maxlen=3)
    assert (await client.next())["payload"]["n"] == 8
    assert client.frames.empty()  # 5..7, read after the gap, are covered by the reload
    assert notifier.stats().gaps == 1


async def test_a_notifier_that_stays_ahead_of_the_trim_never_resyncs(
        running: Running, publish: Publisher) -> None:
    """The count of entries ever added tells a trim of read entries from one of unread ones,
    however short the stream: a notifier lagging by less than the stream holds loses nothing."""
    notifier = running.notifier
    client = StandInClient()
    await notifier.subscribe(client, CHANNEL, None, None, _announced)
    await publish(CHANNEL, {"n": 0}, maxlen=3)
    assert (await client.next())["payload"]["n"] == 0
    await running.stop()
    for n in range(1, 4):  # three unread entries: the read one (n=0) is trimmed, no more
        await publish(CHANNEL, {"n": n}, maxlen=3)
    running.start()
    assert [(await client.next())["payload"]["n"] for _ in range(3)] == [1, 2, 3]
    for n in range(4, 10):
        await publish(CHANNEL, {"n": n}, maxlen=1)
        assert (await client.next())["payload"]["n"] == n
    assert notifier.stats().gaps == 0


async def test_a_token_that_expires_during_a_replay_closes_the_client_4401(
        running: Running, publish: Publisher) -> None:
    notifier = running.notifier
    since = await publish(CHANNEL, {"n": 0})
    for n in range(1, 4):
        await publish(CHANNEL, {"n": n})
    running.tokens_expired = True  # after the WebSocket's own check, before the replay
    client = StandInClient()
    await notifier.subscribe(client, CHANNEL, None, parse_id(since), _announced)
    assert await asyncio.wait_for(client.refused, 5) == 4401
    assert client.frames.empty()  # not one replayed event after expiry
    await publish(CHANNEL, {"n": 4})
    await notifier.wait_for(lambda s: s.events_dispatched == 5, timeout_s=5)  # n = 0..4
    assert client.frames.empty()  # nor a live one


def _pos(length: int, added: int | None, first: StreamId | None, newest: StreamId
         ) -> StreamPosition:
    return StreamPosition(length=length, newest=newest, first=first, added=added,
                          max_deleted=None)


@pytest.mark.parametrize(("cursor", "count", "position", "read", "expected"), [
    # Caught up, a new entry: the count moves with it.
    ((5, 0), 5, _pos(6, 6, (1, 0), (6, 0)), [(6, 0)], (False, (6, 0), 6)),
    # The cursor's own entry trimmed, its successor kept: nothing lost.
    ((5, 0), 5, _pos(3, 8, (6, 0), (8, 0)), [(6, 0), (7, 0), (8, 0)], (False, (8, 0), 8)),
    # Its successor trimmed too: lost; the read goes on from the first kept entry.
    ((5, 0), 5, _pos(2, 8, (7, 0), (8, 0)), [(7, 0), (8, 0)], (True, (8, 0), 8)),
    # Everything after the cursor trimmed, the stream empty: lost, move to its end.
    ((5, 0), 5, _pos(0, 8, None, (8, 0)), [], (True, (8, 0), 8)),
    # A stream made anew (fewer entries ever added than the cursor had seen): lost.
    ((5, 0), 5, _pos(2, 2, (9, 0), (10, 0)), [(9, 0), (10, 0)], (True, (10, 0), 2)),
    # No stream at all: nothing to read, a new count starts.
    ((5, 0), 5, None, [], (False, (5, 0), 0)),
    # Redis before 7 (no counts): the first kept entry after the cursor is the only clue.
    ((5, 0), None, _pos(2, None, (7, 0), (8, 0)), [(7, 0), (8, 0)], (True, (8, 0), None)),
    ((5, 0), None, _pos(4, None, (5, 0), (8, 0)), [(6, 0), (8, 0)], (False, (8, 0), None)),
])
def test_advance_tells_a_gap_from_a_trim_of_read_entries(
        cursor: StreamId, count: int | None, position: StreamPosition | None,
        read: list[StreamId], expected: tuple[bool, StreamId, int | None]) -> None:
    assert advance(cursor, count, position, read) == expected
