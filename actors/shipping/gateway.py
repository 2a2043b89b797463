"""Shipping labels and packing requests over HTTP, built for how those services fail.

Both calls change something on the other side (a label is bought, a packing
job is queued), so every request carries an ``Idempotency-Key`` that the
caller derives from the order (e.g. ``label:<order_id>``): a retry after a
timeout, a redelivered job or a second worker gets the same label back
instead of buying a second one. Each service sits behind its own circuit
breaker and the shared retry helper (connect/read timeouts, capped
exponential backoff, Retry-After honoured); a 4xx is permanent and never
retried. Answers are validated; anything else is a :class:`MalformedResponse`.

:class:`HttpShippingGateway` implements the fulfilment flow's
``ShippingGateway`` Protocol (``actors/fulfillment/adapters.py``);
:func:`build_shipping_gateway` is its factory, used by the flow worker in
every run: against CARRIER_URL / WAREHOUSE_URL, or, unset, the simulators on
their ports (the flow worker serves them itself when nobody else does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from actors.fulfillment.adapters import Label, ShippingGateway
from runtime.circuit import CircuitBreaker
from runtime.errors import MalformedResponse, ValidationError
from runtime.http import RetryPolicy, call_with_retries, client_timeout, raise_for_status
from runtime.settings import Settings

__all__ = ["HttpShippingGateway", "Label", "ShippingGateway", "build_shipping_gateway",
           "label_key", "packing_key"]

CARRIER = "carrier"
PACKING = "warehouse-packing"
LABELS_PATH = "/v1/labels"
PACKING_PATH = "/v1/packing-requests"


def label_key(order_id: int) -> str:
    """The idempotency key of an order's shipping label."""
    return f"label:{order_id}"


def packing_key(order_id: int) -> str:
    """The idempotency key of an order's packing request."""
    return f"packing:{order_id}"


def parse_label(text: str) -> Label:
    """A label answer in the documented shape, or MalformedResponse."""
    body = _json_object(text, CARRIER)
    carrier, code, url = body.get("carrier"), body.get("tracking_code"), body.get("label_url")
    if not (isinstance(carrier, str) and carrier and isinstance(code, str) and code
            and isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise MalformedResponse("carrier answer lacks carrier / tracking_code / label_url")
    return Label(carrier, code, url)


def parse_packing(text: str) -> str:
    """The packing reference from a packing answer, or MalformedResponse."""
    ref = _json_object(text, PACKING).get("packing_ref")
    if not isinstance(ref, str) or not ref:
        raise MalformedResponse("warehouse packing answer lacks packing_ref")
    return ref


def _json_object(text: str, service: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        raise MalformedResponse(f"{service} answer is not JSON") from None
    if not isinstance(body, dict):
        raise MalformedResponse(f"{service} answer is not a JSON object")
    return body


@dataclass
class HttpShippingGateway:
    """The real :class:`ShippingGateway`: carrier and warehouse HTTP APIs (docs/externals.md)."""

    session: aiohttp.ClientSession
    carrier_url: str
    warehouse_url: str
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0
    carrier_token: str | None = None
    warehouse_token: str | None = None
    carrier_breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(CARRIER))
    packing_breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(PACKING))

    async def create_label(self, order_id: int, idempotency_key: str) -> Label:
        """POST /v1/labels with the key; retried safely because the key is the same."""
        text = await self._post(CARRIER, self.carrier_url + LABELS_PATH, order_id, idempotency_key,
                                self.carrier_token, self.carrier_breaker)
        return parse_label(text)

    async def request_packing(self, order_id: int, idempotency_key: str) -> str:
        """POST /v1/packing-requests with the key; returns the packing reference."""
        text = await self._post(PACKING, self.warehouse_url + PACKING_PATH, order_id,
                                idempotency_key, self.warehouse_token, self.packing_breaker)
        return parse_packing(text)

    async def _post(self, service: str, url: str, order_id: int, key: str, token: str | None,
                    breaker: CircuitBreaker) -> str:
        if order_id <= 0 or not key:
            raise ValidationError("order_id must be positive and the idempotency key non-empty")
        headers = {"Idempotency-Key": key}
        if token:
            headers["Authorization"] = f"Bearer {token}"

        async def attempt() -> str:
            async with self.session.post(
                url, json={"order_id": order_id}, headers=headers,
                timeout=client_timeout(self.connect_timeout_s, self.read_timeout_s),
            ) as response:
                text = await response.text()
                raise_for_status(service, response.status, response.headers, text)
                # Validate inside the attempt so a garbage answer is retried (same key: safe).
                (parse_label if service == CARRIER else parse_packing)(text)
                return text

        return await call_with_retries(service, attempt, self.policy, breaker)


def build_shipping_gateway(settings: Settings, session: aiohttp.ClientSession) -> HttpShippingGateway:
    """The gateway for this process's settings; without URLs it points at the local simulators."""
    return HttpShippingGateway(
        session=session,
        carrier_url=(settings.carrier_url or f"http://127.0.0.1:{settings.carrier_sim_port}").rstrip("/"),
        warehouse_url=(settings.warehouse_url
                       or f"http://127.0.0.1:{settings.warehouse_sim_port}").rstrip("/"),
        policy=RetryPolicy(attempts=settings.external_attempts,
                           base_backoff_s=settings.external_backoff_s,
                           max_backoff_s=settings.external_backoff_s * 8),
        connect_timeout_s=settings.external_connect_timeout_s,
        read_timeout_s=settings.external_read_timeout_s,
        carrier_token=settings.carrier_token, warehouse_token=settings.warehouse_token,
        carrier_breaker=CircuitBreaker(CARRIER, settings.breaker_failures, settings.breaker_reset_s),
        packing_breaker=CircuitBreaker(PACKING, settings.breaker_failures, settings.breaker_reset_s),
    )


if TYPE_CHECKING:
    # mypy proves the HTTP gateway is a drop-in for the flow's Protocol.
    _IS_A_GATEWAY: type[ShippingGateway] = HttpShippingGateway
