"""Access tokens on the aiohttp side: reading and checking a request's token, ``shopflow token``.

The token itself (format, signing, the secret) is :mod:`runtime.tokens`;
its names are re-exported here for the web code and its tests.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from runtime.errors import Forbidden, Unauthenticated
from runtime.settings import Settings
from runtime.tokens import (
    ROLES,
    TOKEN_PREFIX,
    Principal,
    Role,
    TokenSigner,
    load_secret,
    secret_path,
    signer_from_settings,
)

__all__ = [
    "ROLES", "SIGNER_KEY", "TOKEN_PREFIX", "Principal", "Role", "TokenSigner", "authenticate",
    "bearer_token", "ensure_signer", "load_secret", "register", "require_staff", "secret_path",
    "signer_from_settings",
]

# --- aiohttp glue -------------------------------------------------------------

SIGNER_KEY = web.AppKey("token_signer", TokenSigner)


def ensure_signer(app: web.Application, settings: Settings) -> TokenSigner:
    """The app's signer, creating it on first call (both setup_api and setup_realtime use it)."""
    if SIGNER_KEY not in app:
        app[SIGNER_KEY] = signer_from_settings(settings)
    return app[SIGNER_KEY]


def bearer_token(request: web.Request) -> str | None:
    """The token from ``Authorization: Bearer …``, or the ``token`` query parameter.

    Browsers cannot set headers on a WebSocket handshake, hence the query form.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    query = request.query.get("token")
    return query or None


def authenticate(request: web.Request) -> Principal:
    """The verified principal of a request; :class:`Unauthenticated` otherwise."""
    token = bearer_token(request)
    if token is None:
        raise Unauthenticated("send 'Authorization: Bearer <token>' (see `shopflow token`)")
    return request.app[SIGNER_KEY].verify(token)


def require_staff(request: web.Request) -> Principal:
    """The principal, who must be staff: the staff API token guards operator endpoints."""
    principal = authenticate(request)
    if not principal.is_staff:
        raise Forbidden("this endpoint needs a staff token")
    return principal


# --- the `shopflow token` command ----------------------------------------------


def _cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    signer = signer_from_settings(settings)
    ttl_s = args.ttl_s if args.ttl_s is not None else settings.token_ttl_s
    if args.staff:
        print(signer.issue("staff", None, ttl_s))
    else:
        print(signer.issue("customer", args.customer, ttl_s))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point (``shopflow.commands``): adds ``shopflow token``."""
    from runtime.cli import add_command

    parser = add_command(
        subparsers, "token", _cmd_token,
        "print an access token for the API and the dashboard",
        "print a signed access token for the HTTP API, the WebSocket and the dashboard",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", type=int, metavar="ID", help="a token for this customer")
    who.add_argument("--staff", action="store_true", help="a staff token (operators, dashboard)")
    parser.add_argument("--ttl-s", type=int, default=None, metavar="SECONDS",
                        help="validity in seconds (default SHOPFLOW_TOKEN_TTL_S)")
