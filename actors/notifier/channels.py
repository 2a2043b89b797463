"""Channel names and who may see what: the notifier's authorization policy.

The policy is checked twice: when a client subscribes and again for every
single event, because a subscription's right to a channel says nothing about
whose order a given event is about.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

ORDER_STATUS_CHANGED = "order-status-changed"
STOCK_UPDATED = "stock-updated"
JOBS = "jobs"
QUEUES = "queues"
ALERTS = "alerts"
# Review submitted / moderated (actors/agents/moderation.py): the dashboard's flagged list.
REVIEWS = "reviews"
# Actor starts, crashes, restarts and give-ups (runtime/tree.py writes the stream): the
# dashboard's restart counts.
SUPERVISION = "supervision"
CHANNELS: tuple[str, ...] = (ORDER_STATUS_CHANGED, STOCK_UPDATED, JOBS, QUEUES, ALERTS, REVIEWS,
                             SUPERVISION)
# Operator channels: job and queue state, alerts, moderation and supervision are nobody
# else's business.
STAFF_ONLY: frozenset[str] = frozenset({JOBS, QUEUES, ALERTS, REVIEWS, SUPERVISION})
# The payload field a client may filter each channel on, e.g. product_ids for stock.
FILTER_FIELDS: Mapping[str, str] = {
    ORDER_STATUS_CHANGED: "order_id",
    STOCK_UPDATED: "product_id",
    JOBS: "job_id",  # follow one job's progress and outcome
    QUEUES: "name",
}
# Channels whose filter keys are names (strings); the others take integer ids.
TEXT_KEYS: frozenset[str] = frozenset({JOBS, QUEUES})


class Viewer(Protocol):
    """Whoever is on the other end (web.auth.Principal satisfies this)."""

    @property
    def is_staff(self) -> bool: ...

    @property
    def customer_id(self) -> int | None: ...


def may_subscribe(viewer: Viewer, channel: str) -> bool:
    """Whether ``viewer`` may hold a subscription to ``channel`` at all."""
    if channel not in CHANNELS:
        return False
    return viewer.is_staff or channel not in STAFF_ONLY


def may_receive(viewer: Viewer, channel: str, payload: Mapping[str, Any]) -> bool:
    """Whether this one event may reach ``viewer``: customers get only their own orders."""
    if not may_subscribe(viewer, channel):
        return False
    if viewer.is_staff:
        return True
    if channel == ORDER_STATUS_CHANGED:
        owner = payload.get("customer_id")
        return isinstance(owner, int) and not isinstance(owner, bool) and (
            owner == viewer.customer_id
        )
    return True
