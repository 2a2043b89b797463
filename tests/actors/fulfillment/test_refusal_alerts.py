"""A service that refuses fulfilment requests pages on-call once; the next order through resolves.

A real flow worker (ProcessContext, the fulfilment concern, a Dramatiq worker)
against the carrier and warehouse simulators over HTTP, real Redis and
PostgreSQL, and the real webhook receiver of the alert tests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import dramatiq
import pytest
import redis.asyncio as aioredis
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from actors.fulfillment import actor as fulfillment
from actors.fulfillment.alerts import FULFILLMENT_REFUSED_ALERT
from actors.fulfillment.flow import STEP_LABEL, STEP_PACKING
from actors.fulfillment.messages import ADVANCE_FULFILLMENT
from actors.orders import service, state
from ops.simulators.carrier import create_carrier_app
from ops.simulators.faults import FAULTS_KEY, Faults, serve
from ops.simulators.warehouse import create_warehouse_app
from runtime.alerts import Alerter
from runtime.broker import QUEUE_FULFILLMENT
from runtime.process import ProcessContext
from runtime.settings import Settings
from runtime.worker import build_root
from tests.factories import make_order, make_shop
from tests.runtime.webhook_receiver import Receiver, webhook_receiver

REFUSED_ORDERS = 3


class Processed(Middleware):
    """Probe: counts messages that finished without an exception."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy,
                              *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if exception is None:
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait(self, count: int, timeout_s: float) -> bool:
        """Block (a thread, not the loop) until ``count`` messages finished."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout_s)


@dataclass
class FlowWorker:
    """One flow-worker process's insides, started in this test process."""

    ctx: ProcessContext
    root: Any
    worker: dramatiq.Worker
    probe: Processed

    @classmethod
    def start(cls, settings: Settings) -> FlowWorker:
        ctx = ProcessContext.start(settings, pool_size=3)
        probe = Processed()
        ctx.broker.add_middleware(probe)
        concern = fulfillment.concern(ctx)
        root = build_root("flow-worker", [concern]).start()
        concern.declare(ctx.broker, lambda cid, msg: root.ask(cid, msg, 30))
        # One thread: had a page held the thread that saw the refusal, nothing else would run.
        worker = dramatiq.Worker(ctx.broker, queues={QUEUE_FULFILLMENT}, worker_threads=1,
                                 worker_timeout=100)
        worker.start()
        return cls(ctx, root, worker, probe)

    def stop(self) -> None:
        self.worker.stop()
        self.root.stop()
        self.ctx.stop()  # waits for notifications still in flight


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as r:
        yield r


async def _orders_at(pool: asyncpg.Pool, status: str, count: int) -> list[int]:
    """``count`` orders moved along the state machine to ``status`` (processing or label_created)."""
    path = [state.RESERVED, state.PAID, state.ALLOCATED, state.PROCESSING]
    path += [state.LABEL_CREATED] if status == state.LABEL_CREATED else []
    ids = []
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 100})
        for _ in range(count):
            order_id = await make_order(conn, 1, {1: 1})
            async with conn.transaction():
                for to_status in path:
                    await service.transition(conn, order_id, to_status)
            ids.append(order_id)
    return ids


@pytest.mark.parametrize(("refusing", "step", "at_status"), [
    ("carrier", STEP_LABEL, state.PROCESSING),
    ("warehouse", STEP_PACKING, state.LABEL_CREATED),
])
async def test_refused_orders_page_once_and_the_next_order_through_resolves(
        settings: Settings, pool: asyncpg.Pool, receiver: Receiver,
        refusing: str, step: str, at_status: str) -> None:
    apps = {"carrier": create_carrier_app(), "warehouse": create_warehouse_app()}
    *refused, later = await _orders_at(pool, at_status, REFUSED_ORDERS + 1)
    async with serve(apps["carrier"]) as carrier_url, serve(apps["warehouse"]) as warehouse_url:
        settings = replace(settings, carrier_url=carrier_url, warehouse_url=warehouse_url,
                           alert_webhook_url=receiver.url, alert_webhook_timeout_s=120.0)
        # A wrong token: every request is refused with 401.
        apps[refusing][FAULTS_KEY].faults = Faults(error_rate=1.0, error_status=401)
        receiver.hold = asyncio.Event()  # the on-call webhook is slow: the page hangs there
        flow = await asyncio.to_thread(FlowWorker.start, settings)
        try:
            for order_id in refused:
                ADVANCE_FULFILLMENT.send(flow.ctx.broker, order_id)
            await asyncio.wait_for(receiver.arrived.wait(), 30)
            assert await asyncio.to_thread(flow.probe.wait, REFUSED_ORDERS, 30), (
                "every refused order was handled while the page was still hanging")
            assert receiver.bodies == []
            receiver.hold.set()
            await receiver.wait_for(1)

            apps[refusing][FAULTS_KEY].faults = Faults()  # the token is fixed
            ADVANCE_FULFILLMENT.send(flow.ctx.broker, later)
            bodies = await receiver.wait_for(2)
        finally:
            receiver.hold.set()
            await asyncio.to_thread(flow.stop)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        assert await Alerter(settings, client).open_incidents() == {}, "the incident is closed"
    finally:
        await client.aclose()
    statuses = {r["id"]: r["status"] for r in await pool.fetch("SELECT id, status FROM orders")}
    assert [statuses[o] for o in refused] == [state.FAILED] * REFUSED_ORDERS
    assert statuses[later] != at_status, "the later order got through the step"
    assert len(receiver.bodies) == 2, "several refused orders, one page"
    page, resolve = (b["alerts"][0] for b in bodies)
    assert (page["status"], resolve["status"]) == ("firing", "resolved")
    labels = {"alertname": FULFILLMENT_REFUSED_ALERT, "severity": "critical",
              "service": refusing, "step": step}
    assert page["labels"] == labels and resolve["labels"] == labels
    assert any(f"order {o} failed" in page["annotations"]["summary"] for o in refused)
    assert "401" in page["annotations"]["summary"]
