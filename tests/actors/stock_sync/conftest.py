"""Fixtures for the stock syncer: the warehouse simulator on a real port, linked products."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from actors.stock_sync.sync import SyncDeps
from actors.stock_sync.warehouse_client import HttpWarehouse
from ops.simulators.faults import FAULTS_KEY, Faults, FaultState, serve
from ops.simulators.warehouse import WAREHOUSE_KEY, WarehouseState, create_warehouse_app
from runtime.circuit import CircuitBreaker
from runtime.http import RetryPolicy


@dataclass
class Warehouse:
    """A running simulator and handles on its state."""

    url: str
    app: web.Application

    @property
    def state(self) -> WarehouseState:
        return self.app[WAREHOUSE_KEY]

    @property
    def faults(self) -> FaultState:
        return self.app[FAULTS_KEY]

    def set_faults(self, **knobs: float) -> None:
        self.faults.faults = Faults().updated(knobs)

    def lookups(self) -> int:
        return self.faults.stats["requests /v1/stock/lookup"]


@pytest.fixture
async def warehouse() -> AsyncIterator[Warehouse]:
    app = create_warehouse_app(seed=11)
    async with serve(app) as url:
        yield Warehouse(url, app)


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def link_products(pool: asyncpg.Pool, count: int, quantity: int = 0,
                        reserved: int = 0) -> list[str]:
    """Insert ``count`` products with inventory rows linked to EXT-<id>; return the external ids."""
    ids = list(range(1, count + 1))
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO products (id, sku, name, price_cents) VALUES ($1, $2, $3, 1000)",
            [(i, f"SKU-{i}", f"Product {i}") for i in ids])
        await conn.executemany(
            "INSERT INTO inventory (product_id, quantity, reserved_quantity, external_id) "
            "VALUES ($1, $2, $3, $4)", [(i, quantity, reserved, f"EXT-{i}") for i in ids])
    return [f"EXT-{i}" for i in ids]


def make_client(session: aiohttp.ClientSession, url: str, breaker: CircuitBreaker | None = None,
                read_timeout_s: float = 1.0, attempts: int = 2) -> HttpWarehouse:
    """A warehouse client with test-sized timeouts and backoff."""
    return HttpWarehouse(
        session=session, base_url=url,
        breaker=breaker or CircuitBreaker("warehouse", failure_threshold=100),
        policy=RetryPolicy(attempts=attempts, base_backoff_s=0.01, max_backoff_s=0.02),
        connect_timeout_s=1.0, read_timeout_s=read_timeout_s)


MakeDeps = Callable[..., SyncDeps]


@dataclass
class InFlight:
    """Counts the lookups a server is handling at once, and the most it ever saw."""

    now: int = 0
    most: int = 0

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
        if request.path.startswith("/_admin"):
            return await handler(request)
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await handler(request)
        finally:
            self.now -= 1


@pytest.fixture
async def counting_warehouse() -> AsyncIterator[tuple[Warehouse, InFlight]]:
    """The simulator with a recorder of concurrent lookups outside its fault knobs.

    The recorder runs first, so a lookup counts as in flight for the whole
    injected latency.
    """
    app = create_warehouse_app(seed=11)
    in_flight = InFlight()
    app.middlewares.insert(0, in_flight.middleware)
    async with serve(app) as url:
        yield Warehouse(url, app), in_flight


@contextmanager
def unaccepting_address(max_fillers: int = 256) -> Iterator[str]:
    """A local URL whose TCP handshake never completes: a listener with a full backlog.

    The socket listens but never accepts; connections are opened until one
    does not complete within a short wait, so the kernel's accept queue is
    full and every further SYN is dropped, as with a host that does not
    answer. Works offline, unlike a non-routable address.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(max_fillers):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.settimeout(0.2)
            try:
                filler.connect(address)
            except TimeoutError:
                break  # the queue is full: the next handshake hangs too
        else:
            raise RuntimeError("could not fill the listen backlog")
        yield f"http://{address[0]}:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
