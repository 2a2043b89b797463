"""The OpenAPI 3 document of the HTTP API, served at ``/api/v1/openapi.json``.

Every operation of the API is described here, including the orders and
health endpoints that ``web/app.py`` adds. The served document lists the
operations whose routes the running app has, and
``tests/web/test_openapi.py`` checks that every route is documented and every
documented operation is routed, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from actors.notifier.channels import CHANNELS
from runtime.broker import ALL_QUEUES
from runtime.scheduling import MisfirePolicy, OverlapPolicy
from runtime.scheduling.schedule import MAX_POLICY_S
from runtime.scheduling.triggers import MAX_INTERVAL_S

OPENAPI_PATH = "/api/v1/openapi.json"
Schema = dict[str, Any]

ID: Schema = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
OBJ: Schema = {"type": "object"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Schema] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "message"], "properties": {
            "status": {"type": "integer"}, "message": {"type": "string"},
            "code": {"type": "string"}, "field": {"type": ["string", "null"]}}}}},
    "Me": {"type": "object", "required": ["role", "customer_id", "expires_at"], "properties": {
        "role": {"enum": ["customer", "staff"]},
        "customer_id": {"type": ["integer", "null"]}, "expires_at": {"type": "integer"}}},
    "CartItem": {"type": "object", "required": ["product_id", "quantity"], "properties": {
        "product_id": {"type": "integer"}, "name": {"type": "string"},
        "quantity": {"type": "integer"}, "unit_price_cents": {"type": "integer"},
        "line_total_cents": {"type": "integer"}}},
    "Cart": {"type": "object", "required": ["id", "customer_id", "status", "items",
                                            "total_cents"], "properties": {
        "id": {"type": "integer"}, "customer_id": {"type": ["integer", "null"]},
        "status": {"enum": ["open", "checked_out", "abandoned"]},
        "items": {"type": "array", "items": ref("CartItem")},
        "total_cents": {"type": "integer"}, "created_at": TIME, "updated_at": TIME}},
    "Review": {"type": "object", "required": ["id", "customer_id", "product_id", "rating",
                                              "body", "status"], "properties": {
        "id": {"type": "integer"}, "customer_id": {"type": "integer"},
        "product_id": {"type": "integer"}, "rating": {"type": "integer"},
        "body": {"type": "string"},
        "status": {"enum": ["pending", "approved", "rejected", "manual_review"]},
        "moderation": {}, "created_at": TIME, "moderated_at": TIME}},
    # A product's public review listing: the author's customer_id is for staff only.
    "ProductReview": {"type": "object", "required": ["id", "product_id", "rating", "body",
                                                     "status"], "properties": {
        "id": {"type": "integer"},
        "customer_id": {"type": "integer", "description": "the author; present for staff only"},
        "product_id": {"type": "integer"}, "rating": {"type": "integer"},
        "body": {"type": "string"},
        "status": {"enum": ["pending", "approved", "rejected", "manual_review"]},
        "moderation": {}, "created_at": TIME, "moderated_at": TIME}},
    "FlaggedReview": {"type": "object", "required": ["review_id", "status", "source",
                                                     "categories", "current_status"],
                      "properties": {
        "review_id": {"type": "integer"},
        "status": {"enum": ["rejected", "manual_review"]},
        "source": {"type": "string"}, "confidence": {"type": ["number", "null"]},
        "categories": {"type": "array", "items": {"type": "string"}},
        "reason": {"type": ["string", "null"]}, "created_at": TIME,
        "product_id": {"type": "integer"}, "rating": {"type": "integer"},
        "excerpt": {"type": "string"},
        "current_status": {"enum": ["pending", "approved", "rejected", "manual_review"]}}},
    "SupportInteraction": {"type": "object", "required": ["id", "question"], "properties": {
        "id": {"type": "integer"}, "customer_id": {"type": "integer"},
        "question": {"type": "string"}, "answer": {"type": ["string", "null"]},
        "source": {"type": ["string", "null"]}, "created_at": TIME}},
    "SupportAnswer": {"type": "object", "required": ["answer"], "properties": {
        "id": {"type": "integer"}, "answer": {"type": "string"},
        "source": {"type": "string"}}},
    "Recommendations": {"type": "object", "required": ["items"], "properties": {
        "customer_id": {"type": "integer"}, "source": {"type": "string"},
        "items": {"type": "array", "items": OBJ}}},
    "Queue": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "waiting": {"type": "integer"},
        "pending": {"type": "integer", "description": "the same as waiting"},
        "active": {"type": "integer"}, "delayed": {"type": "integer"},
        "completed": {"type": "integer", "description": "kept completed jobs (keep-last-N)"},
        "failed": {"type": "integer"}, "dead": {"type": "integer"},
        "cancelled": {"type": "integer"}, "paused": {"type": "boolean"},
        "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
        "processed_per_min": {"type": "number"}}},
    "Job": {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string"}, "queue": {"type": "string"}, "actor": {"type": "string"},
        "state": {"enum": ["waiting", "delayed", "active", "completed", "skipped", "failed",
                           "dead", "cancelled"]},
        "attempt": {"type": "integer"}, "max_attempts": {"type": "integer"},
        "priority": {"type": "integer"}, "deaths": {"type": "integer"},
        "created_at": TIME, "enqueued_at": TIME, "started_at": TIME, "finished_at": TIME,
        "run_at": TIME, "error": {"type": ["string", "null"]}, "reason": {"type": "string"},
        "cancel_requested": {"type": "boolean"}, "progress": {}, "result": {},
        "args": {"type": "array"}, "options": OBJ,
        "history": {"type": "array", "items": OBJ}}},
    "JobSent": {"type": "object", "required": ["job_id", "state", "duplicate"], "properties": {
        "job_id": {"type": "string"}, "state": {"type": "string"},
        "duplicate": {"type": "boolean"}}},
    "Schedule": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "cron": {"type": "string"},
        "source": {"enum": ["builtin", "repeatable"]}, "queue": {"type": "string"},
        "actor": {"type": "string"}, "next_run_at": TIME, "last_run_at": TIME}},
    "SupervisionNode": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "kind": {"type": "string"}, "alive": {"type": "boolean"},
        "restarts": {"type": "integer"},
        "children": {"type": "array", "items": ref("SupervisionNode")}}},
    "StockSync": {"type": "object", "required": ["products", "linked", "never_synced"],
                  "properties": {
        "products": {"type": "integer"}, "linked": {"type": "integer"},
        "never_synced": {"type": "integer"}, "last_synced_at": TIME,
        "oldest_synced_at": TIME}},
    "Event": {"type": "object", "required": ["id", "channel", "payload"], "properties": {
        "id": {"type": "string"}, "channel": {"enum": list(CHANNELS)},
        "event_id": {"type": ["string", "null"], "description": "the outbox row's id"},
        "event": {"type": ["string", "null"]}, "payload": OBJ,
        "correlation_id": {"type": ["string", "null"],
                           "description": "ties the event to its order's logs and jobs"},
        "at": {"type": ["string", "null"]}}},
    "Order": {"type": "object", "required": ["id", "customer_id", "status", "items", "history"],
              "properties": {
        "id": {"type": "integer"}, "customer_id": {"type": "integer"},
        "status": {"type": "string"}, "status_reason": {"type": ["string", "null"]},
        "total_cents": {"type": "integer"}, "external_ref": {"type": ["string", "null"]},
        "correlation_id": {"type": "string"}, "created_at": TIME, "updated_at": TIME,
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "product_id": {"type": "integer"}, "quantity": {"type": "integer"},
            "unit_price_cents": {"type": "integer"}}}},
        "history": {"type": "array", "items": {"type": "object", "properties": {
            "from_status": {"type": ["string", "null"]}, "to_status": {"type": "string"},
            "reason": {"type": ["string", "null"]}, "at": TIME}}}}},
    "Health": {"type": "object"},
}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _resp(description: str, schema: Schema | None = None) -> Schema:
    out: Schema = {"description": description}
    if schema is not None:
        out["content"] = _json(schema)
    return out


def _list_of(key: str, item: str) -> Schema:
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": ref(item)}}}


def _path(name: str, schema: Schema | None = None) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema or ID}


def _query(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema}


LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": 100})
CUSTOMER_Q = _query("customer_id", ID)
ERRORS: dict[str, Schema] = {
    "401": _resp("missing, malformed, forged or expired token (`unauthenticated`)",
                 ref("Error")),
    "403": _resp("the token's role may not do this (`forbidden`)", ref("Error")),
    "404": _resp("no such thing, or not yours (`not_found`)", ref("Error")),
    "422": _resp("JSON of the wrong shape: missing, invalid or unknown fields (`invalid`); "
                 "`field` names the culprit when there is one", ref("Error")),
    "default": _resp("another error, same shape (409 `conflict`, 503 `not_available`)",
                     ref("Error")),
}
# Only operations that read a body can answer these.
BODY_ERRORS: dict[str, Schema] = {
    "400": _resp("the body is not JSON text (`bad_json`)", ref("Error")),
    "413": _resp("the body is over 64 KiB (`too_large`)", ref("Error")),
}
WHO = {"any": "Needs a token (customer or staff).", "staff": "Needs a staff token.",
       "none": "Public: no token needed."}


def op(summary: str, tag: str, ok_status: str, ok: Schema, auth: str = "any",
       params: list[Schema] | None = None, body: Schema | None = None,
       also: dict[str, Schema] | None = None, who: str | None = None) -> Schema:
    """One operation: ``auth`` is any (customer or staff), staff, or none (public).

    ``who`` replaces the standard sentence on who may call it, for operations
    whose rule depends on what is asked for (a customer's own orders).
    """
    errors = ERRORS if auth != "none" else {"default": ERRORS["default"]}
    if body is not None:
        errors = {**BODY_ERRORS, **errors}
    operation: Schema = {"summary": summary, "tags": [tag], "parameters": params or [],
                         "description": who or WHO[auth],
                         "responses": {ok_status: ok, **(also or {}), **errors}}
    if auth == "none":
        operation["security"] = []
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    return operation


def _body(required: list[str], props: Schema) -> Schema:
    """A request body object; a field not in ``props`` is a 422 (runtime.fields)."""
    return {"type": "object", "required": required, "properties": props,
            "additionalProperties": False}


CART_ID, PRODUCT_ID = _path("cart_id"), _path("product_id")
# What runtime.scheduling.repeatable_from_request accepts: exactly one of cron or every_s.
REPEATABLE_BODY: Schema = {
    "type": "object", "required": ["name", "queue", "actor"], "additionalProperties": False,
    "oneOf": [{"required": ["cron"]}, {"required": ["every_s"]}],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"},
        "queue": {"enum": list(ALL_QUEUES)},
        "actor": {"type": "string", "minLength": 1, "maxLength": 200},
        "args": {"type": "array"},
        "cron": {"type": "string", "description": "five fields, e.g. `*/15 * * * *`"},
        "timezone": {"type": "string", "description": "IANA zone of `cron` (default: the "
                                                      "shop's)"},
        "every_s": {"type": "integer", "minimum": 1, "maximum": MAX_INTERVAL_S},
        "misfire": {"enum": [p.value for p in MisfirePolicy]},
        "overlap": {"enum": [p.value for p in OverlapPolicy]},
        "misfire_grace_s": {"type": "number", "minimum": 0, "maximum": MAX_POLICY_S},
        "max_runtime_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_POLICY_S},
    },
}
JOB_ID = _path("job_id", {"type": "string", "minLength": 1, "maxLength": 200})
QUEUE = _path("queue", {"type": "string", "minLength": 1, "maxLength": 100})

OPERATIONS: dict[tuple[str, str], Schema] = {
    # --- owned by web/app.py (documented here so the document stays whole) ---
    ("GET", "/health"): op("Liveness and readiness of the process and its servers", "health",
                           "200", _resp("serving; status is degraded if the scheduler is stale",
                                              ref("Health")), auth="none",
                           also={"503": _resp("Redis or PostgreSQL unreachable",
                                              ref("Health"))}),
    ("POST", "/api/v1/orders"): op(
        "Place an order (starts stock reservation)", "orders", "201",
        _resp("the new order", ref("Order")),
        who="Staff (a service such as the checkout) may order for any customer; a customer "
            "token only for its own `customer_id` (403 otherwise). Repeating an `external_ref` "
            "returns that order (200), unless it is another customer's (409, not shown).",
        also={"200": _resp("the order already placed with this external_ref", ref("Order")),
              "409": _resp("a customer's external_ref names another customer's order",
                           ref("Error"))},
        body=_body(["customer_id", "items"], {
            "customer_id": ID, "external_ref": {"type": "string", "minLength": 1,
                                                "maxLength": 100},
            "items": {"type": "array", "minItems": 1, "maxItems": 100, "items": _body(
                ["product_id", "quantity"], {"product_id": ID,
                                             "quantity": {"type": "integer", "minimum": 1,
                                                          "maximum": 10_000}})}})),
    ("POST", "/api/v1/orders/{order_id}/payment"): op(
        "Confirm a reserved order's payment (idempotent)", "orders", "200",
        _resp("the order", ref("Order")), params=[_path("order_id")],
        who="Staff, or the customer who owns the order; anyone else's order is 404.",
        also={"409": _resp("the order is not reserved (yet)", ref("Error"))}),
    ("GET", "/api/v1/orders/{order_id}"): op(
        "An order with its items and status history", "orders", "200",
        _resp("the order", ref("Order")), params=[_path("order_id")],
        who="Staff, or the customer who owns the order; anyone else's order is 404, "
            "exactly as one that does not exist."),
    # --- web/api_extra.py ---
    ("GET", "/api/v1/me"): op("Who the token names", "auth", "200", _resp("the caller",
                                                                          ref("Me"))),
    ("POST", "/api/v1/carts"): op(
        "Open a cart (staff: for customer_id)", "carts", "201", _resp("the cart", ref("Cart")),
        body=_body([], {"customer_id": ID})),
    ("GET", "/api/v1/carts"): op("The caller's carts", "carts", "200",
                                 _resp("carts", _list_of("carts", "Cart")),
                                 params=[CUSTOMER_Q, LIMIT]),
    ("GET", "/api/v1/carts/{cart_id}"): op("One cart", "carts", "200",
                                           _resp("the cart", ref("Cart")), params=[CART_ID]),
    ("DELETE", "/api/v1/carts/{cart_id}"): op("Abandon a cart", "carts", "204",
                                              _resp("abandoned"), params=[CART_ID]),
    ("PUT", "/api/v1/carts/{cart_id}/items/{product_id}"): op(
        "Set a product's quantity in a cart", "carts", "200", _resp("the cart", ref("Cart")),
        params=[CART_ID, PRODUCT_ID],
        body=_body(["quantity"], {"quantity": {"type": "integer", "minimum": 1,
                                               "maximum": 1000}})),
    ("DELETE", "/api/v1/carts/{cart_id}/items/{product_id}"): op(
        "Remove a product from a cart", "carts", "200", _resp("the cart", ref("Cart")),
        params=[CART_ID, PRODUCT_ID]),
    ("POST", "/api/v1/carts/{cart_id}/checkout"): op(
        "Check out a cart: place its order (starts stock reservation), cancel its reminder",
        "carts", "201", _resp("the new order", ref("Order")), params=[CART_ID],
        also={"200": _resp("the order this cart was already checked out as", ref("Order"))}),
    ("POST", "/api/v1/reviews"): op(
        "Submit a review (starts moderation)", "reviews", "202",
        _resp("accepted", {"type": "object", "required": ["review", "moderation"],
                           "properties": {"review": ref("Review"),
                                          "moderation": {"enum": ["requested",
                                                                  "unavailable"]}}}),
        body=_body(["product_id", "rating", "body"], {
            "product_id": ID, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "body": {"type": "string", "minLength": 1, "maxLength": 5000}})),
    ("GET", "/api/v1/reviews/{review_id}"): op("One review (author or staff)", "reviews", "200",
                                               _resp("the review", ref("Review")),
                                               params=[_path("review_id")]),
    ("GET", "/api/v1/products/{product_id}/reviews"): op(
        "A product's reviews (approved; staff: any status, and the author's customer_id)",
        "reviews", "200", _resp("reviews", _list_of("reviews", "ProductReview")),
        params=[PRODUCT_ID, _query("status", {"enum": ["pending", "approved", "rejected",
                                                       "manual_review"]}), LIMIT]),
    ("GET", "/api/v1/moderation/flagged"): op(
        "Reviews moderation did not approve (rejected or held for a person), newest first",
        "reviews", "200", _resp("flagged reviews", _list_of("reviews", "FlaggedReview")),
        auth="staff", params=[LIMIT]),
    ("POST", "/api/v1/support/questions"): op(
        "Ask support a question", "support", "201", _resp("the answer", ref("SupportAnswer")),
        body=_body(["question"], {"customer_id": ID, "question": {
            "type": "string", "minLength": 1, "maxLength": 2000}})),
    ("GET", "/api/v1/support/questions"): op(
        "The caller's support history", "support", "200",
        _resp("questions", _list_of("questions", "SupportInteraction")),
        params=[CUSTOMER_Q, LIMIT]),
    ("GET", "/api/v1/customers/{customer_id}/recommendations"): op(
        "Recommendations for a customer", "recommendations", "200",
        _resp("recommendations", ref("Recommendations")),
        params=[_path("customer_id"), _query("limit", {"type": "integer", "minimum": 1,
                                                       "maximum": 50})]),
    ("GET", "/api/v1/queues"): op("Queues with counts and throughput", "jobs", "200",
                                  _resp("queues", _list_of("queues", "Queue")), auth="staff"),
    ("POST", "/api/v1/queues/{queue}/pause"): op(
        "Pause a queue (it keeps accepting jobs; workers take none)", "jobs", "200",
        _resp("paused", {"type": "object", "required": ["queue", "paused", "changed"]}),
        auth="staff", params=[QUEUE]),
    ("POST", "/api/v1/queues/{queue}/resume"): op(
        "Resume a paused queue", "jobs", "200",
        _resp("resumed", {"type": "object", "required": ["queue", "paused", "changed"]}),
        auth="staff", params=[QUEUE]),
    ("DELETE", "/api/v1/queues/{queue}/dead"): op(
        "Empty a queue's dead-letter set", "jobs", "200",
        _resp("emptied", {"type": "object", "required": ["queue", "deleted"]}),
        auth="staff", params=[QUEUE]),
    ("GET", "/api/v1/jobs"): op(
        "Jobs in a state", "jobs", "200", _resp("jobs", _list_of("jobs", "Job")), auth="staff",
        params=[_query("state", {"enum": ["waiting", "delayed", "active", "completed",
                                          "failed", "dead", "cancelled"]}),
                _query("queue", {"type": "string", "minLength": 1, "maxLength": 100}), LIMIT,
                _query("offset", {"type": "integer", "minimum": 0, "maximum": 10_000})]),
    ("POST", "/api/v1/jobs"): op(
        "Enqueue a job for a declared actor (docs/jobs.md: the message contract)", "jobs",
        "201", _resp("enqueued", ref("JobSent")), auth="staff",
        also={"200": _resp("a job with this job_id already waits, runs or just completed",
                           ref("JobSent")),
              "503": _resp("the queue is full (queue_full) or the jobs admin is missing",
                           ref("Error"))},
        body=_body(["queue", "actor"], {
            "queue": {"type": "string", "minLength": 1, "maxLength": 100,
                      "description": "a queue of the job layer; another is 422 with "
                                     "`field: queue`"},
            "actor": {"type": "string", "minLength": 1, "maxLength": 200},
            "args": {"type": "array", "maxItems": 32},
            "options": {"type": "object", "description": "job options: job_id, attempts, "
                        "backoff, backoff_ms, backoff_max_ms, jitter, delay_ms, priority, "
                        "timeout_ms, keep_completed, keep_failed, limit_key, dedup_s, "
                        "critical, correlation_id"}})),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): op(
        "Cancel a job (a running one is asked to stop)", "jobs", "202",
        _resp("cancelled or requested", {"type": "object", "required": ["job_id", "status"],
                                         "properties": {"status": {"enum": [
                                             "cancelled", "requested"]}}}),
        auth="staff", params=[JOB_ID]),
    ("GET", "/api/v1/jobs/{job_id}"): op("One job", "jobs", "200", _resp("the job", ref("Job")),
                                         auth="staff", params=[JOB_ID]),
    ("POST", "/api/v1/jobs/{job_id}/retry"): op(
        "Retry a failed, dead or cancelled job", "jobs", "202",
        _resp("re-enqueued", {"type": "object", "required": ["job_id", "retried"]}),
        auth="staff", params=[JOB_ID]),
    ("DELETE", "/api/v1/jobs/{job_id}"): op("Remove a job that is not running", "jobs", "204",
                                            _resp("removed"), auth="staff", params=[JOB_ID]),
    ("GET", "/api/v1/schedules"): op("Cron schedules with next runs", "schedules", "200",
                                     _resp("schedules", _list_of("schedules", "Schedule")),
                                     auth="staff"),
    ("POST", "/api/v1/schedules"): op(
        "Add a repeatable job; running schedulers pick it up on their next tick", "schedules",
        "201", _resp("the stored schedule with its next runs", ref("Schedule")), auth="staff",
        body=REPEATABLE_BODY,
        also={"409": _resp("the name is a built-in schedule's or already taken", ref("Error"))}),
    ("DELETE", "/api/v1/schedules/{name}"): op(
        "Remove a repeatable job (a run already sent still runs)", "schedules", "204",
        _resp("removed"), auth="staff",
        params=[_path("name", {"type": "string", "minLength": 1, "maxLength": 100})],
        also={"409": _resp("built-in schedules cannot be removed", ref("Error"))}),
    ("GET", "/api/v1/supervision"): op("The supervision tree", "supervision", "200",
                                       _resp("the tree", ref("SupervisionNode")), auth="staff"),
    ("GET", "/api/v1/stock-sync"): op("Stock sync freshness", "inventory", "200",
                                      _resp("status", ref("StockSync")), auth="staff"),
    ("GET", "/api/v1/events/{channel}"): op(
        "Newest events of a channel (filtered to what the caller may see)", "events", "200",
        _resp("events", {"type": "object", "required": ["channel", "events"], "properties": {
            "channel": {"type": "string"}, "events": {"type": "array",
                                                      "items": ref("Event")}}}),
        params=[_path("channel", {"enum": list(CHANNELS)}), LIMIT]),
    ("GET", OPENAPI_PATH): op("This document", "meta", "200", _resp("OpenAPI 3.1", OBJ),
                              auth="none"),
}


def routed_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every JSON route of ``app`` (not /ws, the dashboard or static files)."""
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or route.method in ("HEAD", "OPTIONS", "*"):
            continue
        if path == "/health" or path.startswith("/api/"):
            found.add((route.method, path))
    return found


def build_document(app: web.Application) -> Schema:
    """The document for this app: the operations it routes."""
    paths: dict[str, Schema] = {}
    for method, path in sorted(routed_operations(app)):
        spec = OPERATIONS.get((method, path))
        if spec is not None:
            paths.setdefault(path, {})[method.lower()] = spec
    return {
        "openapi": "3.1.0",
        "info": {"title": "ShopFlow runtime API", "version": "1",
                 "description": "Tokens come from `shopflow token`; send "
                                "`Authorization: Bearer <token>`. Live events: the "
                                "WebSocket at /ws (see docs/web.md)."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


def add_openapi_route(app: web.Application) -> None:
    """Serve the document (built on first request, once every route is in)."""

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(build_document(request.app))

    app.router.add_get(OPENAPI_PATH, openapi, allow_head=False)
