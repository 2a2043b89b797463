"""What the fulfilment flow accepts."""

from __future__ import annotations

from runtime.broker import QUEUE_FULFILLMENT, JobSpec

# advance_fulfillment(order_id): take the order one step further along the flow.
ADVANCE_FULFILLMENT = JobSpec(QUEUE_FULFILLMENT, "advance_fulfillment")
