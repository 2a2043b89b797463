"""What the inventory concern accepts and publishes."""

from __future__ import annotations

from runtime.broker import QUEUE_INVENTORY, JobSpec

# reserve_stock(order_id): reserve every line of a pending order, all or nothing.
RESERVE_STOCK = JobSpec(QUEUE_INVENTORY, "reserve_stock")

CHANNEL_STOCK = "stock-updated"
EVENT_STOCK_UPDATED = "stock.updated"
