"""Helpers for JSON handlers: input validation and translating errors to 4xx.

Every handler of the extra API is wrapped by :func:`json_errors`, so a domain
error becomes its HTTP status with the API's error body
``{"error": {"status", "message", "code", "field"?}}`` (the shape of
``web/app.py``'s middleware) whatever middleware the app has, and bad input
can never surface as a 500.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from runtime.errors import (
    Conflict,
    Forbidden,
    NotAvailable,
    NotFound,
    QueueFull,
    ShopflowError,
    Unauthenticated,
    ValidationError,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# PostgreSQL bigint: larger ids cannot exist, so they are "not found", not a crash.
MAX_ID = 2**63 - 1
# Request bodies are small JSON documents.
MAX_BODY_BYTES = 64 * 1024

_STATUS: list[tuple[type[ShopflowError], int, str]] = [
    (Unauthenticated, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (ValidationError, 422, "invalid"),
    (NotAvailable, 503, "not_available"),
    (QueueFull, 503, "queue_full"),
]


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    """The API's one error shape (the same as web/app.py's): ``{"error": {status, message, code}}``."""
    error: dict[str, Any] = {"status": status, "message": message, "code": code}
    if field is not None:
        error["field"] = field
    body = {"error": error}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def translate(exc: ShopflowError) -> web.Response:
    """A domain error as its HTTP answer."""
    for kind, status, code in _STATUS:
        if isinstance(exc, kind):
            field = exc.field if isinstance(exc, ValidationError) else None
            return error_response(status, code, str(exc), field)
    return error_response(400, "bad_request", str(exc))


def json_errors(handler: Handler) -> Handler:
    """Wrap a handler so domain and constraint errors become clear 4xx answers."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ShopflowError as exc:
            return translate(exc)
        except asyncpg.ForeignKeyViolationError:
            return error_response(422, "invalid", "a referenced customer or product does not exist")
        except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError) as exc:
            return error_response(422, "invalid", f"rejected by a data rule: {exc.constraint_name}")

    return wrapped


def dumps(value: Any) -> str:
    """JSON with datetimes as ISO 8601 strings."""
    return json.dumps(value, default=_default, separators=(",", ":"))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def ok(value: Any, status: int = 200) -> web.Response:
    """A JSON answer."""
    return web.json_response(value, status=status, dumps=dumps)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 422 saying why not."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ValidationError(f"request body over {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise ValidationError(f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw.decode("utf-8")) if raw else None
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("the body must be JSON") from None
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object")
    return body


def int_value(raw: Any, name: str, minimum: int = 1, maximum: int = MAX_ID) -> int:
    """An integer field within bounds (booleans are not integers here)."""
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise ValidationError(f"{name} must be an integer", field=name)
    if not minimum <= raw <= maximum:
        raise ValidationError(f"{name} must be between {minimum} and {maximum}", field=name)
    return raw


def text_value(raw: Any, name: str, max_chars: int, min_chars: int = 1) -> str:
    """A string PostgreSQL can store (no NUL, valid UTF-8), within length bounds."""
    if not isinstance(raw, str):
        raise ValidationError(f"{name} must be a string", field=name)
    text = raw.strip()
    if not min_chars <= len(text) <= max_chars:
        raise ValidationError(f"{name} must have {min_chars} to {max_chars} characters",
                              field=name)
    if "\x00" in text:
        raise ValidationError(f"{name} must not contain NUL characters", field=name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{name} must be valid Unicode text", field=name) from None
    return text


def path_id(request: web.Request, name: str) -> int:
    """A numeric path parameter; out of range means no such thing (404)."""
    raw = request.match_info[name]
    if not raw.isdigit() or len(raw) > 19 or not 1 <= int(raw) <= MAX_ID:
        raise NotFound(f"no {name.replace('_id', '')} {raw}")
    return int(raw)


def query_int(request: web.Request, name: str, default: int, minimum: int, maximum: int) -> int:
    """An integer query parameter within bounds."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.lstrip("-").isdigit() or len(raw) > 19:
        raise ValidationError(f"{name} must be an integer", field=name)
    return int_value(int(raw), name, minimum, maximum)


def query_choice(request: web.Request, name: str, choices: tuple[str, ...],
                 default: str | None) -> str | None:
    """A query parameter that must be one of ``choices``."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw not in choices:
        raise ValidationError(f"{name} must be one of {', '.join(choices)}", field=name)
    return raw
