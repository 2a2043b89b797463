"""What the orders concern publishes: its event channel and event types."""

from __future__ import annotations

CHANNEL_ORDER_STATUS = "order-status-changed"
EVENT_STATUS_CHANGED = "order.status_changed"
EVENT_CREATED = "order.created"
