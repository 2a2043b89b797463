"""The order status state machine: the only place that knows the allowed moves.

```
pending ──reserve──▶ reserved ──pay──▶ paid ──▶ allocated ──▶ processing ──▶ label_created ──▶ ready_to_ship ──▶ shipped ──▶ delivered
   │                    │                 │                       │               │
   └──▶ failed          └──▶ cancelled    └──▶ failed             └──▶ failed     └──▶ failed
pending ──▶ cancelled   (reservation expired or cancelled)
```

``processing``/``label_created`` → ``failed``: the carrier or the warehouse
refused the order's label or packing request for good (a 4xx); the reason
says which and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from runtime.errors import InvalidTransition

PENDING = "pending"
RESERVED = "reserved"
PAID = "paid"
ALLOCATED = "allocated"
PROCESSING = "processing"
LABEL_CREATED = "label_created"
READY_TO_SHIP = "ready_to_ship"
SHIPPED = "shipped"
DELIVERED = "delivered"
FAILED = "failed"
CANCELLED = "cancelled"

TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType({
    PENDING: frozenset({RESERVED, FAILED, CANCELLED}),
    RESERVED: frozenset({PAID, CANCELLED}),
    PAID: frozenset({ALLOCATED, FAILED}),
    ALLOCATED: frozenset({PROCESSING}),
    PROCESSING: frozenset({LABEL_CREATED, FAILED}),
    LABEL_CREATED: frozenset({READY_TO_SHIP, FAILED}),
    READY_TO_SHIP: frozenset({SHIPPED}),
    SHIPPED: frozenset({DELIVERED}),
    DELIVERED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
})

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt) | {READY_TO_SHIP}


def allowed_from(to_status: str) -> frozenset[str]:
    """Every status from which ``to_status`` may be reached in one step."""
    if to_status not in TRANSITIONS:
        raise InvalidTransition(f"unknown order status {to_status!r}")
    return frozenset(s for s, nxt in TRANSITIONS.items() if to_status in nxt)


def check(from_status: str, to_status: str) -> None:
    """Raise :class:`InvalidTransition` unless ``from_status -> to_status`` is allowed."""
    if to_status not in TRANSITIONS.get(from_status, frozenset()):
        raise InvalidTransition(f"order cannot go from {from_status!r} to {to_status!r}")
