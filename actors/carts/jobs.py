"""The Dramatiq actors of the abandoned-cart concern: thin wrappers over reminders.py.

Each runs its coroutine on the process's loop through the bridge, on a
connection from the process's pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import dramatiq

from actors.carts.messages import CART_CHANGED, REMINDER_DUE, SWEEP_IDLE_CARTS
from actors.carts.reminders import fire_reminder, schedule_reminder, sweep_idle_carts
from runtime.broker import declare_actor
from runtime.loop import LoopBridge
from runtime.settings import Settings

T = TypeVar("T")


def declare_cart_actors(broker: dramatiq.Broker, bridge: LoopBridge, pool: asyncpg.Pool,
                        settings: Settings) -> list[dramatiq.Actor[Any, Any]]:
    """Bind the cart messages to their functions on ``broker`` (call once per worker process)."""

    def on_conn(work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async def run() -> T:
            async with pool.acquire() as conn:
                return await work(conn)

        return bridge.run(run(), timeout_s=settings.actor_ask_timeout_s)

    def cart_changed(cart_id: int) -> None:
        """CART_CHANGED: (re)schedule or cancel the cart's reminder."""
        on_conn(lambda conn: schedule_reminder(conn, cart_id, settings.cart_idle_s))

    def reminder_due(cart_id: int, cart_updated_at_iso: str) -> str:
        """REMINDER_DUE: the delayed job; sends the reminder if it still applies."""
        return on_conn(lambda conn: fire_reminder(conn, cart_id, cart_updated_at_iso,
                                                  settings.cart_idle_s))

    def sweep_idle() -> int:
        """SWEEP_IDLE_CARTS: schedule reminders for idle carts nobody announced."""
        return on_conn(lambda conn: sweep_idle_carts(conn, settings.cart_idle_s))

    return [
        declare_actor(broker, CART_CHANGED, cart_changed),
        declare_actor(broker, REMINDER_DUE, reminder_due),
        declare_actor(broker, SWEEP_IDLE_CARTS, sweep_idle),
    ]
