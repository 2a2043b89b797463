"""Helpers for JSON handlers: input validation and translating errors to 4xx.

The whole API (orders in ``web/app.py`` and the rest in ``web/api_extra.py``)
answers errors in one shape, built only here::

    {"error": {"status": 422, "message": "...", "code": "invalid", "field": "quantity"}}

``field`` is present when one input field is to blame. The codes:
``bad_json`` (400: the body is not JSON text), ``unauthenticated`` (401),
``forbidden`` (403), ``not_found`` (404), ``method_not_allowed`` (405),
``conflict`` (409), ``too_large`` (413: body over :data:`MAX_BODY_BYTES`),
``invalid`` (422: JSON of the wrong shape, bad or unknown fields),
``not_available`` / ``queue_full`` (503), ``internal`` (500, logged). A value
PostgreSQL refuses (``asyncpg.DataError``: NUL in text, a number out of range)
is ``invalid`` (422) too, and logged: validation should have caught it.

Every handler is wrapped by :func:`json_errors`, so a domain error becomes its
HTTP status whatever middleware the app has, and bad input can never surface
as a 500; :func:`error_middleware` gives aiohttp's own errors (no such route,
wrong method) and anything unexpected the same shape, keeping the headers
their status requires (``Allow`` on a 405).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from runtime.errors import (
    Conflict,
    Forbidden,
    MalformedRequest,
    NotAvailable,
    NotFound,
    QueueFull,
    RequestTooLarge,
    ShopflowError,
    Unauthenticated,
    ValidationError,
)
from runtime.fields import reject_unknown_fields
from runtime.text import storable_text

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# PostgreSQL bigint: larger ids cannot exist, so they are "not found", not a crash.
MAX_ID = 2**63 - 1
# Request bodies are small JSON documents.
MAX_BODY_BYTES = 64 * 1024

_STATUS: list[tuple[type[ShopflowError], int, str]] = [
    (MalformedRequest, 400, "bad_json"),
    (Unauthenticated, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (ValidationError, 422, "invalid"),
    (NotAvailable, 503, "not_available"),
    (QueueFull, 503, "queue_full"),
    (RequestTooLarge, 413, "too_large"),
]
# The answer when PostgreSQL refuses a value (asyncpg.DataError) that validation missed.
DATA_ERROR_MESSAGE = ("a value in the request cannot be stored (text with NUL characters or "
                      "invalid Unicode, or a number out of range)")
# Codes for HTTP errors aiohttp raises itself (no such route, wrong method, ...).
_CODE_BY_STATUS = {400: "bad_request", 401: "unauthenticated", 403: "forbidden",
                   404: "not_found", 405: "method_not_allowed", 409: "conflict",
                   413: "too_large", 422: "invalid", 503: "not_available"}
# Headers of aiohttp's own errors that describe their text body, which the JSON replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """The API's one error shape: ``{"error": {status, message, code, field?}}``.

    ``headers`` are the ones the status calls for (``Allow`` on a 405); a 401
    says ``WWW-Authenticate: Bearer`` unless they name another challenge.
    """
    error: dict[str, Any] = {"status": status, "message": message, "code": code}
    if field is not None:
        error["field"] = field
    body = {"error": error}
    answer_headers = dict(headers or {})
    if status == 401:
        answer_headers.setdefault("WWW-Authenticate", "Bearer")
    return web.json_response(body, status=status, headers=answer_headers)


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
        except asyncpg.DataError as exc:
            # A value the validation let through but PostgreSQL cannot take (a NUL or a
            # lone surrogate in some text, a number out of its column's range): bad
            # input, not a crash. Logged, since it means a validation rule is missing.
            log.warning("%s %s: the database refused a value: %r", request.method,
                        request.path, exc)
            return error_response(422, "invalid", DATA_ERROR_MESSAGE)

    return wrapped


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The app-wide net: aiohttp's HTTP errors and unexpected ones in the API's error shape.

    Handlers wrapped by :func:`json_errors` never get here with a domain
    error; this catches what happens outside them (an unknown path, a wrong
    method) and bugs, which are logged and answered 500 without a traceback.
    """
    try:
        return await json_errors(handler)(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODE_BY_STATUS.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, headers=protocol_headers(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; it has been logged")


def protocol_headers(exc: web.HTTPException) -> dict[str, str]:
    """The headers of aiohttp's error that belong to the answer, not to its text body.

    aiohttp puts there what the status requires: ``Allow`` on a 405 (RFC 9110:
    the methods the resource takes, which the router knows), ``Retry-After``
    and the like. Its ``Content-*`` headers describe the plain-text body the
    API's JSON replaces, so they are left out.
    """
    return {name: value for name, value in exc.headers.items()
            if name.lower() not in _BODY_HEADERS}


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


async def read_json(request: web.Request,
                    fields: Collection[str] | None = None) -> dict[str, Any]:
    """The request body as a JSON object: 413 if too large, 400 if not JSON, 422 if no object.

    With ``fields``, any other top-level field is a 422 naming it
    (:func:`runtime.fields.reject_unknown_fields`, the orders endpoint's rule too).
    """
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestTooLarge(f"request body too large (limit {MAX_BODY_BYTES} bytes)")
    raw = await _read_body(request)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object")
    if fields is not None:
        reject_unknown_fields(body, fields)
    return body


async def _read_body(request: web.Request) -> bytes:
    """The whole body, read chunk by chunk; :class:`RequestTooLarge` past the limit.

    A single ``content.read(n)`` returns whatever has arrived, not ``n`` bytes,
    so a body sent in several packets must be read in a loop.
    """
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(MAX_BODY_BYTES + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestTooLarge(f"request body too large (limit {MAX_BODY_BYTES} bytes)")
    return b"".join(chunks)


def int_value(raw: Any, name: str, minimum: int = 1, maximum: int = MAX_ID) -> int:
    """An integer field within bounds (booleans are not integers here)."""
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise ValidationError(f"{name} must be an integer", field=name)
    if not minimum <= raw <= maximum:
        raise ValidationError(f"{name} must be between {minimum} and {maximum}", field=name)
    return raw


def text_value(raw: Any, name: str, max_chars: int, min_chars: int = 1) -> str:
    """A string PostgreSQL can store (no NUL, valid UTF-8), stripped, within length bounds."""
    return storable_text(raw, name, max_chars, min_chars)


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
