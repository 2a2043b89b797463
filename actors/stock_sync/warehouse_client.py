"""The warehouse's stock API as the syncer sees it: a Protocol and its HTTP adapter.

The answer is untrusted input: :func:`parse_stock_answer` accepts exactly the
documented shape (docs/externals.md) and raises :class:`MalformedResponse` for
anything else, so a garbage answer never reaches the database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from runtime.circuit import CircuitBreaker
from runtime.errors import MalformedResponse
from runtime.http import RetryPolicy, call_with_retries, client_timeout, raise_for_status

SERVICE = "warehouse"
LOOKUP_PATH = "/v1/stock/lookup"


@dataclass(frozen=True)
class StockAnswer:
    """The warehouse's quantities for one batch of external ids."""

    quantities: dict[str, int]
    missing: tuple[str, ...] = ()


class StockSource(Protocol):
    """Where the syncer gets stock from (the HTTP warehouse, or a stub in unit tests)."""

    async def fetch_stock(self, external_ids: list[str], deadline_s: float | None = None) -> StockAnswer:
        """Quantities for ``external_ids``; raises ExternalServiceError subclasses on failure."""
        ...


def parse_stock_answer(text: str, requested: list[str]) -> StockAnswer:
    """Validate a lookup answer against the ids asked for; MalformedResponse if anything is off."""
    try:
        body: Any = json.loads(text)
    except ValueError:
        raise MalformedResponse("warehouse answer is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise MalformedResponse("warehouse answer has no 'items' list")
    wanted = set(requested)
    quantities: dict[str, int] = {}
    for item in body["items"]:
        if not isinstance(item, dict):
            raise MalformedResponse("warehouse item is not an object")
        ext_id, qty = item.get("id"), item.get("quantity")
        if not isinstance(ext_id, str) or ext_id not in wanted or ext_id in quantities:
            raise MalformedResponse(f"warehouse item id {ext_id!r} was not asked for or repeats")
        if not isinstance(qty, int) or isinstance(qty, bool) or qty < 0:
            raise MalformedResponse(f"warehouse quantity for {ext_id!r} is not a whole number >= 0")
        quantities[ext_id] = qty
    missing = body.get("missing", [])
    if not isinstance(missing, list) or not all(isinstance(m, str) and m in wanted for m in missing):
        raise MalformedResponse("warehouse 'missing' is not a list of the ids asked for")
    return StockAnswer(quantities, tuple(missing))


@dataclass
class HttpWarehouse:
    """The warehouse's HTTP API behind timeouts, retries and a circuit breaker.

    The session belongs to the caller (opened and closed with the process's
    loop); this object only borrows it.
    """

    session: aiohttp.ClientSession
    base_url: str
    breaker: CircuitBreaker
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0
    token: str | None = None

    async def fetch_stock(self, external_ids: list[str], deadline_s: float | None = None) -> StockAnswer:
        """One batch lookup, retried on transient failures within ``deadline_s``."""

        async def attempt() -> StockAnswer:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            async with self.session.post(
                self.base_url.rstrip("/") + LOOKUP_PATH, json={"ids": external_ids},
                headers=headers, timeout=client_timeout(self.connect_timeout_s, self.read_timeout_s),
            ) as response:
                text = await response.text()
                raise_for_status(SERVICE, response.status, response.headers, text)
                return parse_stock_answer(text, external_ids)

        return await call_with_retries(SERVICE, attempt, self.policy, self.breaker,
                                       deadline_s=deadline_s)
