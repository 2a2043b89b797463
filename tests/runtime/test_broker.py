"""Retry policy: permanent errors stop, infrastructure outages get more room."""

from __future__ import annotations

import asyncpg
import redis

from runtime.broker import _retry_when, is_infrastructure_error
from runtime.errors import (
    CircuitOpen,
    ExternalRequestRejected,
    ExternalServiceError,
    OutcomeUnknown,
    PermanentJobError,
)


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


def test_outside_service_outages_get_the_infrastructure_budget() -> None:
    """A SendGrid or warehouse outage of minutes must not use up a job's own attempts."""
    should = _retry_when(2, 25)
    for exc in (ExternalServiceError("sendgrid: 503 Service Unavailable", status=503),
                CircuitOpen("warehouse: circuit open"),
                OutcomeUnknown("no answer after the request went out")):
        assert is_infrastructure_error(exc)
        assert should(10, exc)
        assert not should(25, exc)
    assert not should(0, ExternalRequestRejected("sendgrid: 400 bad address", status=400))
