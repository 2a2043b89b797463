"""The abandoned-cart actor behind its thin Dramatiq actors (queue ``maintenance``)."""

from __future__ import annotations

from typing import Any

import pykka
from dramatiq.brokers.redis import RedisBroker

from actors.carts.messages import CART_CHANGED, REMINDER_DUE, SEND_CART_REMINDER, SWEEP_IDLE_CARTS
from actors.carts.reminders import (
    fire_reminder,
    schedule_reminder,
    send_reminder_email,
    sweep_idle_carts,
)
from actors.emailer.actor import make_process_transport
from runtime.broker import QUEUE_MAINTENANCE, declare_actor
from runtime.process import ProcessContext
from runtime.service_actor import ServiceActor, start_service_actor
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern

ACTOR_ID = "carts"


def concern(ctx: ProcessContext) -> Concern:
    """One carts actor; its handler dispatches on the message kind."""
    transport = make_process_transport(ctx)
    idle_s = ctx.settings.cart_idle_s

    async def handle(message: tuple[Any, ...]) -> Any:
        kind, *args = message
        if kind == "sweep":
            async with ctx.pool.acquire() as conn:
                return await sweep_idle_carts(conn, idle_s)
        if kind == "send":
            return (await send_reminder_email(ctx.pool, transport, int(args[0]))).result
        async with ctx.pool.acquire() as conn:
            if kind == "changed":
                plan = await schedule_reminder(conn, int(args[0]), idle_s)
                return None if plan is None else plan.due_at.isoformat()
            if kind == "due":
                return await fire_reminder(conn, int(args[0]), str(args[1]), idle_s)
        raise ValueError(f"carts actor does not know message {kind!r}")

    def start() -> pykka.ActorRef[ServiceActor]:
        return start_service_actor(ctx, ACTOR_ID, handle)

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def cart_changed(cart_id: int) -> None:
            """Thin Dramatiq actor: (re)schedule or cancel a cart's reminder."""
            ask(ACTOR_ID, ("changed", int(cart_id)))

        def cart_reminder_due(cart_id: int, cart_updated_at_iso: str) -> None:
            """Thin Dramatiq actor: the delayed job; decides whether the reminder goes out."""
            ask(ACTOR_ID, ("due", int(cart_id), str(cart_updated_at_iso)))

        def send_cart_reminder(cart_id: int) -> None:
            """Thin Dramatiq actor: deliver the decided reminder e-mail."""
            ask(ACTOR_ID, ("send", int(cart_id)))

        def sweep_idle() -> None:
            """Thin Dramatiq actor: schedule reminders for idle carts nobody announced."""
            ask(ACTOR_ID, ("sweep",))

        declare_actor(broker, CART_CHANGED, cart_changed)
        declare_actor(broker, REMINDER_DUE, cart_reminder_due)
        declare_actor(broker, SEND_CART_REMINDER, send_cart_reminder)
        declare_actor(broker, SWEEP_IDLE_CARTS, sweep_idle)

    return Concern("carts", [ChildSpec(ACTOR_ID, start)], declare, (QUEUE_MAINTENANCE,))
