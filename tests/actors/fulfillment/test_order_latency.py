"""End-to-end order latency: the flow worker observes creation → ready_to_ship once per order.

A real flow worker (ProcessContext, the fulfilment concern, a Dramatiq worker)
against the carrier and warehouse simulators over HTTP; values from a real scrape.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg

from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.orders import state
from ops.simulators.carrier import create_carrier_app
from ops.simulators.faults import serve
from ops.simulators.warehouse import create_warehouse_app
from runtime.metrics import prepare_metrics_dir
from runtime.settings import Settings
from tests.actors.fulfillment.test_refusal_alerts import FlowWorker, _orders_at
from tests.runtime.metrics_helpers import scrape, value

LATENCY = "shopflow_order_latency_seconds"
# How long before the test each order was created (checkout), seconds.
AGES_S = (40, 400)


async def test_ready_to_ship_orders_are_observed_with_their_age(
        settings: Settings, pool: asyncpg.Pool) -> None:
    prepare_metrics_dir(settings)
    orders = await _orders_at(pool, state.LABEL_CREATED, len(AGES_S))
    for order_id, age_s in zip(orders, AGES_S, strict=True):
        await pool.execute("UPDATE orders SET created_at = now() - make_interval(secs => $2) "
                           "WHERE id = $1", order_id, float(age_s))
    async with serve(create_carrier_app()) as carrier_url, \
            serve(create_warehouse_app()) as warehouse_url:
        settings = replace(settings, carrier_url=carrier_url, warehouse_url=warehouse_url)
        flow = await asyncio.to_thread(FlowWorker.start, settings)
        try:
            for order_id in orders:
                ADVANCE_FULFILLMENT.send(flow.ctx.broker, order_id)
            assert await asyncio.to_thread(flow.probe.wait, len(orders), 30)
            ADVANCE_FULFILLMENT.send(flow.ctx.broker, orders[0])  # a redelivery: already done
            assert await asyncio.to_thread(flow.probe.wait, len(orders) + 1, 30)
        finally:
            await asyncio.to_thread(flow.stop)
    statuses = await pool.fetch("SELECT status FROM orders WHERE id = ANY($1::bigint[])", orders)
    assert [r["status"] for r in statuses] == [state.READY_TO_SHIP] * len(orders)

    samples = scrape(settings)
    status = {"status": state.READY_TO_SHIP}
    assert value(samples, f"{LATENCY}_count", **status) == 2
    latency_sum = value(samples, f"{LATENCY}_sum", **status)
    assert latency_sum is not None and sum(AGES_S) <= latency_sum < sum(AGES_S) + 60
    assert value(samples, f"{LATENCY}_bucket", le="30.0", **status) == 0
    assert value(samples, f"{LATENCY}_bucket", le="60.0", **status) == 1
    assert value(samples, f"{LATENCY}_bucket", le="600.0", **status) == 2
