"""Signed expiring tokens, the generated secret, and `shopflow token`."""

from __future__ import annotations

import base64
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import cli
from runtime.errors import ConfigError, Unauthenticated
from runtime.settings import Settings
from web.auth import TokenSigner, load_secret, secret_path

SECRET = b"unit-test-secret-0123456789abcdef"


def test_issue_and_verify_roundtrip() -> None:
    now = [1_000_000.0]
    signer = TokenSigner(SECRET, clock=lambda: now[0])
    customer = signer.verify(signer.issue("customer", 42, 60))
    assert (customer.role, customer.customer_id, customer.is_staff) == ("customer", 42, False)
    assert customer.may_see_customer(42) and not customer.may_see_customer(43)
    assert not customer.may_see_customer(True)
    token = signer.issue("staff", None, 60)
    staff = signer.verify(token)
    assert staff.is_staff and staff.may_see_customer(43)
    now[0] += 60
    with pytest.raises(Unauthenticated, match="expired"):
        signer.verify(token)


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),   # signature changed
    lambda t: "sf2" + t[3:],                                         # unknown version
    lambda t: t.replace(".", "", 1),                                 # wrong shape
    lambda t: t + "é",                                               # not ASCII
    lambda t: "",                                                    # empty
    lambda t: "sf1." + "a" * 2000 + ".b",                            # oversized
])
def test_tampered_tokens_are_refused(mangle) -> None:  # type: ignore[no-untyped-def]
    signer = TokenSigner(SECRET)
    with pytest.raises(Unauthenticated):
        signer.verify(mangle(signer.issue("customer", 1, 60)))


def test_claims_cannot_be_swapped_without_the_secret() -> None:
    signer = TokenSigner(SECRET)
    prefix, _, signature = signer.issue("customer", 1, 60).split(".")
    forged_claims = base64.urlsafe_b64encode(json.dumps(
        {"role": "staff", "iat": 0, "exp": 2**40}).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated, match="signature"):
        signer.verify(f"{prefix}.{forged_claims}.{signature}")


def test_short_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        TokenSigner(b"short")


def test_generated_secret_is_private_and_stable(tmp_path: Path) -> None:
    settings = Settings.from_env({"SHOPFLOW_VAR_DIR": str(tmp_path / "var")})
    first = load_secret(settings)
    assert load_secret(settings) == first and len(first) == 64
    mode = stat.S_IMODE(secret_path(settings).stat().st_mode)
    assert mode == 0o600
    configured = Settings.from_env({"SHOPFLOW_VAR_DIR": str(tmp_path / "var"),
                                    "SHOPFLOW_TOKEN_SECRET": "x" * 20})
    assert load_secret(configured) == b"x" * 20


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """cli.main sets up logging on the captured stderr; put the root logger back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("keep_logging")
def test_shopflow_token_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SHOPFLOW_VAR_DIR", str(tmp_path / "var"))
    assert cli.main(["token", "--customer", "7", "--ttl-s", "120"]) == 0
    token = capsys.readouterr().out.strip()
    settings = Settings.from_env({"SHOPFLOW_VAR_DIR": str(tmp_path / "var")})
    principal = TokenSigner(load_secret(settings)).verify(token)
    assert principal.customer_id == 7 and principal.role == "customer"
    assert cli.main(["token", "--staff"]) == 0
    assert TokenSigner(load_secret(settings)).verify(capsys.readouterr().out.strip()).is_staff
    with pytest.raises(SystemExit):
        cli.main(["token"])
