"""The extra HTTP API against a real server, real PostgreSQL and real Redis."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from actors.agents.messages import MODERATE_REVIEW
from actors.notifier.streams import append_event
from runtime.scheduling import list_repeatables
from runtime.settings import Settings
from tests.web.conftest import Publisher, ServerFactory, build_full_app, seed
from web import seams
from web.api_extra import POOL_KEY
from web.auth import TokenSigner


@pytest.fixture
async def api(web_settings: Settings, signer: TokenSigner,
              start_server: ServerFactory) -> TestServer:
    await seed(web_settings)
    return await start_server(build_full_app(web_settings, signer))


class Caller:
    """An HTTP client holding one token."""

    def __init__(self, http: aiohttp.ClientSession, server: TestServer, token: str | None):
        self.http, self.server, self.token = http, server, token

    async def __call__(self, method: str, path: str, json: Any = None,
                       **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.http.request(method, self.server.make_url(path), json=json,
                                     headers=headers, **kwargs) as resp:
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body


@pytest.fixture
def ana(http: aiohttp.ClientSession, api: TestServer, signer: TokenSigner) -> Caller:
    return Caller(http, api, signer.issue("customer", 1, 60))


@pytest.fixture
def bruno(http: aiohttp.ClientSession, api: TestServer, signer: TokenSigner) -> Caller:
    return Caller(http, api, signer.issue("customer", 2, 60))


@pytest.fixture
def staff(http: aiohttp.ClientSession, api: TestServer, signer: TokenSigner) -> Caller:
    return Caller(http, api, signer.issue("staff", None, 60))


async def test_no_token_is_401_with_json(http: aiohttp.ClientSession, api: TestServer) -> None:
    status, body = await Caller(http, api, None)("GET", "/api/v1/carts")
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    status, body = await Caller(http, api, "sf1.forged.sig")("GET", "/api/v1/me")
    assert status == 401


async def test_cart_lifecycle_and_ownership(ana: Caller, bruno: Caller, staff: Caller) -> None:
    status, cart = await ana("POST", "/api/v1/carts", json={})
    assert status == 201 and cart["customer_id"] == 1 and cart["items"] == []
    cart_path = f"/api/v1/carts/{cart['id']}"
    status, cart = await ana("PUT", f"{cart_path}/items/1", json={"quantity": 2})
    assert status == 200 and cart["total_cents"] == 2 * 1990
    status, cart = await ana("PUT", f"{cart_path}/items/2", json={"quantity": 1})
    assert [i["product_id"] for i in cart["items"]] == [1, 2]
    status, cart = await ana("DELETE", f"{cart_path}/items/1")
    assert cart["total_cents"] == 2500

    assert (await bruno("GET", cart_path))[0] == 404  # not yours: not found
    assert (await bruno("PUT", f"{cart_path}/items/1", json={"quantity": 1}))[0] == 404
    assert (await staff("GET", cart_path))[0] == 200
    status, listed = await ana("GET", "/api/v1/carts")
    assert [c["id"] for c in listed["carts"]] == [cart["id"]]
    assert (await bruno("GET", "/api/v1/carts"))[1]["carts"] == []
    assert (await bruno("GET", "/api/v1/carts?customer_id=1"))[0] == 403

    assert (await ana("DELETE", cart_path))[0] == 204
    status, body = await ana("PUT", f"{cart_path}/items/3", json={"quantity": 1})
    assert status == 409 and body["error"]["code"] == "conflict"


async def test_cart_input_is_validated(ana: Caller, staff: Caller) -> None:
    _, cart = await ana("POST", "/api/v1/carts", json={})
    items = f"/api/v1/carts/{cart['id']}/items"
    for body in ({"quantity": 0}, {"quantity": "2"}, {"quantity": True}, {}, [1]):
        status, _ = await ana("PUT", f"{items}/1", json=body)
        assert status == 422, body
    assert (await ana("PUT", f"{items}/999", json={"quantity": 1}))[0] == 404
    assert (await ana("GET", "/api/v1/carts/99999999999999999999"))[0] == 404
    status, body = await staff("POST", "/api/v1/carts", json={})
    assert status == 422 and body["error"]["field"] == "customer_id"
    assert (await staff("POST", "/api/v1/carts", json={"customer_id": 424242}))[0] == 422


async def test_review_submission_starts_moderation(ana: Caller, bruno: Caller,
                                                   staff: Caller, api: TestServer) -> None:
    status, answer = await ana("POST", "/api/v1/reviews",
                               json={"product_id": 1, "rating": 5, "body": "Great record"})
    assert status == 202 and answer["moderation"] == "requested"
    review = answer["review"]
    assert review["status"] == "pending" and review["customer_id"] == 1
    jobs = await api.app[POOL_KEY].fetch("SELECT job FROM outbox WHERE job IS NOT NULL")
    assert [j["job"]["args"] for j in jobs if j["job"]["actor"] == MODERATE_REVIEW.actor] == [[review["id"]]]
    assert (await bruno("GET", f"/api/v1/reviews/{review['id']}"))[0] == 404
    assert (await staff("GET", f"/api/v1/reviews/{review['id']}"))[0] == 200
    _, listed = await ana("GET", "/api/v1/products/1/reviews")
    assert listed["reviews"] == []  # not approved yet
    assert (await ana("GET", "/api/v1/products/1/reviews?status=pending"))[0] == 403
    _, listed = await staff("GET", "/api/v1/products/1/reviews?status=pending")
    assert [r["id"] for r in listed["reviews"]] == [review["id"]]
    assert listed["reviews"][0]["customer_id"] == 1  # staff see who wrote it
    # Approved, the review is public: other customers read it, but not who wrote it.
    await api.app[POOL_KEY].execute("UPDATE reviews SET status = 'approved' WHERE id = $1",
                                    review["id"])
    for reader in (bruno, ana):
        _, listed = await reader("GET", "/api/v1/products/1/reviews")
        assert [r["id"] for r in listed["reviews"]] == [review["id"]]
        assert "customer_id" not in listed["reviews"][0], listed
    _, listed = await staff("GET", "/api/v1/products/1/reviews")
    assert listed["reviews"][0]["customer_id"] == 1
    for bad in ({"product_id": 1, "rating": 6, "body": "x"},
                {"product_id": 1, "rating": 3, "body": "nul\u0000byte"},
                {"product_id": 1, "rating": 3, "body": "lone \ud800 surrogate"},
                {"product_id": 77, "rating": 3, "body": "no such product"}):
        assert (await ana("POST", "/api/v1/reviews", json=bad))[0] == 422, bad
    assert (await staff("POST", "/api/v1/reviews",
                        json={"product_id": 1, "rating": 3, "body": "x"}))[0] == 403


async def test_staff_endpoints_need_staff(ana: Caller, staff: Caller, api: TestServer) -> None:
    for path in ("/api/v1/queues", "/api/v1/jobs", "/api/v1/schedules",
                 "/api/v1/supervision", "/api/v1/stock-sync"):
        status, body = await ana("GET", path)
        assert status == 403 and body["error"]["code"] == "forbidden", path
        assert (await staff("GET", path))[0] == 200, path
    _, sync = await staff("GET", "/api/v1/stock-sync")
    assert sync["products"] == 3 and sync["linked"] == 2 and sync["never_synced"] == 2
    _, jobs = await staff("GET", "/api/v1/jobs?state=failed")
    assert {j["id"] for j in jobs["jobs"]} == {"job-1", "job-2"}
    assert (await staff("POST", "/api/v1/jobs/job-1/retry"))[0] == 202
    assert (await staff("POST", "/api/v1/jobs/job-1/retry"))[0] == 404
    assert (await staff("DELETE", "/api/v1/jobs/job-2"))[0] == 204
    assert api.app[seams.JOBS_ADMIN].retried == ["job-1"]  # type: ignore[attr-defined]


async def test_the_job_list_pages_with_an_offset(staff: Caller) -> None:
    _, everything = await staff("GET", "/api/v1/jobs?state=failed")
    assert len(everything["jobs"]) == 2
    _, second = await staff("GET", "/api/v1/jobs?state=failed&limit=1&offset=1")
    assert second["jobs"] == everything["jobs"][1:]
    status, body = await staff("GET", "/api/v1/jobs?state=failed&offset=-1")
    assert status == 422 and body["error"]["code"] == "invalid"


async def test_recommendations_and_support_are_per_customer(ana: Caller, staff: Caller) -> None:
    assert (await ana("GET", "/api/v1/customers/1/recommendations"))[0] == 200
    assert (await ana("GET", "/api/v1/customers/2/recommendations"))[0] == 404
    assert (await staff("GET", "/api/v1/customers/2/recommendations"))[0] == 200
    status, answer = await ana("POST", "/api/v1/support/questions",
                               json={"question": "Where is my order?"})
    assert status == 201 and "offline" in answer["source"]
    assert (await ana("POST", "/api/v1/support/questions",
                      json={"question": "x", "customer_id": 2}))[0] == 403
    for question in ("nul\u0000byte", "lone \udc00 surrogate", "   "):
        status, body = await ana("POST", "/api/v1/support/questions", json={"question": question})
        assert status == 422 and body["error"]["field"] == "question", question


async def test_a_cart_line_past_integer_range_totals_right(ana: Caller, api: TestServer) -> None:
    """1,000 units at R$ 30,000 is 3e9 cents: the line total is computed as bigint."""
    pool = api.app[POOL_KEY]
    await pool.execute("INSERT INTO products (id, sku, name, price_cents) "
                       "VALUES (90, 'SKU-90', 'Grand piano', 3000000)")
    _, cart = await ana("POST", "/api/v1/carts", json={})
    status, cart = await ana("PUT", f"/api/v1/carts/{cart['id']}/items/90",
                             json={"quantity": 1000})
    assert status == 200, cart
    assert cart["items"][0]["line_total_cents"] == cart["total_cents"] == 3_000_000_000


async def test_unwired_seams_answer_503(web_settings: Settings, signer: TokenSigner,
                                        start_server: ServerFactory,
                                        http: aiohttp.ClientSession) -> None:
    server = await start_server(build_full_app(web_settings, signer, with_stubs=False))
    staff = Caller(http, server, signer.issue("staff", None, 60))
    status, body = await staff("GET", "/api/v1/queues")
    assert status == 503 and "jobs admin" in body["error"]["message"]


async def test_recent_events_are_filtered_per_caller(ana: Caller, staff: Caller,
                                                     publish: Publisher) -> None:
    await publish("order-status-changed", {"order_id": 5, "customer_id": 1},
                  correlation_id="c-5")
    await publish("order-status-changed", {"order_id": 6, "customer_id": 2})
    _, mine = await ana("GET", "/api/v1/events/order-status-changed")
    assert [e["payload"]["order_id"] for e in mine["events"]] == [5]
    assert mine["events"][0]["correlation_id"] == "c-5"  # as the WebSocket shows it
    _, everything = await staff("GET", "/api/v1/events/order-status-changed?limit=10")
    assert [e["payload"]["order_id"] for e in everything["events"]] == [6, 5]
    status, refused = await ana("GET", "/api/v1/events/jobs")  # staff only, as on the WebSocket
    assert (status, refused["error"]["code"]) == (403, "forbidden")
    assert (await ana("GET", "/api/v1/events/nope"))[0] == 404


async def test_checkout_is_for_the_owner_and_places_one_order(ana: Caller, bruno: Caller,
                                                              staff: Caller) -> None:
    _, cart = await ana("POST", "/api/v1/carts", json={})
    checkout = f"/api/v1/carts/{cart['id']}/checkout"
    assert (await ana("POST", checkout))[0] == 409  # empty
    await ana("PUT", f"/api/v1/carts/{cart['id']}/items/2", json={"quantity": 3})
    assert (await bruno("POST", checkout))[0] == 404  # not yours: not found
    status, order = await staff("POST", checkout)
    assert status == 201 and order["customer_id"] == 1 and order["total_cents"] == 3 * 2500
    status, again = await ana("POST", checkout)
    assert (status, again["id"]) == (200, order["id"])
    status, cart = await ana("GET", f"/api/v1/carts/{cart['id']}")
    assert cart["status"] == "checked_out"
    assert (await ana("DELETE", f"/api/v1/carts/{cart['id']}"))[0] == 409


async def test_staff_see_the_reviews_moderation_flagged(ana: Caller, staff: Caller,
                                                        web_settings: Settings) -> None:
    from prometheus_client import CollectorRegistry

    from actors.agents.deps import open_deps
    from actors.agents.moderation import moderate_review

    _, spam = await ana("POST", "/api/v1/reviews", json={
        "product_id": 1, "rating": 5,
        "body": "Great album! Cheap copies at http://cds.example, call me on +55 11 98765-4321"})
    _, fine = await ana("POST", "/api/v1/reviews", json={
        "product_id": 2, "rating": 4, "body": "A lovely record, the second side is wonderful."})
    async with open_deps(web_settings, CollectorRegistry()) as deps:  # no API key: offline judge
        for review in (spam, fine):
            await moderate_review(deps, review["review"]["id"])

    status, body = await staff("GET", "/api/v1/moderation/flagged")
    assert status == 200
    [flagged] = body["reviews"]
    assert flagged["review_id"] == spam["review"]["id"] and flagged["product_id"] == 1
    assert flagged["status"] in ("rejected", "manual_review")
    assert flagged["current_status"] == flagged["status"]
    assert {"spam_or_promotion", "personal_data"} & set(flagged["categories"])
    assert flagged["source"] == "fallback" and flagged["reason"]
    assert flagged["excerpt"].startswith("Great album!")
    assert (await ana("GET", "/api/v1/moderation/flagged"))[0] == 403
    assert (await staff("GET", "/api/v1/moderation/flagged?limit=0"))[0] == 422


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "bad_json"), (b"\xff", 400, "bad_json"), (b"", 400, "bad_json"),
    (b"[1]", 422, "invalid"), (b'"text"', 422, "invalid"),
])
async def test_bodies_get_the_same_errors_as_the_orders_endpoints(
        ana: Caller, body: bytes, status: int, code: str) -> None:
    async with ana.http.post(ana.server.make_url("/api/v1/carts"), data=body,
                             headers={"Authorization": f"Bearer {ana.token}",
                                      "Content-Type": "application/json"}) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert error["status"] == status and error["code"] == code


async def test_repeatable_jobs_are_staff_only_validated_and_reserve_builtin_names(
        ana: Caller, staff: Caller, redis: aioredis.Redis, web_settings: Settings) -> None:
    body = {"name": "promo", "queue": "maintenance", "actor": "send_promo",
            "cron": "0 10 * * 1", "timezone": "Europe/Lisbon"}
    assert (await ana("POST", "/api/v1/schedules", json=body))[0] == 403
    status, added = await staff("POST", "/api/v1/schedules", json=body)
    assert status == 201 and added["zone"] == "Europe/Lisbon"
    assert added["next_run_at"].endswith("+00:00") and "T10:00:00+" in added["next_runs"][0]["local"]
    status, error = await staff("POST", "/api/v1/schedules", json=body)
    assert status == 409 and error["error"]["code"] == "conflict"
    status, _ = await staff("POST", "/api/v1/schedules", json={**body, "name": "cron-heartbeat"})
    assert status == 409  # built-in names are reserved
    for bad in ({}, {**body, "queue": "nope"}, {**body, "name": "bad name!"},
                {**body, "every_s": 60}, {**body, "cron": "61 * * * *"},
                {**body, "cron": "0 10 * * 1", "timezone": "Nowhere/City"},
                {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 10**12},
                {"name": "x", "queue": "maintenance", "actor": "a", "every_s": 60,
                 "max_runtime_s": 10**9}):
        status, error = await staff("POST", "/api/v1/schedules", json=bad)
        assert status == 422 and error["error"]["code"] == "invalid", bad
    assert (await ana("DELETE", "/api/v1/schedules/promo"))[0] == 403
    assert (await staff("DELETE", "/api/v1/schedules/cron-heartbeat"))[0] == 409
    assert (await staff("DELETE", "/api/v1/schedules/nothing"))[0] == 404
    assert [s.name for s in await list_repeatables(redis, web_settings.namespace)] == ["promo"]
    assert (await staff("DELETE", "/api/v1/schedules/promo"))[0] == 204
    assert (await staff("DELETE", "/api/v1/schedules/promo"))[0] == 404
    assert await list_repeatables(redis, web_settings.namespace) == []


async def test_recent_events_show_a_twice_published_row_once(
        staff: Caller, redis: aioredis.Redis, web_settings: Settings) -> None:
    for row_id in (7, 8, 7, 9):  # row 7 published again by a relay that crashed
        await append_event(redis, web_settings.namespace, "stock-updated", "stock.updated",
                           {"product_id": row_id}, event_id=row_id)
    _, body = await staff("GET", "/api/v1/events/stock-updated")
    assert [e["event_id"] for e in body["events"]] == ["9", "8", "7"]


SEND = {"queue": "emails", "actor": "send_order_confirmation", "args": [1]}


async def test_sending_a_job_refuses_unknown_fields_instead_of_dropping_them(
        staff: Caller, api: TestServer) -> None:
    """A typo (``option`` for ``options``) must not enqueue a job without its job_id."""
    jobs = api.app[seams.JOBS_ADMIN].jobs  # type: ignore[attr-defined]
    before = dict(jobs)
    status, body = await staff("POST", "/api/v1/jobs", json={**SEND, "option": {"job_id": "x"}})
    assert (status, body["error"]["code"], body["error"]["field"]) == (422, "invalid", "option")
    assert body["error"]["message"].startswith("unknown field(s): option;")
    status, body = await staff("POST", "/api/v1/jobs", json={**SEND, "kwargs": {"to": "a@b.c"},
                                                             "option": {}})
    assert (status, body["error"]["code"]) == (422, "invalid")
    assert "field" not in body["error"]  # two to blame: both are in the message
    assert body["error"]["message"].startswith("unknown field(s): kwargs, option;")
    assert jobs == before  # nothing was enqueued
    status, sent = await staff("POST", "/api/v1/jobs", json={**SEND, "options": {"job_id": "x"}})
    assert (status, sent["job_id"]) == (201, "x")


async def test_an_unknown_queue_in_a_body_is_invalid_and_in_a_path_not_found(
        staff: Caller) -> None:
    status, body = await staff("POST", "/api/v1/jobs", json={**SEND, "queue": "emials"})
    assert (status, body["error"]["code"], body["error"]["field"]) == (422, "invalid", "queue")
    status, body = await staff("POST", "/api/v1/queues/emials/pause")
    assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("method, path, body, field", [
    ("POST", "/api/v1/carts", {"customer": 1}, "customer"),
    ("POST", "/api/v1/reviews", {"product_id": 1, "rating": 5, "body": "ok", "title": "t"},
     "title"),
    ("POST", "/api/v1/support/questions", {"question": "where?", "order_id": 3}, "order_id"),
])
async def test_every_body_refuses_unknown_fields(ana: Caller, method: str, path: str,
                                                 body: dict[str, Any], field: str) -> None:
    status, answer = await ana(method, path, json=body)
    assert (status, answer["error"]["code"], answer["error"].get("field")) == (422, "invalid",
                                                                              field)


async def test_a_cart_item_and_a_repeatable_job_refuse_unknown_fields(
        ana: Caller, staff: Caller, redis: aioredis.Redis, web_settings: Settings) -> None:
    _, cart = await ana("POST", "/api/v1/carts", json={})
    status, answer = await ana("PUT", f"/api/v1/carts/{cart['id']}/items/1",
                               json={"quantity": 1, "qty": 2})
    assert (status, answer["error"]["field"]) == (422, "qty")
    status, answer = await staff("POST", "/api/v1/schedules", json={
        "name": "promo", "queue": "maintenance", "actor": "send_promo", "every_s": 60,
        "misfire_grace": 30})  # misfire_grace_s
    assert (status, answer["error"]["field"]) == (422, "misfire_grace")
    assert await list_repeatables(redis, web_settings.namespace) == []


async def test_recent_events_read_back_past_others_events_to_a_bound(
        ana: Caller, staff: Caller, publish: Publisher) -> None:
    """``limit`` counts events the caller may see, not entries read: a customer's one order
    behind many newer ones of others is found, up to MAX_EVENTS_SCANNED entries back."""
    from web.api_extra import MAX_EVENTS_SCANNED

    await publish("order-status-changed", {"order_id": 5, "customer_id": 1})
    for n in range(MAX_EVENTS_SCANNED - 1):  # the 1,000th newest entry is still read
        await publish("order-status-changed", {"order_id": 100 + n, "customer_id": 2})
    _, mine = await ana("GET", "/api/v1/events/order-status-changed?limit=2")
    assert [e["payload"]["order_id"] for e in mine["events"]] == [5]
    _, everything = await staff("GET", "/api/v1/events/order-status-changed?limit=3")
    assert [e["payload"]["order_id"] for e in everything["events"]] == [
        100 + MAX_EVENTS_SCANNED - n for n in (2, 3, 4)]
    await publish("order-status-changed", {"order_id": 1, "customer_id": 2})
    _, mine = await ana("GET", "/api/v1/events/order-status-changed?limit=2")
    assert mine["events"] == []  # the 1,001st newest: past the bound
