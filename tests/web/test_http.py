"""The HTTP API on a real server: orders, payment, status, health, and bad input."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import dramatiq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from actors.inventory.reservations import reserve_for_order
from actors.orders.service import MAX_LINE_QUANTITY, MAX_ORDER_TOTAL_CENTS
from runtime.broker import QUEUE_MAINTENANCE
from runtime.scheduling import Scheduler, SchedulerStore, connect_redis
from runtime.scheduling.health import write_heartbeat
from runtime.settings import Settings
from tests.factories import make_order, make_shop
from tests.web.conftest import Publisher
from web.app import create_app
from web.auth import TokenSigner

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(web_settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Client]:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 10, 2: 3})
    async with TestClient(TestServer(create_app(web_settings))) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def staff(signer: TokenSigner) -> dict[str, str]:
    """Headers of a staff caller (a service such as the checkout)."""
    return bearer(signer.issue("staff", None, 60))


async def _counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    return (await pool.fetchval("SELECT count(*) FROM orders"),
            await pool.fetchval("SELECT count(*) FROM outbox"),
            await pool.fetchval("SELECT sum(reserved_quantity) FROM inventory"))


async def test_create_read_and_pay_an_order(client: Client, staff: dict[str, str]) -> None:
    resp = await client.post("/api/v1/orders", headers=staff,
                             json={"customer_id": 1, "items": [{"product_id": 1, "quantity": 2}]})
    assert resp.status == 201
    order = await resp.json()
    assert order["status"] == "pending" and order["total_cents"] == 2 * 1990
    resp = await client.get(f"/api/v1/orders/{order['id']}", headers=staff)
    assert (await resp.json())["history"][0]["to_status"] == "pending"
    resp = await client.post(f"/api/v1/orders/{order['id']}/payment", headers=staff)
    assert resp.status == 409  # not reserved yet: a clear conflict, not a silent success
    error = (await resp.json())["error"]
    assert error["code"] == "conflict" and "reserved" in error["message"]


async def test_orders_endpoints_refuse_calls_without_a_valid_token(
        client: Client, pool: asyncpg.Pool, staff: dict[str, str]) -> None:
    async with pool.acquire() as conn:
        order_id = await make_order(conn, 1, {1: 1})
    body = {"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}]}
    forged = TokenSigner(b"not-the-api-secret-0123456789").issue("staff", None, 60)
    for headers in ({}, bearer(forged), bearer("garbage"), {"Authorization": "Basic eDp5"}):
        before = await _counts(pool)
        for method, path, json_body in (
                ("POST", "/api/v1/orders", body),
                ("GET", f"/api/v1/orders/{order_id}", None),
                ("POST", f"/api/v1/orders/{order_id}/payment", None)):
            resp = await client.request(method, path, json=json_body, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"]["code"] == "unauthenticated"
        assert await _counts(pool) == before


async def test_a_customer_sees_and_pays_only_their_own_orders(
        client: Client, pool: asyncpg.Pool, signer: TokenSigner) -> None:
    ana, bruno = (bearer(signer.issue("customer", cid, 60)) for cid in (1, 2))
    async with pool.acquire() as conn:
        order_id = await make_order(conn, 1, {1: 1})
        assert (await reserve_for_order(conn, order_id, 900)).reserved
    missing = await client.get("/api/v1/orders/999999", headers=bruno)
    resp = await client.get(f"/api/v1/orders/{order_id}", headers=bruno)
    assert resp.status == missing.status == 404  # not yours looks exactly like not there
    assert (await resp.json())["error"]["message"] == f"order {order_id} does not exist"
    assert (await client.post(f"/api/v1/orders/{order_id}/payment", headers=bruno)).status == 404
    resp = await client.get(f"/api/v1/orders/{order_id}", headers=ana)
    assert resp.status == 200 and (await resp.json())["status"] == "reserved"  # bruno paid nothing
    resp = await client.post(f"/api/v1/orders/{order_id}/payment", headers=ana)
    assert resp.status == 200 and (await resp.json())["status"] == "paid"


async def test_a_customer_places_orders_only_for_themself(
        client: Client, pool: asyncpg.Pool, signer: TokenSigner,
        staff: dict[str, str]) -> None:
    ana, bruno = (bearer(signer.issue("customer", cid, 60)) for cid in (1, 2))
    line = [{"product_id": 1, "quantity": 1}]
    before = await _counts(pool)
    resp = await client.post("/api/v1/orders", headers=bruno,
                             json={"customer_id": 1, "items": line})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    assert await _counts(pool) == before
    resp = await client.post("/api/v1/orders", headers=ana,
                             json={"customer_id": 1, "items": line, "external_ref": "web-1"})
    assert resp.status == 201
    order = await resp.json()
    # Re-using ana's external_ref does not hand her order to bruno.
    resp = await client.post("/api/v1/orders", headers=bruno,
                             json={"customer_id": 2, "items": line, "external_ref": "web-1"})
    assert resp.status == 409 and str(order["id"]) not in await resp.text()
    resp = await client.post("/api/v1/orders", headers=staff,
                             json={"customer_id": 1, "items": line, "external_ref": "web-1"})
    assert resp.status == 200 and (await resp.json())["id"] == order["id"]  # staff: idempotent


async def test_health_reports_both_servers_with_latency(client: Client) -> None:
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 200
    assert body["checks"]["redis"]["ok"] and body["checks"]["postgres"]["ok"]
    assert body["checks"]["postgres"]["latency_ms"] >= 0


async def test_health_shows_a_stale_scheduler_as_degraded_but_answers_200(
        client: Client, web_settings: Settings) -> None:
    """No fresh cron:heartbeat key: the scheduler check is stale and the status degraded, but
    the api itself serves, so the code stays 200 (docs/web.md, "Health"); a fresh heartbeat
    and a held lease turn it back to ok."""
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 200
    scheduler = body["checks"]["scheduler"]
    assert scheduler["ok"] is False and scheduler["heartbeat_at"] is None
    assert "no cron heartbeat" in scheduler["detail"]
    assert body["status"] == "degraded"

    redis = connect_redis(web_settings.redis_url or "")
    try:
        now = datetime.now(UTC)
        await write_heartbeat(redis, web_settings.namespace, now)
        assert await SchedulerStore(redis, web_settings.namespace).acquire_lease(
            "test-scheduler", now, 60)
        body = await (await client.get("/health")).json()
    finally:
        await redis.aclose()
    assert body["checks"]["scheduler"]["ok"] is True
    assert body["checks"]["scheduler"]["leader"] == "test-scheduler"
    assert body["status"] == "ok"


BAD_BODIES = [
    pytest.param(b'{"items": [{"product_id": 1, "quantity": 1}]}', 422, "invalid", "customer_id", id="missing-field"),
    pytest.param(b'{"customer_id": "x", "items": [{"product_id": 1, "quantity": 1}]}', 422, "invalid", "integer", id="wrong-type"),
    pytest.param(b'{"customer_id": 1, "items": [{"product_id": 1, "quantity": -3}]}', 422, "invalid", "positive", id="negative-quantity"),
    pytest.param(b'{"customer_id": 1, "items": [{"product_id": 424242, "quantity": 1}]}', 422, "invalid", "unknown product", id="unknown-product"),
    pytest.param(b'{"customer_id": 99, "items": [{"product_id": 1, "quantity": 1}]}', 422, "invalid", "unknown customer", id="unknown-customer"),
    pytest.param(b'{"customer_id": 1, "items": [', 400, "bad_json", "not valid JSON", id="invalid-json"),
    pytest.param(b'\xff\xfe', 400, "bad_json", "not valid JSON", id="not-utf8"),
    pytest.param(b'', 400, "bad_json", "not valid JSON", id="empty"),
    pytest.param(b'[1, 2]', 422, "invalid", "JSON object", id="not-an-object"),
    pytest.param(b'{"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "x": ' + b'"a"' + b' }', 422, "invalid", "unknown field", id="unknown-field"),
    # Text PostgreSQL cannot store: refused by validation, before any query.
    pytest.param(b'{"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "external_ref": "a\\u0000b"}', 422, "invalid", "NUL", id="nul-in-external-ref"),
    pytest.param(b'{"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "external_ref": "x\\ud800"}', 422, "invalid", "lone surrogate", id="surrogate-in-external-ref"),
    pytest.param(b'{"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "external_ref": ""}', 422, "invalid", "external_ref", id="empty-external-ref"),
]


@pytest.mark.parametrize("body, status, code, message", BAD_BODIES)
async def test_bad_input_gets_a_clear_4xx_and_changes_nothing(
    client: Client, pool: asyncpg.Pool, staff: dict[str, str], body: bytes, status: int,
    code: str, message: str,
) -> None:
    before = await _counts(pool)
    resp = await client.post("/api/v1/orders", data=body,
                             headers={"Content-Type": "application/json", **staff})
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["status"] == status and error["code"] == code
    assert message in error["message"]
    assert await _counts(pool) == before


async def test_an_order_total_past_integer_range_is_stored_and_one_past_the_cap_refused(
        client: Client, pool: asyncpg.Pool, staff: dict[str, str]) -> None:
    """10,000 units at R$ 5,000 is 5e9 cents: more than PostgreSQL's integer holds, under the
    cap; at R$ 20,000 a unit the order passes MAX_ORDER_TOTAL_CENTS and is a clear 422."""
    await pool.execute("INSERT INTO products (id, sku, name, price_cents) VALUES "
                       "(3, 'SKU-3', 'Box set', 500000), (4, 'SKU-4', 'Gold disc', 2000000)")
    await pool.execute("INSERT INTO inventory (product_id, quantity) VALUES (3, 0), (4, 0)")
    resp = await client.post("/api/v1/orders", headers=staff, json={
        "customer_id": 1, "items": [{"product_id": 3, "quantity": MAX_LINE_QUANTITY}]})
    assert resp.status == 201, await resp.text()
    order = await resp.json()
    assert order["total_cents"] == 500000 * MAX_LINE_QUANTITY > 2**31
    resp = await client.get(f"/api/v1/orders/{order['id']}", headers=staff)
    assert (await resp.json())["total_cents"] == 500000 * MAX_LINE_QUANTITY
    before = await _counts(pool)
    resp = await client.post("/api/v1/orders", headers=staff, json={
        "customer_id": 1, "items": [{"product_id": 4, "quantity": MAX_LINE_QUANTITY}]})
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["field"] == "items" and str(MAX_ORDER_TOTAL_CENTS) in error["message"]
    assert await _counts(pool) == before


async def test_a_value_the_database_refuses_is_422_not_500(
        client: Client, pool: asyncpg.Pool, staff: dict[str, str]) -> None:
    """The boundary's net under validation: asyncpg.DataError is bad input (422)."""
    from web.httpkit import DATA_ERROR_MESSAGE, json_errors

    async def handler(request: web.Request) -> web.Response:
        await pool.fetchval("SELECT $1::text", "nul\x00byte")
        raise AssertionError("PostgreSQL took a NUL")

    app = web.Application()
    app.router.add_get("/", json_errors(handler))
    async with TestClient(TestServer(app)) as bare:
        resp = await bare.get("/")
        assert resp.status == 422
        assert (await resp.json())["error"] == {"status": 422, "code": "invalid",
                                                 "message": DATA_ERROR_MESSAGE}


async def test_a_one_megabyte_body_is_refused(client: Client, pool: asyncpg.Pool,
                                              staff: dict[str, str]) -> None:
    before = await _counts(pool)
    big = json.dumps({"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "pad": "x" * 1_000_000})
    resp = await client.post("/api/v1/orders", data=big,
                             headers={"Content-Type": "application/json", **staff})
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "too_large" and "too large" in error["message"]
    assert await _counts(pool) == before


@pytest.mark.parametrize("method, path, status, code, allow", [
    ("GET", "/api/v1/nothing-here", 404, "not_found", None),
    ("DELETE", "/api/v1/orders", 405, "method_not_allowed", "POST"),
    ("DELETE", "/api/v1/orders/1", 405, "method_not_allowed", "GET,HEAD"),
])
async def test_aiohttp_own_errors_have_the_same_shape(client: Client, method: str, path: str,
                                                      status: int, code: str,
                                                      allow: str | None) -> None:
    resp = await client.request(method, path)
    assert resp.status == status
    assert (await resp.json())["error"] == {"status": status, "code": code,
                                             "message": resp.reason}
    assert resp.headers.get("Allow") == allow  # RFC 9110: a 405 lists the allowed methods


@pytest.mark.parametrize("path", ["/api/v1/orders/abc", "/api/v1/orders/999999", "/api/v1/orders/-1"])
async def test_unknown_orders_are_404(client: Client, staff: dict[str, str], path: str) -> None:
    resp = await client.get(path, headers=staff)
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "not_found" and "does not exist" in error["message"]


async def test_recent_events_through_create_app_wiring(
        client: Client, signer: TokenSigner, staff: dict[str, str],
        publish: Publisher) -> None:
    """create_app shares one Redis client that answers bytes; the events endpoint reads it."""
    first = await publish("order-status-changed", {"order_id": 5, "customer_id": 1})
    await publish("order-status-changed", {"order_id": 6, "customer_id": 2})
    resp = await client.get("/api/v1/events/order-status-changed?limit=10", headers=staff)
    assert resp.status == 200
    events = (await resp.json())["events"]
    assert [(e["payload"]["order_id"], e["event"]) for e in events] == [(6, "test"), (5, "test")]
    assert events[1]["id"] == first and events[1]["channel"] == "order-status-changed"
    resp = await client.get("/api/v1/events/order-status-changed",
                            headers=bearer(signer.issue("customer", 1, 60)))
    assert [e["payload"]["order_id"] for e in (await resp.json())["events"]] == [5]


async def test_repeatable_jobs_added_over_http_reach_a_running_scheduler(
        client: Client, web_settings: Settings, staff: dict[str, str]) -> None:
    """POST /schedules through create_app: listed at once, fired by a scheduler that was
    already running (it reads the store every tick), gone after DELETE."""
    redis = connect_redis(web_settings.redis_url or "")
    sent: list[dramatiq.Message[Any]] = []

    async def collect(message: dramatiq.Message[Any]) -> None:
        sent.append(message)

    scheduler = Scheduler(SchedulerStore(redis, web_settings.namespace), collect, [],
                          instance_id="test-scheduler")
    try:
        now = datetime.now(UTC)
        assert (await scheduler.tick(now)).sent == []  # running, nothing to do yet
        body = {"name": "promo-mail", "queue": QUEUE_MAINTENANCE, "actor": "send_promo",
                "args": [7], "every_s": 60, "misfire_grace_s": 3600}
        resp = await client.post("/api/v1/schedules", json=body, headers=staff)
        assert resp.status == 201, await resp.text()
        added = await resp.json()
        assert added["name"] == "promo-mail" and added["source"] == "repeatable"
        assert added["next_run_at"] is not None
        resp = await client.get("/api/v1/schedules", headers=staff)
        listed = {s["name"]: s["source"] for s in (await resp.json())["schedules"]}
        assert listed["promo-mail"] == "repeatable" and listed["cron-heartbeat"] == "builtin"

        report = await scheduler.tick(now + timedelta(seconds=61))
        assert report.sent and {name for name, _ in report.sent} == {"promo-mail"}
        assert sent[0].actor_name == "send_promo" and sent[0].args == (7,)

        resp = await client.delete("/api/v1/schedules/promo-mail", headers=staff)
        assert resp.status == 204
        assert (await scheduler.tick(now + timedelta(seconds=185))).sent == []
    finally:
        await redis.aclose()
