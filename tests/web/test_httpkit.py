"""web/httpkit.py: body reading on aiohttp's real stream reader, fed in pieces; the
error middleware on a real aiohttp server."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from runtime.errors import MalformedRequest, RequestTooLarge
from web.httpkit import MAX_BODY_BYTES, error_middleware, read_json


def _request(first_piece: bytes) -> tuple[StreamReader, object]:
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16,
                          loop=asyncio.get_running_loop())
    reader.feed_data(first_piece)
    return reader, make_mocked_request("POST", "/", payload=reader)


async def test_a_body_that_arrives_in_pieces_is_read_whole() -> None:
    reader, request = _request(b'{"customer_id": ')
    task = asyncio.create_task(read_json(request))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # one loop turn: the handler reads what has arrived so far
    reader.feed_data(b'1, "items": []}')
    reader.feed_eof()
    assert await asyncio.wait_for(task, 5) == {"customer_id": 1, "items": []}


async def test_a_chunked_body_past_the_limit_is_too_large() -> None:
    reader, request = _request(b'{"pad": "' + b"x" * MAX_BODY_BYTES)
    reader.feed_data(b'"}')
    reader.feed_eof()
    with pytest.raises(RequestTooLarge):
        await read_json(request)  # type: ignore[arg-type]


async def test_an_empty_body_is_not_json() -> None:
    reader, request = _request(b"")
    reader.feed_eof()
    with pytest.raises(MalformedRequest):
        await read_json(request)  # type: ignore[arg-type]


async def test_a_wrong_method_is_405_in_the_api_shape_with_the_allowed_methods() -> None:
    """RFC 9110: a 405 MUST list the methods the resource takes, in ``Allow``."""
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/orders/{order_id}", handler)
    app.router.add_patch("/orders/{order_id}", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.delete("/orders/1")
        assert resp.status == 405
        assert set(resp.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "PATCH"}
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"] == {"status": 405, "code": "method_not_allowed",
                                                 "message": "Method Not Allowed"}
        missing = await client.get("/nothing-here")
        assert missing.status == 404 and "Allow" not in missing.headers
