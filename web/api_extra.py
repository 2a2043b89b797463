"""The versioned JSON API beyond orders: carts, reviews, support, recommendations,
jobs and queues, schedules, the supervision tree, stock sync, recent events.

Cart changes and checkout call the carts concern and the orders workflow
(each change commits with its reminder job). Reviews, support history, stock
sync status and recent events are plain SQL/Redis reads here; repeatable jobs
are added and removed with the scheduler's own store functions
(:mod:`runtime.scheduling`). Everything else another concern owns goes
through the Protocols in :mod:`web.seams`. Customer endpoints see only the
caller's own data (someone else's cart is "not found", not "forbidden", so ids
leak nothing); staff endpoints need a staff token. ``web/openapi.py``
documents every route, and a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from actors.agents.moderation import flagged_reviews
from actors.agents.moderation import submit_review as store_review_for_moderation
from actors.carts import carts
from actors.housekeeping.schedules import builtin_names
from actors.notifier.channels import CHANNELS, may_receive, may_subscribe
from actors.notifier.streams import event_json, stream_key, text, text_fields
from actors.orders import workflow
from runtime import db
from runtime.errors import Conflict, Forbidden, NotAvailable, NotFound, ValidationError
from runtime.jobs.store import JOB_STATES
from runtime.scheduling import (
    SchedulerStore,
    add_repeatable,
    remove_repeatable,
    repeatable_from_request,
    schedule_view,
)
from runtime.settings import Settings
from web import seams
from web.adapters import schedule_json
from web.auth import Principal, authenticate, ensure_signer, require_staff
from web.httpkit import (
    int_value,
    json_errors,
    ok,
    path_id,
    query_choice,
    query_int,
    read_json,
    text_value,
)

PREFIX = "/api/v1"
POOL_KEY = web.AppKey("api_pool", asyncpg.Pool)
REDIS_KEY = web.AppKey("api_redis", aioredis.Redis)
# Bounds on client input.
MAX_CART_QUANTITY = 1_000
MAX_REVIEW_CHARS = 5_000
MAX_QUESTION_CHARS = 2_000
MAX_LIST_LIMIT = 100
# GET /events/{channel} reads the stream newest first, this many entries a round trip...
EVENTS_PAGE = 100
# ... and gives up after this many: a customer's few events in a busy stream are not worth more.
MAX_EVENTS_SCANNED = 1_000
# How deep an operator may page into a job list (GET /api/v1/jobs?offset=).
MAX_JOBS_OFFSET = 10_000
# A job sent over HTTP: at most this many arguments (a message is small; data lives in the DB).
MAX_JOB_ARGS = 32
# The fields of POST /jobs; any other is refused (a typo must not drop a job_id silently).
SEND_JOB_FIELDS = ("queue", "actor", "args", "options")
REVIEW_STATUSES = ("pending", "approved", "rejected", "manual_review")
# The api's own pool, when create_app did not hand one over (small: requests are short).
OWN_POOL_MAX = 5

T = TypeVar("T")


def _seam(request: web.Request, key: web.AppKey[T], what: str) -> T:
    value = request.app.get(key)
    if value is None:
        raise NotAvailable(f"{what} is not wired into this api process")
    return value


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.app[POOL_KEY]


def _customer_scope(principal: Principal, requested: Any) -> int:
    """The customer a request acts for: customers act for themselves, staff must say who."""
    if principal.is_staff:
        if requested is None:
            raise ValidationError("staff must give customer_id", field="customer_id")
        return int_value(requested, "customer_id")
    if requested is not None and requested != principal.customer_id:
        raise Forbidden("customers act only for themselves")
    assert principal.customer_id is not None
    return principal.customer_id


# --- me ---------------------------------------------------------------------------------


async def get_me(request: web.Request) -> web.Response:
    """Who the token says the caller is (the dashboard checks its token with this)."""
    principal = authenticate(request)
    return ok({"role": principal.role, "customer_id": principal.customer_id,
               "expires_at": principal.expires_at_s})


# --- carts ------------------------------------------------------------------------------
# Cart changes live in actors/carts/carts.py (each commits with its reminder job);
# checkout in actors/orders/workflow.py. The handlers parse, call and answer.


async def create_cart(request: web.Request) -> web.Response:
    """Open a cart for the caller (staff: for the customer named in the body)."""
    principal = authenticate(request)
    body = await read_json(request, fields=("customer_id",))
    customer_id = _customer_scope(principal, body.get("customer_id"))
    async with _pool(request).acquire() as conn:
        return ok(await carts.create_cart(conn, customer_id), status=201)


async def list_carts(request: web.Request) -> web.Response:
    """The caller's carts, newest first (staff: any customer's, via ?customer_id=)."""
    principal = authenticate(request)
    raw = request.query.get("customer_id")
    requested = query_int(request, "customer_id", 0, 1, 2**63 - 1) if raw is not None else None
    customer_id = _customer_scope(principal, requested)
    limit = query_int(request, "limit", 20, 1, MAX_LIST_LIMIT)
    async with _pool(request).acquire() as conn:
        return ok({"carts": await carts.list_carts(conn, customer_id, limit)})


async def get_cart(request: web.Request) -> web.Response:
    """One cart with its items and total."""
    principal = authenticate(request)
    cart_id = path_id(request, "cart_id")
    async with _pool(request).acquire() as conn:
        cart = await carts.load_cart(conn, cart_id, principal.may_see_customer)
        return ok(await carts.cart_view(conn, cart))


async def put_cart_item(request: web.Request) -> web.Response:
    """Set a product's quantity in an open cart (adds it if absent)."""
    principal = authenticate(request)
    cart_id, product_id = path_id(request, "cart_id"), path_id(request, "product_id")
    body = await read_json(request, fields=("quantity",))
    quantity = int_value(body.get("quantity"), "quantity", 1, MAX_CART_QUANTITY)
    async with _pool(request).acquire() as conn:
        return ok(await carts.set_item(conn, cart_id, product_id, quantity,
                                       principal.may_see_customer))


async def delete_cart_item(request: web.Request) -> web.Response:
    """Remove a product from an open cart (removing an absent one is a no-op)."""
    principal = authenticate(request)
    cart_id, product_id = path_id(request, "cart_id"), path_id(request, "product_id")
    async with _pool(request).acquire() as conn:
        return ok(await carts.remove_item(conn, cart_id, product_id, principal.may_see_customer))


async def abandon_cart(request: web.Request) -> web.Response:
    """Abandon an open cart (idempotent); a checked-out cart cannot be abandoned."""
    principal = authenticate(request)
    cart_id = path_id(request, "cart_id")
    async with _pool(request).acquire() as conn:
        await carts.abandon(conn, cart_id, principal.may_see_customer)
    return web.Response(status=204)


async def checkout_cart(request: web.Request) -> web.Response:
    """Place the order of an open cart (201); again for the same cart: its order (200)."""
    principal = authenticate(request)
    cart_id = path_id(request, "cart_id")
    order, created = await workflow.checkout_cart(_pool(request), cart_id,
                                                  principal.may_see_customer)
    return ok(order, status=201 if created else 200)


# --- reviews ----------------------------------------------------------------------------

_REVIEW_COLUMNS = ("id, customer_id, product_id, rating, body, status, moderation, "
                   "created_at, moderated_at")


async def submit_review(request: web.Request) -> web.Response:
    """A customer reviews a product; the review waits for moderation (202)."""
    principal = authenticate(request)
    if principal.is_staff:
        raise Forbidden("reviews are written by customers")
    body = await read_json(request, fields=("product_id", "rating", "body"))
    product_id = int_value(body.get("product_id"), "product_id")
    rating = int_value(body.get("rating"), "rating", 1, 5)
    text = text_value(body.get("body"), "body", MAX_REVIEW_CHARS)
    pool = _pool(request)
    if await pool.fetchval("SELECT 1 FROM products WHERE id = $1", product_id) is None:
        raise ValidationError(f"no product {product_id}", field="product_id")
    # The review and its moderation job commit together (the job rides on the outbox).
    assert principal.customer_id is not None
    review_id = await store_review_for_moderation(pool, principal.customer_id, product_id, rating, text)
    row = await pool.fetchrow(f"SELECT {_REVIEW_COLUMNS} FROM reviews WHERE id = $1", review_id)
    requested = "requested"
    return ok({"review": dict(row), "moderation": requested}, status=202)


async def get_review(request: web.Request) -> web.Response:
    """One review: its author or staff."""
    principal = authenticate(request)
    review_id = path_id(request, "review_id")
    row = await _pool(request).fetchrow(
        f"SELECT {_REVIEW_COLUMNS} FROM reviews WHERE id = $1", review_id)
    if row is None or not principal.may_see_customer(row["customer_id"]):
        raise NotFound(f"no review {review_id}")
    return ok(dict(row))


async def list_product_reviews(request: web.Request) -> web.Response:
    """A product's approved reviews; staff may list any status with ?status=.

    A public listing: customers read everyone's reviews, so the author's
    ``customer_id`` is shown to staff only (ids leak who bought what).
    """
    principal = authenticate(request)
    product_id = path_id(request, "product_id")
    status = query_choice(request, "status", REVIEW_STATUSES, "approved")
    if status != "approved" and not principal.is_staff:
        raise Forbidden("only staff see reviews that are not approved")
    limit = query_int(request, "limit", 20, 1, MAX_LIST_LIMIT)
    rows = await _pool(request).fetch(
        f"SELECT {_REVIEW_COLUMNS} FROM reviews WHERE product_id = $1 AND status = $2 "
        "ORDER BY id DESC LIMIT $3", product_id, status, limit)
    reviews = [dict(r) for r in rows]
    if not principal.is_staff:
        for review in reviews:
            del review["customer_id"]
    return ok({"reviews": reviews})


async def list_flagged_reviews(request: web.Request) -> web.Response:
    """Staff: the newest moderation results that did not approve, with an excerpt of each review."""
    require_staff(request)
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    return ok({"reviews": await flagged_reviews(_pool(request), limit)})


# --- support and recommendations --------------------------------------------------------


async def ask_support(request: web.Request) -> web.Response:
    """A customer asks a question; the support agent answers (and stores it)."""
    principal = authenticate(request)
    body = await read_json(request, fields=("customer_id", "question"))
    customer_id = _customer_scope(principal, body.get("customer_id"))
    question = text_value(body.get("question"), "question", MAX_QUESTION_CHARS)
    desk = _seam(request, seams.SUPPORT_DESK, "the support agent")
    return ok(await desk.ask(customer_id, question), status=201)


async def list_support(request: web.Request) -> web.Response:
    """The caller's past questions and answers, newest first."""
    principal = authenticate(request)
    raw = request.query.get("customer_id")
    requested = query_int(request, "customer_id", 0, 1, 2**63 - 1) if raw is not None else None
    customer_id = _customer_scope(principal, requested)
    limit = query_int(request, "limit", 20, 1, MAX_LIST_LIMIT)
    rows = await _pool(request).fetch(
        "SELECT id, customer_id, question, answer, source, created_at FROM support_interactions "
        "WHERE customer_id = $1 ORDER BY id DESC LIMIT $2", customer_id, limit)
    return ok({"questions": [dict(r) for r in rows]})


async def get_recommendations(request: web.Request) -> web.Response:
    """Recommendations for a customer: the customer themself or staff."""
    principal = authenticate(request)
    customer_id = path_id(request, "customer_id")
    if not principal.may_see_customer(customer_id):
        raise NotFound(f"no customer {customer_id}")
    limit = query_int(request, "limit", 5, 1, 50)
    recommender = _seam(request, seams.RECOMMENDER, "the recommendation agent")
    return ok(await recommender.recommend(customer_id, limit))


# --- staff: jobs, queues, schedules, supervision, stock sync, events ---------------------


async def list_queues(request: web.Request) -> web.Response:
    """Every queue with its counts and throughput."""
    require_staff(request)
    admin = _seam(request, seams.JOBS_ADMIN, "the jobs admin")
    return ok({"queues": await admin.queues()})


async def list_jobs(request: web.Request) -> web.Response:
    """Jobs in a state (failed by default), optionally of one queue; ``offset`` pages."""
    require_staff(request)
    state = query_choice(request, "state", JOB_STATES, "failed")
    queue = request.query.get("queue")
    if queue is not None:
        queue = text_value(queue, "queue", 100)
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    offset = query_int(request, "offset", 0, 0, MAX_JOBS_OFFSET)
    admin = _seam(request, seams.JOBS_ADMIN, "the jobs admin")
    return ok({"jobs": await admin.list_jobs(state or "failed", queue, limit, offset)})


def _job_id(request: web.Request) -> str:
    return text_value(request.match_info["job_id"], "job_id", 200)


async def get_job(request: web.Request) -> web.Response:
    """One job with its history."""
    require_staff(request)
    job_id = _job_id(request)
    job = await _seam(request, seams.JOBS_ADMIN, "the jobs admin").get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return ok(job)


async def retry_job(request: web.Request) -> web.Response:
    """Enqueue a failed, dead or cancelled job again with fresh attempts."""
    require_staff(request)
    job_id = _job_id(request)
    if not await _seam(request, seams.JOBS_ADMIN, "the jobs admin").retry_job(job_id):
        raise NotFound(f"no job {job_id}")
    return ok({"job_id": job_id, "retried": True}, status=202)


async def remove_job(request: web.Request) -> web.Response:
    """Delete a job that is not running."""
    require_staff(request)
    job_id = _job_id(request)
    if not await _seam(request, seams.JOBS_ADMIN, "the jobs admin").remove_job(job_id):
        raise NotFound(f"no job {job_id}")
    return web.Response(status=204)


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a job that has not started, or ask a running one to stop."""
    require_staff(request)
    job_id = _job_id(request)
    status = await _seam(request, seams.JOBS_ADMIN, "the jobs admin").cancel_job(job_id)
    return ok({"job_id": job_id, "status": status}, status=202)


async def send_job(request: web.Request) -> web.Response:
    """Enqueue a job for a declared actor: the producer API for those who cannot write Redis.

    Every mistake in the body is a 422 naming its field, an unknown queue
    included: 404 is for a path that names nothing (``/queues/{queue}/...``).
    """
    require_staff(request)
    body = await read_json(request, fields=SEND_JOB_FIELDS)
    queue = text_value(body.get("queue"), "queue", 100)
    actor = text_value(body.get("actor"), "actor", 200)
    args = body.get("args", [])
    if not isinstance(args, list) or len(args) > MAX_JOB_ARGS:
        raise ValidationError(f"args must be a list of at most {MAX_JOB_ARGS} JSON values",
                              field="args")
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise ValidationError("options must be an object of job options", field="options")
    admin = _seam(request, seams.JOBS_ADMIN, "the jobs admin")
    try:
        sent = await admin.send_job(queue, actor, args, options)
    except NotFound as exc:  # the seam's answer for an unknown queue (web/seams.py)
        raise ValidationError(str(exc), field="queue") from None
    return ok(sent, status=200 if sent.get("duplicate") else 201)


def _queue(request: web.Request) -> str:
    return text_value(request.match_info["queue"], "queue", 100)


async def pause_queue(request: web.Request) -> web.Response:
    """Stop workers taking jobs of a queue; producers may still send."""
    require_staff(request)
    queue = _queue(request)
    changed = await _seam(request, seams.JOBS_ADMIN, "the jobs admin").pause_queue(queue)
    return ok({"queue": queue, "paused": True, "changed": changed})


async def resume_queue(request: web.Request) -> web.Response:
    """Let workers take jobs of a queue again."""
    require_staff(request)
    queue = _queue(request)
    changed = await _seam(request, seams.JOBS_ADMIN, "the jobs admin").resume_queue(queue)
    return ok({"queue": queue, "paused": False, "changed": changed})


async def empty_dead(request: web.Request) -> web.Response:
    """Delete the dead (quarantined) jobs of a queue."""
    require_staff(request)
    queue = _queue(request)
    deleted = await _seam(request, seams.JOBS_ADMIN, "the jobs admin").empty_dead(queue)
    return ok({"queue": queue, "deleted": deleted})


async def list_schedules(request: web.Request) -> web.Response:
    """The cron schedules with their next runs."""
    require_staff(request)
    view = _seam(request, seams.SCHEDULES, "the scheduler view")
    return ok({"schedules": await view.schedules()})


async def add_schedule(request: web.Request) -> web.Response:
    """Add a repeatable job (a cron expression in a zone, or every N seconds).

    It is stored in Redis; every scheduler reads the store on each tick, so
    the leader starts firing it without a restart, from its first slot after
    now (no backfill). Built-in schedule names and taken names are a 409.
    """
    require_staff(request)
    body = await read_json(request)
    settings = request.app[API_SETTINGS_KEY]
    redis = request.app[REDIS_KEY]
    now = datetime.now(UTC)
    schedule = await add_repeatable(
        redis, settings.namespace, repeatable_from_request(body, settings.timezone), now,
        reserved_names=builtin_names(settings))
    state = await SchedulerStore(redis, settings.namespace).state(schedule.name)
    return ok(schedule_json(schedule_view(schedule, state, now, settings.timezone)), status=201)


async def remove_schedule(request: web.Request) -> web.Response:
    """Remove a repeatable job; a run already sent still runs, no further slot is sent."""
    require_staff(request)
    name = request.match_info["name"]
    settings = request.app[API_SETTINGS_KEY]
    if name in builtin_names(settings):
        raise Conflict(f"{name!r} is a built-in schedule and cannot be removed")
    if not await remove_repeatable(request.app[REDIS_KEY], settings.namespace, name):
        raise NotFound(f"no repeatable job named {name!r}")
    return web.Response(status=204)


async def get_supervision(request: web.Request) -> web.Response:
    """The supervision tree with restart counts."""
    require_staff(request)
    return ok(await _seam(request, seams.SUPERVISION, "the supervision view").tree())


async def get_stock_sync(request: web.Request) -> web.Response:
    """How fresh the stock synced from the warehouse is."""
    require_staff(request)
    row = await _pool(request).fetchrow(
        """SELECT count(*) AS products,
                  count(*) FILTER (WHERE external_id IS NOT NULL) AS linked,
                  count(*) FILTER (WHERE synced_at IS NULL) AS never_synced,
                  max(synced_at) AS last_synced_at,
                  min(synced_at) AS oldest_synced_at
             FROM inventory""")
    return ok(dict(row))


async def recent_events(request: web.Request) -> web.Response:
    """The newest events of a channel the caller may see (the dashboard's start state)."""
    principal = authenticate(request)
    channel = request.match_info["channel"]
    if channel not in CHANNELS:
        raise NotFound(f"no channel {channel}")
    if not may_subscribe(principal, channel):  # as the WebSocket's 4403 for the same ask
        raise Forbidden(f"{channel} is for staff only")
    limit = query_int(request, "limit", 20, 1, MAX_LIST_LIMIT)
    key = stream_key(request.app[API_SETTINGS_KEY].namespace, channel)
    events = await _newest_visible(request.app[REDIS_KEY], key, channel, principal, limit)
    return ok({"channel": channel, "events": events})


async def _newest_visible(redis: aioredis.Redis, key: str, channel: str, viewer: Principal,
                          limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` of the newest events of the stream ``viewer`` may see, newest first.

    The filter comes after the read, so the newest ``limit`` entries may hold
    fewer visible events (a customer's orders among everyone's): read on,
    :data:`EVENTS_PAGE` entries at a time, until there are enough, the stream
    starts, or :data:`MAX_EVENTS_SCANNED` entries were read.
    """
    scanned: list[dict[str, Any] | None] = []
    visible: list[dict[str, Any]] = []
    newest = "+"
    while len(scanned) < MAX_EVENTS_SCANNED:
        count = min(EVENTS_PAGE, MAX_EVENTS_SCANNED - len(scanned))
        page: Any = await redis.xrevrange(key, max=newest, count=count)
        # The client may answer bytes (create_app's shared one does) or str: decode either way.
        scanned += [event_json(channel, text(entry_id), text_fields(fields))
                    for entry_id, fields in page]
        # Again over everything read: an older page may hold a row's first copy.
        visible = [e for e in _first_copies(scanned)
                   if may_receive(viewer, channel, e["payload"])]
        if len(visible) >= limit or len(page) < count:
            break
        newest = "(" + text(page[-1][0])
    return visible[:limit]


def _first_copies(newest_first: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The events without repeats: a row the outbox relay published twice is shown once,
    at its first entry, as the WebSocket delivers it (actors/notifier/notifier.py)."""
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    for event in reversed(newest_first):
        if event is None:
            continue
        event_id = event["event_id"]
        if event_id:
            if event_id in seen:
                continue
            seen.add(event_id)
        kept.append(event)
    return kept[::-1]


# --- wiring -------------------------------------------------------------------------------

API_SETTINGS_KEY = web.AppKey("api_settings", Settings)

ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/me", get_me),
    ("POST", "/carts", create_cart),
    ("GET", "/carts", list_carts),
    ("GET", "/carts/{cart_id}", get_cart),
    ("DELETE", "/carts/{cart_id}", abandon_cart),
    ("PUT", "/carts/{cart_id}/items/{product_id}", put_cart_item),
    ("DELETE", "/carts/{cart_id}/items/{product_id}", delete_cart_item),
    ("POST", "/carts/{cart_id}/checkout", checkout_cart),
    ("POST", "/reviews", submit_review),
    ("GET", "/reviews/{review_id}", get_review),
    ("GET", "/products/{product_id}/reviews", list_product_reviews),
    ("GET", "/moderation/flagged", list_flagged_reviews),
    ("POST", "/support/questions", ask_support),
    ("GET", "/support/questions", list_support),
    ("GET", "/customers/{customer_id}/recommendations", get_recommendations),
    ("GET", "/queues", list_queues),
    ("POST", "/queues/{queue}/pause", pause_queue),
    ("POST", "/queues/{queue}/resume", resume_queue),
    ("DELETE", "/queues/{queue}/dead", empty_dead),
    ("GET", "/jobs", list_jobs),
    ("POST", "/jobs", send_job),
    ("GET", "/jobs/{job_id}", get_job),
    ("POST", "/jobs/{job_id}/retry", retry_job),
    ("POST", "/jobs/{job_id}/cancel", cancel_job),
    ("DELETE", "/jobs/{job_id}", remove_job),
    ("GET", "/schedules", list_schedules),
    ("POST", "/schedules", add_schedule),
    ("DELETE", "/schedules/{name}", remove_schedule),
    ("GET", "/supervision", get_supervision),
    ("GET", "/stock-sync", get_stock_sync),
    ("GET", "/events/{channel}", recent_events),
]


def setup_api(app: web.Application, settings: Settings) -> None:
    """Add the extra API routes and the OpenAPI document; open a pool/Redis if none is given.

    ``create_app`` may hand over its own pool and Redis client by setting
    ``app[POOL_KEY]`` / ``app[REDIS_KEY]`` in a cleanup context registered
    before this one; otherwise the API opens (and closes) its own.
    """
    from web.openapi import add_openapi_route

    ensure_signer(app, settings)
    app[API_SETTINGS_KEY] = settings
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, json_errors(handler))
    add_openapi_route(app)
    app.cleanup_ctx.append(_resources_ctx(settings))


def _resources_ctx(settings: Settings) -> Any:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        redis_url, database_url = settings.require_urls()
        async with contextlib.AsyncExitStack() as stack:
            if POOL_KEY not in app:
                pool = await db.create_pool(database_url, min_size=1, max_size=OWN_POOL_MAX)
                stack.push_async_callback(pool.close)
                app[POOL_KEY] = pool
            if REDIS_KEY not in app:
                client = aioredis.Redis.from_url(redis_url, decode_responses=True,
                                                 encoding_errors="replace")
                stack.push_async_callback(client.aclose)
                app[REDIS_KEY] = client
            yield

    return resources
