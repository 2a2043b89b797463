"""The shipping gateway against the carrier and warehouse simulators."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from actors.shipping.gateway import HttpShippingGateway, label_key, packing_key
from ops.simulators.carrier import CARRIER_KEY, create_carrier_app
from ops.simulators.faults import FAULTS_KEY, Faults, serve
from ops.simulators.warehouse import WAREHOUSE_KEY, create_warehouse_app
from runtime.circuit import BreakerState, CircuitBreaker
from runtime.errors import (
    CircuitOpen,
    ExternalRequestRejected,
    ExternalServiceError,
    MalformedResponse,
)
from runtime.http import RetryPolicy


@dataclass
class Sims:
    carrier: web.Application
    warehouse: web.Application
    gateway: HttpShippingGateway

    def carrier_faults(self, **knobs: float) -> None:
        self.carrier[FAULTS_KEY].faults = Faults().updated(knobs)

    def label_requests(self) -> int:
        return self.carrier[FAULTS_KEY].stats["requests /v1/labels"]


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    carrier, warehouse = create_carrier_app(token="c-token"), create_warehouse_app(token="w-token")
    async with serve(carrier) as carrier_url, serve(warehouse) as warehouse_url, \
            aiohttp.ClientSession() as session:
        gateway = HttpShippingGateway(
            session=session, carrier_url=carrier_url, warehouse_url=warehouse_url,
            policy=RetryPolicy(attempts=3, base_backoff_s=0.01, max_backoff_s=0.02),
            connect_timeout_s=0.5, read_timeout_s=0.3, carrier_token="c-token",
            warehouse_token="w-token",
            carrier_breaker=CircuitBreaker("carrier", failure_threshold=3, reset_timeout_s=60))
        yield Sims(carrier, warehouse, gateway)


async def test_label_is_bought_once_per_key(sims: Sims) -> None:
    label = await sims.gateway.create_label(42, label_key(42))
    again = await sims.gateway.create_label(42, label_key(42))
    assert label == again and label.carrier == "SimExpress" and label.tracking_code.startswith("SX")
    assert len(sims.carrier[CARRIER_KEY].labels) == 1


@pytest.mark.slow
async def test_timeout_after_the_label_was_bought_retries_into_the_same_label(sims: Sims) -> None:
    sims.carrier_faults(hang_after_next=1)
    label = await sims.gateway.create_label(7, label_key(7))
    assert sims.label_requests() == 2  # first answer never came; the retry got the same label
    assert next(iter(sims.carrier[CARRIER_KEY].labels.values()))["tracking_code"] == label.tracking_code
    assert len(sims.carrier[CARRIER_KEY].labels) == 1


async def test_packing_request_is_idempotent(sims: Sims) -> None:
    ref = await sims.gateway.request_packing(9, packing_key(9))
    assert ref == await sims.gateway.request_packing(9, packing_key(9))
    assert len(sims.warehouse[WAREHOUSE_KEY].packing) == 1


async def test_rejections_are_permanent_and_not_retried(sims: Sims) -> None:
    sims.gateway.carrier_token = "wrong"
    with pytest.raises(ExternalRequestRejected) as info:
        await sims.gateway.create_label(1, label_key(1))
    assert info.value.status == 401 and sims.label_requests() == 1
    assert sims.gateway.carrier_breaker.state is BreakerState.CLOSED


async def test_malformed_labels_are_never_returned(sims: Sims) -> None:
    sims.carrier_faults(malformed_rate=1.0)
    with pytest.raises(MalformedResponse):
        await sims.gateway.create_label(3, label_key(3))
    assert sims.label_requests() == 3


async def test_breaker_opens_and_spares_the_carrier(sims: Sims) -> None:
    sims.carrier_faults(error_rate=1.0, error_status=503)
    with pytest.raises(ExternalServiceError):
        await sims.gateway.create_label(5, label_key(5))
    assert sims.gateway.carrier_breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await sims.gateway.create_label(5, label_key(5))
    assert sims.label_requests() == 3

