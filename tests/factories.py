"""Test data: a tiny shop in the test's database."""

from __future__ import annotations

import asyncpg

from actors.inventory.messages import RESERVE_STOCK
from actors.orders import service


async def make_shop(conn: asyncpg.Connection, stock: dict[int, int], customers: int = 3,
                    price_cents: int = 1990) -> None:
    """Products 1..n with the given stock, and customers 1..customers."""
    for pid, qty in stock.items():
        await conn.execute(
            "INSERT INTO products (id, sku, name, price_cents) VALUES ($1, $2, $3, $4)",
            pid, f"SKU-{pid}", f"Product {pid}", price_cents,
        )
        await conn.execute("INSERT INTO inventory (product_id, quantity) VALUES ($1, $2)", pid, qty)
    for cid in range(1, customers + 1):
        await conn.execute("INSERT INTO customers (id, name, email) VALUES ($1, $2, $3)",
                           cid, f"Customer {cid}", f"c{cid}@example.com.br")


async def make_order(conn: asyncpg.Connection, customer_id: int, lines: dict[int, int]) -> int:
    """A pending order (its reserve job goes to the outbox, unpublished)."""
    order = service.parse_new_order({
        "customer_id": customer_id,
        "items": [{"product_id": p, "quantity": q} for p, q in lines.items()],
    })
    order_id, _ = await service.create_order(conn, order, RESERVE_STOCK.as_job())
    return order_id


async def inventory(conn: asyncpg.Connection, product_id: int) -> tuple[int, int]:
    """(quantity, reserved_quantity) of a product."""
    row = await conn.fetchrow(
        "SELECT quantity, reserved_quantity FROM inventory WHERE product_id = $1", product_id)
    assert row is not None
    return int(row["quantity"]), int(row["reserved_quantity"])
