"""E-mail transports: the Protocol and the default outbox transport.

The outbox transport is what a fresh machine uses (no SENDGRID_API_KEY): it
writes each e-mail as an ``.eml`` file named after its idempotency key, so
sending the same logical e-mail again replaces the file instead of adding a
second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Protocol

FROM_ADDRESS = "ShopFlow <pedidos@shopflow.example>"


@dataclass(frozen=True)
class OutgoingEmail:
    """One logical e-mail; ``idempotency_key`` names it across retries."""

    idempotency_key: str
    to: str
    subject: str
    text: str
    html: str | None = None
    template: str | None = None
    template_data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    """What the provider said: its message id, if it gives one."""

    provider_id: str | None


class EmailTransport(Protocol):
    """Delivers an e-mail. Raises PermanentJobError for a failure a retry cannot fix,
    TransientJobError (or any other error) for one it might."""

    name: str

    async def send(self, email: OutgoingEmail) -> SendResult: ...


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def eml_filename(idempotency_key: str) -> str:
    """A file name unique per key and safe on any file system."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', idempotency_key)[:80]}-{digest}.eml"


class OutboxTransport:
    """Writes ``.eml`` files under a folder; the default when SendGrid is not configured."""

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, email: OutgoingEmail) -> SendResult:
        return await asyncio.to_thread(self._write, email)

    def _write(self, email: OutgoingEmail) -> SendResult:
        self.directory.mkdir(parents=True, exist_ok=True)
        msg = EmailMessage()
        msg["From"] = FROM_ADDRESS
        msg["To"] = email.to
        msg["Subject"] = email.subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(idstring=hashlib.sha256(email.idempotency_key.encode()).hexdigest()[:16])
        msg["X-Idempotency-Key"] = email.idempotency_key
        msg.set_content(email.text)
        if email.html:
            msg.add_alternative(email.html, subtype="html")
        final = self.directory / eml_filename(email.idempotency_key)
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(bytes(msg))
        os.replace(tmp, final)  # atomic: a reader sees the whole e-mail or none
        return SendResult(provider_id=msg["Message-ID"])
