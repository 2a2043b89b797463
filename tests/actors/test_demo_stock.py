"""``--stock-multiplier`` reaches the embedded warehouse simulator, whose stock the syncer applies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from actors.demo.catalog import generate_products
from actors.demo.command import pin_simulator_stock
from ops.simulators.warehouse import MAX_IDS_PER_LOOKUP, WAREHOUSE_KEY, create_warehouse_app
from runtime.settings import Settings
from tests.support import free_port


@pytest.fixture
async def warehouse() -> AsyncIterator[tuple[web.Application, int]]:
    """The warehouse simulator on a free port, as a runtime process serves it."""
    app = create_warehouse_app(seed=7)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield app, port
    await runner.cleanup()


async def _lookup(port: int, ids: list[str]) -> dict[str, int]:
    """What the stock syncer would read, in batches the warehouse accepts."""
    seen: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for start in range(0, len(ids), MAX_IDS_PER_LOOKUP):
            batch = ids[start:start + MAX_IDS_PER_LOOKUP]
            async with http.post(f"http://127.0.0.1:{port}/v1/stock/lookup", json={"ids": batch}) as resp:
                assert resp.status == 200
                seen.update({item["id"]: item["quantity"] for item in (await resp.json())["items"]})
    return seen


async def test_a_multiplier_pins_the_simulators_stock_to_the_scaled_catalogue(
        warehouse: tuple[web.Application, int]) -> None:
    _app, port = warehouse
    settings = replace(Settings.from_env({}), warehouse_sim_port=port, warehouse_url=None)
    await pin_simulator_stock(settings, 5)
    scaled = generate_products(stock_multiplier=5)
    seen = await _lookup(port, [p.external_id for p in scaled])
    assert seen == {p.external_id: p.stock for p in scaled}
    assert seen[scaled[0].external_id] == 5 * generate_products()[0].stock


async def test_a_real_warehouse_and_the_default_multiplier_are_left_alone(
        warehouse: tuple[web.Application, int]) -> None:
    app, port = warehouse
    real = replace(Settings.from_env({}), warehouse_sim_port=port,
                   warehouse_url=f"http://127.0.0.1:{port}")
    await pin_simulator_stock(real, 5)
    await pin_simulator_stock(replace(real, warehouse_url=None), 1)
    assert app[WAREHOUSE_KEY].pinned == {}
