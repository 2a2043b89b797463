"""The outside services the flow calls: shipping labels and warehouse packing.

Each call carries an idempotency key, so repeating it (a retry after a
timeout) returns the first answer instead of a second label. The flow worker
uses the HTTP gateway (``actors/shipping/gateway.py``) against the real
services or their simulators; the local gateway makes a deterministic label
and packing reference without any network, for code that wants none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Label:
    carrier: str
    tracking_code: str
    label_url: str | None


class ShippingGateway(Protocol):
    """Creates shipping labels and asks the warehouse to pack orders."""

    async def create_label(self, order_id: int, idempotency_key: str) -> Label: ...

    async def request_packing(self, order_id: int, idempotency_key: str) -> str: ...


class LocalShippingGateway:
    """Offline labels: the same key always yields the same tracking code."""

    async def create_label(self, order_id: int, idempotency_key: str) -> Label:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:9].upper()
        return Label("Correios (local)", f"SF{digest}BR", None)

    async def request_packing(self, order_id: int, idempotency_key: str) -> str:
        return "PACK-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:10]
