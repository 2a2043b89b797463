"""The warehouse simulator: batch stock lookup and packing requests (API in docs/externals.md).

Stock is deterministic: a product's quantity is a hash of the seed, its
external id and the *generation* of the stock. ``POST /_admin/advance`` moves
to the next generation, in which about one id in ten gets a new quantity,
as a day of warehouse movements would; ``POST /_admin/stock`` pins single
quantities for tests. Fault knobs: see :mod:`ops.simulators.faults`.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from ops.simulators.common import TOKEN_KEY, check_auth, idempotency_key, json_object, order_id_of
from ops.simulators.faults import Faults, FaultState, install_faults

# The most ids one lookup may carry; the syncer's batch size must not exceed it.
MAX_IDS_PER_LOOKUP = 200
# Quantities are drawn from [0, MAX_QUANTITY).
MAX_QUANTITY = 250
# One id in this many changes quantity per generation.
CHANGE_ONE_IN = 10
_EXTERNAL_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _hash(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def quantity_for(seed: int, external_id: str, generation: int) -> int:
    """The simulated stock of ``external_id`` in ``generation`` (pure, deterministic)."""
    changed_in = 0
    for gen in range(generation, 0, -1):
        if _hash(seed, external_id, "moves", gen) % CHANGE_ONE_IN == 0:
            changed_in = gen
            break
    return _hash(seed, external_id, changed_in) % MAX_QUANTITY


@dataclass
class WarehouseState:
    """The simulated warehouse: generation, pinned quantities, unknown ids, packing requests."""

    seed: int
    generation: int = 0
    pinned: dict[str, int] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    packing: dict[str, dict[str, Any]] = field(default_factory=dict)

    def quantity(self, external_id: str) -> int | None:
        """The current stock of an id, or None if the warehouse does not know it."""
        if external_id in self.unknown:
            return None
        if external_id in self.pinned:
            return self.pinned[external_id]
        return quantity_for(self.seed, external_id, self.generation)


WAREHOUSE_KEY = web.AppKey("warehouse", WarehouseState)


async def lookup_stock(request: web.Request) -> web.Response:
    """POST /v1/stock/lookup {"ids": [...]} -> {"items": [{"id", "quantity"}], "missing", "as_of"}."""
    check_auth(request)
    body = await json_object(request)
    ids = body.get("ids")
    if (not isinstance(ids, list) or not ids or len(ids) > MAX_IDS_PER_LOOKUP
            or not all(isinstance(i, str) and _EXTERNAL_ID.match(i) for i in ids)):
        raise web.HTTPBadRequest(
            text=f'{{"error": "ids must be 1..{MAX_IDS_PER_LOOKUP} external ids"}}',
            content_type="application/json")
    state = request.app[WAREHOUSE_KEY]
    items, missing = [], []
    for external_id in dict.fromkeys(ids):
        qty = state.quantity(external_id)
        if qty is None:
            missing.append(external_id)
        else:
            items.append({"id": external_id, "quantity": qty})
    return web.json_response({
        "items": items, "missing": missing,
        "as_of": datetime.now(UTC).isoformat(), "generation": state.generation,
    })


async def request_packing(request: web.Request) -> web.Response:
    """POST /v1/packing-requests {"order_id"} + Idempotency-Key -> 201 {"packing_ref", ...}.

    The same key again answers 200 with the same body; the same key for a
    different order is a 422.
    """
    check_auth(request)
    key = idempotency_key(request)
    order_id = order_id_of(await json_object(request))
    state = request.app[WAREHOUSE_KEY]
    if key in state.packing:
        earlier = state.packing[key]
        if earlier["order_id"] != order_id:
            raise web.HTTPUnprocessableEntity(
                text='{"error": "idempotency key reused for another order"}',
                content_type="application/json")
        return web.json_response(earlier, status=200)
    record = {"packing_ref": f"PK-{uuid.uuid4().hex[:10].upper()}", "order_id": order_id,
              "status": "queued"}
    state.packing[key] = record
    return web.json_response(record, status=201)


def _malformed(state: FaultState) -> web.Response:
    """One of several wrong answers, chosen by the seeded generator."""
    variants = [
        lambda: web.Response(text="<html>502 upstream error</html>", status=200,
                             content_type="text/html"),
        lambda: web.json_response([1, 2, 3]),
        lambda: web.json_response({"items": [{"id": "X", "quantity": "lots"}], "missing": []}),
        lambda: web.json_response({"items": [{"id": "X", "quantity": -5}], "missing": []}),
        lambda: web.json_response({"stock": {}}),
        lambda: web.Response(text='{"items": [', status=200, content_type="application/json"),
    ]
    return variants[state.rng.randrange(len(variants))]()


async def _admin_advance(request: web.Request) -> web.Response:
    state = request.app[WAREHOUSE_KEY]
    state.generation += 1
    return web.json_response({"generation": state.generation})


async def _admin_stock(request: web.Request) -> web.Response:
    """Pin quantities: {"EXT-1": 5, "EXT-2": null} (null = the warehouse does not know it)."""
    body = await json_object(request)
    state = request.app[WAREHOUSE_KEY]
    for external_id, qty in body.items():
        if qty is None:
            state.unknown.add(external_id)
            state.pinned.pop(external_id, None)
        elif isinstance(qty, int) and qty >= 0:
            state.unknown.discard(external_id)
            state.pinned[external_id] = qty
        else:
            raise web.HTTPUnprocessableEntity(text=f"bad quantity for {external_id!r}")
    return web.json_response({"pinned": len(state.pinned), "unknown": len(state.unknown)})


def load_stock_file(path: Path) -> dict[str, int]:
    """A stock file's pinned levels: a JSON object of external id -> quantity (>= 0).

    Raises ValueError with the file's name when it is not such an object, so a
    bad file stops the process that serves the simulator at start, clearly.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"warehouse stock file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and _EXTERNAL_ID.match(k) and type(v) is int and v >= 0
            for k, v in data.items()):
        raise ValueError(f"warehouse stock file {path}: expected {{external_id: quantity >= 0}}")
    return data


def create_warehouse_app(seed: int = 7, faults: Faults | None = None,
                         token: str | None = None,
                         stock: dict[str, int] | None = None) -> web.Application:
    """The warehouse simulator app (stock lookup and packing), with fault knobs.

    ``stock`` pins those ids' quantities from the first request on (as
    ``POST /_admin/stock`` would later), so a syncer never sees other levels first.
    """
    app = web.Application()
    app[WAREHOUSE_KEY] = WarehouseState(seed=seed, pinned=dict(stock or {}))
    if token:
        app[TOKEN_KEY] = token
    install_faults(app, faults or Faults(), seed, _malformed)
    app.router.add_post("/v1/stock/lookup", lookup_stock)
    app.router.add_post("/v1/packing-requests", request_packing)
    app.router.add_post("/_admin/advance", _admin_advance)
    app.router.add_post("/_admin/stock", _admin_stock)
    return app
