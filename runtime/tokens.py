"""Signed, expiring access tokens for the HTTP API and the WebSocket.

This module is the token itself (issue, verify, the secret); ``web/auth.py``
is the aiohttp side (reading a request's token) and ``shopflow token``. It
lives in ``runtime`` so clients of the API inside the project (the demo
replay) can issue a staff token without importing ``web``.

A token is ``sf1.<claims>.<signature>``: the claims are compact JSON
(``role``, ``cid`` for a customer, ``iat`` and ``exp`` in Unix seconds),
base64url-encoded, and the signature is HMAC-SHA256 over ``sf1.<claims>``
with the token secret. Nothing is stored server-side, so any api process
verifies any token with the shared secret alone.

The secret is ``SHOPFLOW_TOKEN_SECRET`` when set (production: the same value
in every api process). Otherwise a random secret is generated once and kept in
``<var_dir>/secrets/token_secret`` (mode 0600), so the processes of one
machine agree and tokens survive restarts; it never enters the repository.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime.errors import ConfigError, Unauthenticated
from runtime.settings import Settings

TOKEN_PREFIX = "sf1"
# Bytes of randomness in a generated secret (256 bits, the HMAC-SHA256 block strength).
GENERATED_SECRET_BYTES = 32
# A shorter configured secret is refused: it could be brute-forced offline.
MIN_SECRET_CHARS = 16
# Tokens are small; anything longer is garbage and is refused before decoding.
MAX_TOKEN_CHARS = 1024

Role = Literal["customer", "staff"]
ROLES: tuple[Role, ...] = ("customer", "staff")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a customer (with their id) or a member of staff."""

    role: Role
    customer_id: int | None
    expires_at_s: int

    @property
    def is_staff(self) -> bool:
        """Staff see everything: all orders, jobs, queues, alerts."""
        return self.role == "staff"

    def may_see_customer(self, customer_id: object) -> bool:
        """True if this principal may see data owned by ``customer_id``."""
        if self.is_staff:
            return True
        return isinstance(customer_id, int) and not isinstance(customer_id, bool) and (
            customer_id == self.customer_id
        )

    def expired(self, now_s: float) -> bool:
        """True once the token's expiry has passed."""
        return now_s >= self.expires_at_s


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


class TokenSigner:
    """Issues and verifies tokens with one secret; the clock is a parameter for tests."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"the token secret must have at least {MIN_SECRET_CHARS} characters")
        self._secret = secret
        self._clock = clock

    def now_s(self) -> float:
        """The signer's clock (Unix seconds)."""
        return self._clock()

    def _sign(self, signed_part: str) -> str:
        digest = hmac.new(self._secret, signed_part.encode("ascii"), hashlib.sha256).digest()
        return _b64encode(digest)

    def issue(self, role: Role, customer_id: int | None, ttl_s: int) -> str:
        """A token for ``role`` (customers need their id) valid for ``ttl_s`` seconds."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if role == "customer" and customer_id is None:
            raise ValueError("a customer token needs a customer id")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        issued_s = int(self._clock())
        claims: dict[str, Any] = {"role": role, "iat": issued_s, "exp": issued_s + ttl_s}
        if role == "customer":
            claims["cid"] = customer_id
        body = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        signed_part = f"{TOKEN_PREFIX}.{body}"
        return f"{signed_part}.{self._sign(signed_part)}"

    def verify(self, token: str) -> Principal:
        """The principal a token names; :class:`Unauthenticated` if forged, garbled or expired."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("missing or oversized token")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not token.isascii():
            raise Unauthenticated("malformed token")
        expected = self._sign(f"{parts[0]}.{parts[1]}")
        if not hmac.compare_digest(expected, parts[2]):
            raise Unauthenticated("bad token signature")
        principal = _claims_to_principal(parts[1])
        if principal.expired(self._clock()):
            raise Unauthenticated("token expired")
        return principal


def _claims_to_principal(encoded: str) -> Principal:
    """Decode claims that already passed the signature check (so they are ours)."""
    try:
        claims = json.loads(_b64decode(encoded))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed token claims") from None
    if not isinstance(claims, dict):
        raise Unauthenticated("malformed token claims")
    role, exp, cid = claims.get("role"), claims.get("exp"), claims.get("cid")
    if role not in ROLES or not isinstance(exp, int):
        raise Unauthenticated("malformed token claims")
    if role == "customer" and not isinstance(cid, int):
        raise Unauthenticated("malformed token claims")
    return Principal(role=role, customer_id=cid if role == "customer" else None, expires_at_s=exp)


def secret_path(settings: Settings) -> Path:
    """Where the generated secret lives when ``SHOPFLOW_TOKEN_SECRET`` is not set."""
    return settings.var_dir / "secrets" / "token_secret"


def load_secret(settings: Settings) -> bytes:
    """The configured secret, or the machine's generated one (created on first use).

    Creation uses ``O_EXCL`` so two api processes starting together agree on
    one secret: the loser of the race reads the winner's file.
    """
    if settings.token_secret is not None:
        return settings.token_secret.encode()
    path = secret_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret_file(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(GENERATED_SECRET_BYTES))
    return _read_secret_file(path)


def _read_secret_file(path: Path) -> bytes:
    for _ in range(50):  # the creator may not have written it yet
        text = path.read_text().strip()
        if text:
            return text.encode()
        time.sleep(0.01)
    raise ConfigError(f"the token secret file {path} is empty; delete it to generate a new one")


def signer_from_settings(settings: Settings) -> TokenSigner:
    """The process's signer: built once at start-up and kept in the app."""
    return TokenSigner(load_secret(settings))


def staff_token(settings: Settings, ttl_s: int) -> str:
    """A staff token valid ``ttl_s`` seconds, for the project's own API clients (the demo)."""
    return signer_from_settings(settings).issue("staff", None, ttl_s)
