"""The messages the abandoned-cart concern accepts (import this, not its internals).

- ``CART_CHANGED(cart_id)``: sent after any change to a cart (items, status);
  it (re)schedules the reminder for the cart's new version, or cancels it.
  The cart functions of ``actors/carts/carts.py`` send it through the outbox,
  in the transaction of the change, as the job of a ``cart.changed`` event on
  the ``carts`` channel.
- ``REMINDER_DUE(cart_id, cart_updated_at_iso)``: the delayed job itself;
  producers never send it directly (the outbox relay does, with its delay).
- ``SEND_CART_REMINDER(cart_id)``: deliver the decided reminder e-mail.
- ``SWEEP_IDLE_CARTS()``: the periodic backstop for carts nobody announced.
"""

from __future__ import annotations

from runtime.broker import QUEUE_MAINTENANCE, JobSpec

CART_CHANGED = JobSpec(QUEUE_MAINTENANCE, "cart_changed")
REMINDER_DUE = JobSpec(QUEUE_MAINTENANCE, "cart_reminder_due")
SEND_CART_REMINDER = JobSpec(QUEUE_MAINTENANCE, "send_cart_reminder")
SWEEP_IDLE_CARTS = JobSpec(QUEUE_MAINTENANCE, "sweep_idle_carts")

# The outbox channel of cart events and the event every cart change emits.
CARTS_CHANNEL = "carts"
EVENT_CART_CHANGED = "cart.changed"
