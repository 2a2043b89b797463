"""Small builders for shop rows in the test database (plain SQL, no services)."""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def customer(conn: asyncpg.Connection, customer_id: int = 1) -> int:
    await conn.execute(
        "INSERT INTO customers (id, name, email) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        customer_id, f"Customer {customer_id}", f"c{customer_id}@example.com",
    )
    return customer_id


async def product(conn: asyncpg.Connection, product_id: int, quantity: int, reserved: int = 0,
                  price_cents: int = 1000) -> int:
    await conn.execute(
        "INSERT INTO products (id, sku, name, price_cents) VALUES ($1, $2, $3, $4)",
        product_id, f"SKU-{product_id}", f"Album {product_id}", price_cents,
    )
    await conn.execute(
        "INSERT INTO inventory (product_id, quantity, reserved_quantity) VALUES ($1, $2, $3)",
        product_id, quantity, reserved,
    )
    return product_id


async def order(conn: asyncpg.Connection, status: str, lines: dict[int, int],
                customer_id: int = 1, created_at: datetime | None = None,
                price_cents: int = 1000) -> int:
    total = sum(q * price_cents for q in lines.values())
    order_id: int = await conn.fetchval(
        """INSERT INTO orders (customer_id, status, total_cents, created_at)
           VALUES ($1, $2, $3, coalesce($4, now())) RETURNING id""",
        customer_id, status, total, created_at,
    )
    for product_id, quantity in lines.items():
        await conn.execute(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) "
            "VALUES ($1, $2, $3, $4)", order_id, product_id, quantity, price_cents,
        )
    return order_id


async def reservation(conn: asyncpg.Connection, order_id: int, product_id: int, quantity: int,
                      expires_at: datetime) -> None:
    await conn.execute(
        "INSERT INTO inventory_reservations (order_id, product_id, quantity, expires_at) "
        "VALUES ($1, $2, $3, $4)", order_id, product_id, quantity, expires_at,
    )
