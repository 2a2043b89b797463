"""Retry policy: permanent errors stop, infrastructure outages get more room."""

from __future__ import annotations

import asyncpg
import redis

from runtime.broker import _retry_when, is_infrastructure_error
from runtime.errors import PermanentJobError


def test_permanent_errors_are_never_retried() -> None:
    assert not _retry_when(2, 25)(0, PermanentJobError("bad address"))


def test_ordinary_failures_stop_after_their_attempts() -> None:
    should = _retry_when(2, 25)
    assert should(0, ValueError("x")) and should(1, ValueError("x"))
    assert not should(2, ValueError("x"))


def test_server_outages_get_the_infrastructure_budget() -> None:
    should = _retry_when(2, 25)
    for exc in (ConnectionRefusedError(), redis.exceptions.ConnectionError(),
                asyncpg.exceptions.ConnectionDoesNotExistError("closed"),
                asyncpg.exceptions.AdminShutdownError("terminating connection")):
        assert is_infrastructure_error(exc)
        assert should(10, exc)
        assert not should(25, exc)
