"""The messages the abandoned-cart concern accepts (import this, not its internals).

- ``CART_CHANGED(cart_id)``: send after any change to a cart (items, status);
  it (re)schedules the reminder for the cart's new version, or cancels it.
- ``REMINDER_DUE(cart_id, cart_updated_at_iso)``: the delayed job itself;
  producers normally never send it directly.
- ``SWEEP_IDLE_CARTS()``: the periodic backstop for carts nobody announced.
"""

from __future__ import annotations

from runtime.broker import QUEUE_EMAILS, QUEUE_MAINTENANCE, JobSpec

CART_CHANGED = JobSpec(QUEUE_MAINTENANCE, "carts.cart_changed")
REMINDER_DUE = JobSpec(QUEUE_MAINTENANCE, "carts.reminder_due")
SWEEP_IDLE_CARTS = JobSpec(QUEUE_MAINTENANCE, "carts.sweep_idle")
# The emailer's send job; its one argument is an OutgoingEmail as a dict.
# (Reconcile with actors/emailer/messages.py once the emailer lands.)
SEND_EMAIL = JobSpec(QUEUE_EMAILS, "emailer.send_email")
