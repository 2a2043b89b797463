"""Request helpers shared by the simulators: bearer auth, JSON bodies, idempotency keys."""

from __future__ import annotations

from typing import Any

from aiohttp import web

TOKEN_KEY = web.AppKey("simulator_token", str)


def check_auth(request: web.Request) -> None:
    """401 unless the app has no token or the request carries ``Bearer <token>``."""
    token = request.app.get(TOKEN_KEY)
    if token and request.headers.get("Authorization") != f"Bearer {token}":
        raise web.HTTPUnauthorized(text='{"error": "missing or wrong bearer token"}',
                                   content_type="application/json")


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "body is not JSON"}',
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be an object"}',
                                 content_type="application/json")
    return body


def idempotency_key(request: web.Request) -> str:
    """The required ``Idempotency-Key`` header, or a 400."""
    key = request.headers.get("Idempotency-Key", "")
    if not 1 <= len(key) <= 255:
        raise web.HTTPBadRequest(text='{"error": "Idempotency-Key header is required"}',
                                 content_type="application/json")
    return key


def order_id_of(body: dict[str, Any]) -> int:
    """The body's positive integer ``order_id``, or a 422."""
    order_id = body.get("order_id")
    if not isinstance(order_id, int) or isinstance(order_id, bool) or order_id <= 0:
        raise web.HTTPUnprocessableEntity(text='{"error": "order_id must be a positive integer"}',
                                          content_type="application/json")
    return order_id
