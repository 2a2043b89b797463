"""The simulators' own contract: deterministic stock, validation, auth, fault knobs."""

from __future__ import annotations

import aiohttp

from ops.simulators.faults import serve
from ops.simulators.warehouse import MAX_QUANTITY, create_warehouse_app, quantity_for


def test_stock_is_deterministic_and_moves_about_one_in_ten_per_generation() -> None:
    ids = [f"EXT-{i}" for i in range(2000)]
    first = [quantity_for(3, i, 0) for i in ids]
    assert first == [quantity_for(3, i, 0) for i in ids]
    assert all(0 <= q < MAX_QUANTITY for q in first)
    moved = sum(1 for i, q in zip(ids, first) if quantity_for(3, i, 1) != q)
    assert 120 < moved < 280


async def test_lookup_validates_and_authenticates() -> None:
    async with serve(create_warehouse_app(seed=3, token="t")) as url, aiohttp.ClientSession() as s:
        auth = {"Authorization": "Bearer t"}
        async with s.post(f"{url}/v1/stock/lookup", json={"ids": ["A"]}) as r:
            assert r.status == 401
        async with s.post(f"{url}/v1/stock/lookup", json={"ids": []}, headers=auth) as r:
            assert r.status == 400
        async with s.post(f"{url}/v1/stock/lookup", json={"ids": ["A", "A", "B"]},
                          headers=auth) as r:
            body = await r.json()
        assert [i["id"] for i in body["items"]] == ["A", "B"]
        assert body["items"][0]["quantity"] == quantity_for(3, "A", 0)


async def test_fault_knobs_are_set_over_http() -> None:
    async with serve(create_warehouse_app(seed=3)) as url, aiohttp.ClientSession() as s:
        async with s.post(f"{url}/_admin/faults", json={"nope": 1}) as r:
            assert r.status == 422
        async with s.post(f"{url}/_admin/faults", json={"error_rate": 1, "error_status": 502}) as r:
            assert (await r.json())["error_rate"] == 1.0
        async with s.post(f"{url}/v1/stock/lookup", json={"ids": ["A"]}) as r:
            assert r.status == 502
        async with s.get(f"{url}/_admin/stats") as r:
            assert (await r.json())["error 502"] == 1
