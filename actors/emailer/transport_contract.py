"""The e-mail transport contract, as the SendGrid transport implements it.

A stand-in for ``actors/emailer/transports.py`` (the emailer's own module):
the same names and shapes, so that after merging, the SendGrid transport
imports them from there and this file goes away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class OutgoingEmail:
    """One logical e-mail; ``idempotency_key`` names it across retries and processes."""

    idempotency_key: str
    to: str
    subject: str
    text: str
    html: str | None = None
    template: str | None = None
    template_data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    """What the provider said: its message id, when it gives one."""

    provider_id: str | None


class EmailTransport(Protocol):
    """Something that delivers an :class:`OutgoingEmail` (SendGrid, the file outbox, ...)."""

    name: str

    async def send(self, email: OutgoingEmail) -> SendResult:
        """Deliver once per idempotency key; PermanentJobError / TransientJobError on failure."""
        ...
