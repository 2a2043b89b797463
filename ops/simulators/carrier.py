"""The carrier simulator: shipping labels keyed by an idempotency key (API in docs/externals.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ops.simulators.common import TOKEN_KEY, check_auth, idempotency_key, json_object, order_id_of
from ops.simulators.faults import Faults, FaultState, install_faults

CARRIER_NAME = "SimExpress"


@dataclass
class CarrierState:
    """Labels created so far, by idempotency key."""

    labels: dict[str, dict[str, Any]] = field(default_factory=dict)


CARRIER_KEY = web.AppKey("carrier", CarrierState)


def _tracking_code(key: str) -> str:
    return "SX" + hashlib.sha256(key.encode()).hexdigest()[:12].upper()


async def create_label(request: web.Request) -> web.Response:
    """POST /v1/labels {"order_id"} + Idempotency-Key -> 201 {"carrier", "tracking_code", "label_url"}.

    The same key again answers 200 with the same label (no second label is
    bought); the same key for another order is a 422.
    """
    check_auth(request)
    key = idempotency_key(request)
    order_id = order_id_of(await json_object(request))
    state = request.app[CARRIER_KEY]
    if key in state.labels:
        earlier = state.labels[key]
        if earlier["order_id"] != order_id:
            raise web.HTTPUnprocessableEntity(
                text='{"error": "idempotency key reused for another order"}',
                content_type="application/json")
        return web.json_response(earlier, status=200)
    code = _tracking_code(key)
    label = {"carrier": CARRIER_NAME, "tracking_code": code, "order_id": order_id,
             "label_url": f"{request.url.origin()}/v1/labels/{code}.pdf"}
    state.labels[key] = label
    return web.json_response(label, status=201)


async def get_label(request: web.Request) -> web.Response:
    """GET /v1/labels/{code}.pdf: a stand-in document for a label."""
    code = request.match_info["code"]
    if not any(label["tracking_code"] == code for label in request.app[CARRIER_KEY].labels.values()):
        raise web.HTTPNotFound()
    return web.Response(body=f"%PDF-1.4\n% simulated label {code}\n".encode(),
                        content_type="application/pdf")


def _malformed(state: FaultState) -> web.Response:
    variants = [
        lambda: web.json_response({"carrier": CARRIER_NAME}, status=201),
        lambda: web.Response(text="<html>label service</html>", status=201, content_type="text/html"),
        lambda: web.json_response({"carrier": 5, "tracking_code": None, "label_url": []}, status=201),
    ]
    return variants[state.rng.randrange(len(variants))]()


def create_carrier_app(seed: int = 7, faults: Faults | None = None,
                       token: str | None = None) -> web.Application:
    """The carrier simulator app (shipping labels), with fault knobs."""
    app = web.Application()
    app[CARRIER_KEY] = CarrierState()
    if token:
        app[TOKEN_KEY] = token
    install_faults(app, faults or Faults(), seed, _malformed)
    app.router.add_post("/v1/labels", create_label)
    app.router.add_get("/v1/labels/{code}.pdf", get_label)
    return app
