"""The WebSocket notifier against a real server, real Redis and real clients."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from actors.notifier.notifier import Notifier
from actors.notifier.streams import append_event
from runtime.outbox import emit
from runtime.settings import Settings
from tests.web.conftest import (
    Publisher,
    ServerFactory,
    build_app,
    close_code,
    next_json,
    next_of,
    notifier_of,
    subscribe,
)
from web.auth import TokenSigner


def ws_url(server: TestServer, token: str | None = None) -> str:
    base = str(server.make_url("/ws"))
    return base if token is None else f"{base}?token={token}"


async def test_connect_without_token_is_closed_4401(realtime_server: TestServer,
                                                    http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(ws_url(realtime_server)) as ws:
        assert await close_code(ws) == 4401


async def test_forged_and_expired_tokens_are_closed_4401(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner) -> None:
    forged = TokenSigner(b"another-secret-entirely-0123456789").issue("staff", None, 60)
    expired = TokenSigner(signer._secret, clock=lambda: 1_000.0).issue("staff", None, 60)
    for token in (forged, expired, "garbage", "sf1.x.y"):
        async with http.ws_connect(ws_url(realtime_server, token)) as ws:
            assert await close_code(ws) == 4401


async def test_welcome_lists_the_channels_the_role_may_use(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner) -> None:
    async with http.ws_connect(ws_url(realtime_server, signer.issue("customer", 7, 60))) as ws:
        welcome = await next_json(ws)
        assert welcome["type"] == "welcome"
        assert welcome["customer_id"] == 7
        assert welcome["channels"] == ["order-status-changed", "stock-updated"]


async def test_customer_sees_only_own_orders_staff_sees_all(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    url_alice = ws_url(realtime_server, signer.issue("customer", 1, 60))
    url_staff = ws_url(realtime_server, signer.issue("staff", None, 60))
    async with http.ws_connect(url_alice) as alice, http.ws_connect(url_staff) as staff:
        await subscribe(alice, "order-status-changed")
        await subscribe(staff, "order-status-changed")
        for order_id, customer_id in ((10, 2), (11, 1), (12, 2), (13, 1)):
            await publish("order-status-changed", {"order_id": order_id,
                                                   "customer_id": customer_id,
                                                   "to_status": "paid"})
        seen_alice = [(await next_of(alice, "event"))["payload"]["order_id"] for _ in range(2)]
        seen_staff = [(await next_of(staff, "event"))["payload"]["order_id"] for _ in range(4)]
        assert seen_alice == [11, 13]
        assert seen_staff == [10, 11, 12, 13]
        await alice.send_json({"type": "ping", "ref": "p1"})
        assert await next_json(alice) == {"type": "pong", "ref": "p1"}  # nothing else queued


async def test_customer_subscribing_to_a_staff_channel_is_closed_4403(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner) -> None:
    async with http.ws_connect(ws_url(realtime_server, signer.issue("customer", 1, 60))) as ws:
        await next_of(ws, "welcome")
        await ws.send_json({"type": "subscribe", "channel": "jobs"})
        assert await close_code(ws) == 4403


async def test_stock_filter_by_product(realtime_server: TestServer,
                                       http: aiohttp.ClientSession, signer: TokenSigner,
                                       publish: Publisher) -> None:
    async with http.ws_connect(ws_url(realtime_server, signer.issue("customer", 1, 60))) as ws:
        await subscribe(ws, "stock-updated", keys=[2, 3])
        for product_id in (1, 2, 4, 3):
            await publish("stock-updated", {"product_id": product_id, "quantity": 5})
        got = [(await next_of(ws, "event"))["payload"]["product_id"] for _ in range(2)]
        assert got == [2, 3]


async def test_reconnect_with_since_gets_exactly_what_was_missed(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    url = ws_url(realtime_server, signer.issue("customer", 1, 60))
    async with http.ws_connect(url) as ws:
        await subscribe(ws, "stock-updated")
        await publish("stock-updated", {"product_id": 1, "n": 0})
        last_seen = (await next_of(ws, "event"))["id"]
    for n in range(1, 6):
        await publish("stock-updated", {"product_id": 1, "n": n})
    async with http.ws_connect(url) as ws:
        await subscribe(ws, "stock-updated", since=last_seen)
        replayed = [(await next_of(ws, "event"))["payload"]["n"] for _ in range(5)]
        await publish("stock-updated", {"product_id": 1, "n": 6})
        live = (await next_of(ws, "event"))["payload"]["n"]
        assert replayed + [live] == [1, 2, 3, 4, 5, 6]
        await ws.send_json({"type": "ping"})
        assert (await next_json(ws))["type"] == "pong"  # no duplicates queued


async def test_since_past_retention_gets_resync(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    first = await publish("stock-updated", {"product_id": 1}, maxlen=3)
    for _ in range(5):
        last = await publish("stock-updated", {"product_id": 1}, maxlen=3)
    url = ws_url(realtime_server, signer.issue("staff", None, 60))
    async with http.ws_connect(url) as ws:
        await ws.send_json({"type": "subscribe", "channel": "stock-updated", "since": first})
        resync = await next_of(ws, "resync")
        assert resync["reason"] == "retention"
        assert resync["last_id"] == last
        await next_of(ws, "subscribed")
        await publish("stock-updated", {"product_id": 9})
        assert (await next_of(ws, "event"))["payload"]["product_id"] == 9


async def test_two_api_processes_each_client_gets_each_event_once_in_order(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession, publish: Publisher) -> None:
    server_a = await start_server(build_app(web_settings, signer))
    server_b = await start_server(build_app(web_settings, signer))
    token = signer.issue("staff", None, 60)
    async with http.ws_connect(ws_url(server_a, token)) as on_a, \
            http.ws_connect(ws_url(server_b, token)) as on_b:
        await subscribe(on_a, "order-status-changed")
        await subscribe(on_b, "order-status-changed")
        for n in range(20):
            await publish("order-status-changed", {"order_id": n, "customer_id": 1})
        for ws in (on_a, on_b):
            got = [(await next_of(ws, "event"))["payload"]["order_id"] for _ in range(20)]
            assert got == list(range(20))
        # A client of A moves to B mid-stream and resumes from the last id it saw.
        last_on_a = None
        await publish("order-status-changed", {"order_id": 20, "customer_id": 1})
        last_on_a = (await next_of(on_a, "event"))["id"]
    await publish("order-status-changed", {"order_id": 21, "customer_id": 1})
    async with http.ws_connect(ws_url(server_b, token)) as moved:
        await subscribe(moved, "order-status-changed", since=last_on_a)
        assert (await next_of(moved, "event"))["payload"]["order_id"] == 21


async def test_bad_input_gets_errors_and_never_hurts_others(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    token = signer.issue("staff", None, 60)
    async with http.ws_connect(ws_url(realtime_server, token)) as good:
        await subscribe(good, "stock-updated")
        async with http.ws_connect(ws_url(realtime_server, token)) as bad:
            await next_of(bad, "welcome")
            cases = [
                ("not json", "bad_json"),
                # Nested deeper than the JSON parser recurses (yet under the frame cap).
                ("[" * 5000, "bad_json"),
                ('{"a":' * 5000, "bad_json"),
                ("[1, 2]", "bad_message"),
                ('{"type": "dance"}', "bad_message"),
                ('{"type": "subscribe", "channel": 5}', "bad_message"),
                ('{"type": "subscribe", "channel": "gossip"}', "unknown_channel"),
                ('{"type": "subscribe", "channel": "jobs", "since": "yesterday"}', "bad_since"),
                ('{"type": "subscribe", "channel": "stock-updated", "keys": "all"}',
                 "bad_message"),
                ('{"type": "subscribe", "channel": "jobs", "keys": [1]}', "bad_message"),
            ]
            for frame, code in cases:
                await bad.send_str(frame)
                error = await next_of(bad, "error")
                assert error["code"] == code, frame[:40]
                # A good message in between: more than 10 bad ones in a row would close 4400.
                await bad.send_json({"type": "ping", "ref": "ok"})
                assert await next_json(bad) == {"type": "pong", "ref": "ok"}
        for frame_kind, expected in (("binary", 1003), ("huge", 1009), ("utf8", 1007)):
            async with http.ws_connect(ws_url(realtime_server, token)) as bad:
                await next_of(bad, "welcome")
                if frame_kind == "binary":
                    await bad.send_bytes(b"\x00\x01")
                elif frame_kind == "huge":
                    await bad.send_str("x" * (realtime_server.app[
                        __import__("web.realtime").realtime.WS_SETTINGS_KEY
                    ].ws_max_frame_bytes + 1))
                else:
                    await bad.send_frame(b'{"type": "\xff\xfe"}', aiohttp.WSMsgType.TEXT)
                assert await close_code(bad) == expected, frame_kind
        await publish("stock-updated", {"product_id": 5})
        assert (await next_of(good, "event"))["payload"]["product_id"] == 5


async def test_answers_echo_the_ref_errors_included_and_have_none_without_one(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner) -> None:
    """docs/web.md: a ``ref`` on a client message is echoed in its answer, whatever the answer
    (an error also echoes the ``channel`` it was about); no ``ref`` sent, none answered."""
    async with http.ws_connect(ws_url(realtime_server, signer.issue("customer", 1, 60))) as ws:
        await next_of(ws, "welcome")
        cases = [
            ({"type": "subscribe", "channel": "order-status", "ref": "r1"},
             {"code": "unknown_channel", "channel": "order-status", "ref": "r1"}),
            ({"type": "subscribe", "channel": "stock-updated", "since": "yesterday", "ref": 7},
             {"code": "bad_since", "channel": "stock-updated", "ref": 7}),
            ({"type": "dance", "ref": "d"}, {"code": "bad_message", "ref": "d"}),
            ({"type": "subscribe", "channel": "order-status"},
             {"code": "unknown_channel", "channel": "order-status"}),
            ({"type": "ping", "ref": "x" * 65}, {"code": "bad_message"}),  # the ref is the fault
            ({"type": "subscribe", "channel": "c" * 65, "ref": "r2"},
             {"code": "unknown_channel", "ref": "r2"}),
        ]
        for sent, expected in cases:
            await ws.send_json(sent)
            error = await next_json(ws)
            assert error.pop("type") == "error" and error.pop("message"), sent
            assert error == expected, sent
        subscribed = await subscribe(ws, "stock-updated")
        assert set(subscribed) == {"type", "channel", "last_id"}
        assert (await subscribe(ws, "stock-updated", ref="s1"))["ref"] == "s1"
        await ws.send_json({"type": "unsubscribe", "channel": "stock-updated"})
        assert await next_json(ws) == {"type": "unsubscribed", "channel": "stock-updated"}
        await ws.send_json({"type": "ping"})
        assert await next_json(ws) == {"type": "pong"}


async def test_keys_naming_another_customers_orders_are_accepted_and_leak_nothing(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    """Ids leak nothing: a filter on someone else's order is not refused (that would say the
    order exists), its events are filtered out like any other customer's."""
    async with http.ws_connect(ws_url(realtime_server, signer.issue("customer", 1, 60))) as ws:
        await subscribe(ws, "order-status-changed", keys=[5, 6])
        await publish("order-status-changed", {"order_id": 6, "customer_id": 2})
        await publish("order-status-changed", {"order_id": 5, "customer_id": 1})
        assert (await next_json(ws))["payload"]["order_id"] == 5
        await ws.send_json({"type": "ping"})
        assert await next_json(ws) == {"type": "pong"}  # order 6 was never queued


async def test_a_second_subscribe_to_a_channel_replaces_the_first(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    """Its keys replace the first's, and it starts from now (or its own ``since``)."""
    async with http.ws_connect(ws_url(realtime_server, signer.issue("customer", 1, 60))) as ws:
        first = await subscribe(ws, "stock-updated", keys=[1])
        await publish("stock-updated", {"product_id": 1, "n": 1})
        assert (await next_json(ws))["payload"]["n"] == 1
        second = await subscribe(ws, "stock-updated", keys=[2], ref="again")
        assert second["ref"] == "again" and second["last_id"] > first["last_id"]
        await publish("stock-updated", {"product_id": 1, "n": 2})
        await publish("stock-updated", {"product_id": 2, "n": 3})
        assert (await next_json(ws))["payload"]["n"] == 3
        await ws.send_json({"type": "ping"})
        assert await next_json(ws) == {"type": "pong"}  # one subscription: no n=2, no repeat
        again = await subscribe(ws, "stock-updated", since=first["last_id"])
        assert again["last_id"] == first["last_id"]
        assert [(await next_json(ws))["payload"]["n"] for _ in range(3)] == [1, 2, 3]


async def test_garbage_flood_is_closed_4400(realtime_server: TestServer,
                                            http: aiohttp.ClientSession,
                                            signer: TokenSigner) -> None:
    async with http.ws_connect(ws_url(realtime_server, signer.issue("staff", None, 60))) as ws:
        for _ in range(10):
            await ws.send_str("{")
        assert await close_code(ws) == 4400


async def test_token_expiring_mid_connection_is_closed_4401(
        web_settings: Settings, start_server: ServerFactory, http: aiohttp.ClientSession,
        publish: Publisher) -> None:
    now = [10_000.0]
    signer = TokenSigner(web_settings.token_secret.encode(), clock=lambda: now[0])  # type: ignore[union-attr]
    server = await start_server(build_app(web_settings, signer))
    async with http.ws_connect(ws_url(server, signer.issue("staff", None, 30))) as ws:
        await subscribe(ws, "stock-updated")
        now[0] += 31
        await publish("stock-updated", {"product_id": 1})
        assert await close_code(ws) == 4401


async def test_an_outbox_row_published_twice_reaches_each_client_once(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession, redis: aioredis.Redis) -> None:
    """The relay may XADD a row again after a crash (runtime/outbox.py). Clients get it once:
    live, replayed with ``since``, and from an api process started after both copies."""

    async def relay(row_id: int) -> str:
        return await append_event(redis, web_settings.namespace, "order-status-changed",
                                  "order.status_changed",
                                  {"order_id": row_id, "customer_id": 1}, event_id=row_id)

    token = signer.issue("staff", None, 60)
    server_a = await start_server(build_app(web_settings, signer))
    async with http.ws_connect(ws_url(server_a, token)) as live:
        start = (await subscribe(live, "order-status-changed"))["last_id"]
        first_copy = await relay(41)
        await relay(42)
        await relay(41)  # row 41 again: the relay crashed before marking it published
        await relay(43)
        assert [(await next_of(live, "event"))["event_id"] for _ in range(3)] == ["41", "42", "43"]
        await live.send_json({"type": "ping"})
        assert (await next_json(live))["type"] == "pong"  # the copy was never queued
    assert notifier_of(server_a).stats().duplicates_skipped == 1

    async with http.ws_connect(ws_url(server_a, token)) as resumed:
        await subscribe(resumed, "order-status-changed", since=start)
        assert [(await next_of(resumed, "event"))["event_id"] for _ in range(3)] == \
            ["41", "42", "43"]
        await resumed.send_json({"type": "ping"})
        assert (await next_json(resumed))["type"] == "pong"

    # A process started after both copies learns the first one from the stream's tail.
    server_b = await start_server(build_app(web_settings, signer))
    async with http.ws_connect(ws_url(server_b, token)) as moved:
        await subscribe(moved, "order-status-changed", since=first_copy)
        assert [(await next_of(moved, "event"))["event_id"] for _ in range(2)] == ["42", "43"]
        await relay(42)  # and a live copy of an old row is skipped there too
        await relay(44)
        assert (await next_of(moved, "event"))["event_id"] == "44"


async def test_a_stopped_notifier_returns_without_being_cancelled(
        web_settings: Settings, redis: aioredis.Redis) -> None:
    """stop() ends run() within one XREAD block, so a cancel swallowed inside the Redis client
    (redis-py wraps socket writes in asyncio.wait_for) cannot keep a stopping app alive."""
    notifier = Notifier(redis, web_settings.namespace, block_ms=200)
    task = asyncio.create_task(notifier.run())
    try:
        await notifier.wait_ready(10)
        notifier.stop()
        async with asyncio.timeout(10):
            await task  # returns normally: nobody cancelled it
    finally:
        task.cancel()


async def test_staff_follow_one_jobs_progress_and_outcome(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        web_settings: Settings) -> None:
    """Job events come from the job layer itself (jobs.lua), filtered by job id."""
    from runtime.broker import ALL_QUEUES, JobSpec, setup_broker
    from runtime.jobs.store import JobStore

    broker = setup_broker(web_settings)
    spec = JobSpec("analytics", "rt_test_report")
    client = aioredis.Redis.from_url(web_settings.redis_url or "")
    store = JobStore(client, broker.keys, ALL_QUEUES)
    try:
        watched, other = spec.send(broker, job_id="report-1"), spec.send(broker, job_id="x-2")
        async with http.ws_connect(ws_url(realtime_server, signer.issue("staff", None, 60))) as ws:
            await subscribe(ws, "jobs", keys=[watched.job_id])
            await store.progress(other.job_id, "50")
            await store.progress(watched.job_id, '{"done": 1, "of": 4}')
            await store.cancel(watched.job_id)
            first, second = await next_of(ws, "event"), await next_of(ws, "event")
        assert (first["event"], first["payload"]["progress"]) == ("job.progress",
                                                                   {"done": 1, "of": 4})
        assert (second["event"], second["payload"]["job_id"]) == ("job.cancelled", "report-1")
        async with http.ws_connect(ws_url(realtime_server, signer.issue("staff", None, 60))) as ws:
            await next_of(ws, "welcome")
            await ws.send_json({"type": "subscribe", "channel": "jobs", "keys": [7]})
            assert (await next_of(ws, "error"))["code"] == "bad_message"
    finally:
        await client.aclose()
        broker.close()


async def test_unsubscribe_stops_that_channel_only(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    """After ``unsubscribe`` the client gets no more events of that channel; its other
    subscriptions, and other clients on the same channel, still get theirs."""
    notifier = notifier_of(realtime_server)
    token = signer.issue("staff", None, 60)
    async with http.ws_connect(ws_url(realtime_server, token)) as ws, \
            http.ws_connect(ws_url(realtime_server, token)) as other:
        await subscribe(ws, "stock-updated")
        await subscribe(ws, "alerts")
        await subscribe(other, "stock-updated")
        await publish("stock-updated", {"n": 1})
        assert (await next_of(ws, "event"))["payload"]["n"] == 1

        await ws.send_json({"type": "unsubscribe", "channel": "stock-updated", "ref": "u1"})
        assert await next_json(ws) == {"type": "unsubscribed", "channel": "stock-updated",
                                       "ref": "u1"}
        assert notifier.stats().subscriptions == 2  # alerts of ws, stock-updated of other
        await publish("stock-updated", {"n": 2})
        await publish("alerts", {"n": 3})
        # Events go out in stream order per channel; the alert proves the notifier has
        # dispatched past n=2, so an event of n=2 for ws would already be queued before it.
        assert (await next_of(other, "event"))["payload"]["n"] == 1
        assert (await next_of(other, "event"))["payload"]["n"] == 2
        alert = await next_json(ws)
        assert (alert["type"], alert["channel"], alert["payload"]["n"]) == ("event", "alerts", 3)
        await ws.send_json({"type": "ping", "ref": "p"})
        assert await next_json(ws) == {"type": "pong", "ref": "p"}  # no stock event queued

        await ws.send_json({"type": "unsubscribe", "channel": "stock-updated"})  # idempotent
        assert (await next_json(ws))["type"] == "unsubscribed"


async def test_a_committed_outbox_row_reaches_websocket_clients_once_through_the_relay(
        web_settings: Settings, signer: TokenSigner, start_server: ServerFactory,
        http: aiohttp.ClientSession, pool: asyncpg.Pool) -> None:
    """The whole path: ``outbox.emit`` in a transaction, commit, the relay actor of a real api
    (two of them, competing for the rows), Redis Streams, the notifier, a WebSocket client
    on each api. A rolled-back row sends nothing; each committed row arrives exactly once."""
    from web.app import create_app

    server_a = await start_server(create_app(web_settings))
    server_b = await start_server(create_app(web_settings))
    staff, own = signer.issue("staff", None, 60), signer.issue("customer", 1, 60)
    async with http.ws_connect(ws_url(server_a, staff)) as on_a, \
            http.ws_connect(ws_url(server_b, own)) as on_b:
        await subscribe(on_a, "order-status-changed")
        await subscribe(on_b, "order-status-changed")
        with contextlib.suppress(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                await emit(conn, "order-status-changed", "order.status_changed",
                           {"order_id": 99, "customer_id": 1, "to_status": "paid"})
                raise RuntimeError("the change failed after writing its event")
        row_ids = []
        async with pool.acquire() as conn:
            for order_id, customer_id in ((7, 1), (8, 2), (9, 1)):
                async with conn.transaction():
                    row_ids.append(await emit(
                        conn, "order-status-changed", "order.status_changed",
                        {"order_id": order_id, "customer_id": customer_id, "to_status": "paid"}))
        seen_a = [await next_of(on_a, "event", timeout_s=10) for _ in range(3)]
        assert [e["event_id"] for e in seen_a] == [str(r) for r in row_ids]
        assert [e["payload"]["order_id"] for e in seen_a] == [7, 8, 9]
        assert {e["event"] for e in seen_a} == {"order.status_changed"}
        seen_b = [await next_of(on_b, "event", timeout_s=10) for _ in range(2)]
        assert [e["payload"]["order_id"] for e in seen_b] == [7, 9]  # customer 1's own only
        for ws in (on_a, on_b):  # nothing else queued: no second copy, no rolled-back row
            await ws.send_json({"type": "ping", "ref": "end"})
            assert await next_json(ws) == {"type": "pong", "ref": "end"}
    # The relay XADDs inside its transaction and marks the rows as it commits: wait for that.
    async with asyncio.timeout(5):
        while await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
            await asyncio.sleep(0.05)
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 3  # the rollback left none
    assert notifier_of(server_a).stats().duplicates_skipped == 0


async def test_since_on_a_stream_that_is_gone_gets_resync_not_a_stuck_replay(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher, redis: aioredis.Redis, web_settings: Settings) -> None:
    """The stream this process had read from vanished (deleted, or lost with a Redis that kept
    no data). A client resuming from before it, even from "0-0", gets a resync, and its replay
    ends: live events reach it, and the server does not spin on a replay that cannot finish."""
    from actors.notifier.streams import stream_key

    token = signer.issue("customer", 1, 60)
    async with http.ws_connect(ws_url(realtime_server, token)) as ws:
        await subscribe(ws, "stock-updated")
        await publish("stock-updated", {"product_id": 1, "n": 1})
        seen = (await next_of(ws, "event"))["id"]
    for since in ("0-0", seen):
        await redis.delete(stream_key(web_settings.namespace, "stock-updated"))
        async with http.ws_connect(ws_url(realtime_server, token)) as ws:
            await ws.send_json({"type": "subscribe", "channel": "stock-updated", "since": since})
            resync = await next_of(ws, "resync")
            assert (resync["reason"], resync["last_id"]) == ("retention", seen), since
            assert (await next_of(ws, "subscribed"))["last_id"] == seen
            await publish("stock-updated", {"product_id": 1, "n": 2})
            live = await next_of(ws, "event")
            assert live["payload"]["n"] == 2
            await ws.send_json({"type": "ping"})
            assert (await next_json(ws))["type"] == "pong"
        seen = live["id"]


async def test_an_idle_connection_is_closed_4401_when_its_token_expires(
        web_settings: Settings, start_server: ServerFactory, http: aiohttp.ClientSession) -> None:
    """No message, no event: the connection's own timer closes it at the token's expiry."""
    now = [10_000.0]
    signer = TokenSigner(web_settings.token_secret.encode(), clock=lambda: now[0])  # type: ignore[union-attr]
    server = await start_server(build_app(web_settings, signer))
    async with http.ws_connect(ws_url(server, signer.issue("staff", None, 1))) as ws:
        await subscribe(ws, "stock-updated")
        now[0] += 2  # the timer, armed for 1 s, finds the token expired when it wakes
        assert await close_code(ws) == 4401


async def test_a_customer_replaying_with_since_gets_only_their_own_orders(
        realtime_server: TestServer, http: aiohttp.ClientSession, signer: TokenSigner,
        publish: Publisher) -> None:
    """Ownership holds on the replay path too, not only for live events; staff replay all."""
    start = await publish("order-status-changed", {"order_id": 1, "customer_id": 1})
    for order_id, customer_id in ((20, 2), (21, 1), (22, 2), (23, 1), (24, None)):
        await publish("order-status-changed", {"order_id": order_id, "customer_id": customer_id})
    await publish("order-status-changed", {"order_id": 25})  # no owner at all
    url_own = ws_url(realtime_server, signer.issue("customer", 1, 60))
    url_staff = ws_url(realtime_server, signer.issue("staff", None, 60))
    async with http.ws_connect(url_own) as own, http.ws_connect(url_staff) as staff:
        await subscribe(own, "order-status-changed", since=start)
        await subscribe(staff, "order-status-changed", since=start)
        await publish("order-status-changed", {"order_id": 26, "customer_id": 2})
        await publish("order-status-changed", {"order_id": 27, "customer_id": 1})
        seen_own = [(await next_of(own, "event"))["payload"]["order_id"] for _ in range(3)]
        seen_staff = [(await next_of(staff, "event"))["payload"]["order_id"] for _ in range(8)]
        assert seen_own == [21, 23, 27]
        assert seen_staff == [20, 21, 22, 23, 24, 25, 26, 27]
        await own.send_json({"type": "ping", "ref": "end"})
        assert await next_json(own) == {"type": "pong", "ref": "end"}  # nobody else's order
