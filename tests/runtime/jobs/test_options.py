"""Job options are checked when a message is built; retry decisions follow the policy."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import redis

from runtime.broker import QUEUE_EMAILS, JobSpec, declare_actor, setup_broker
from runtime.errors import (
    ActorCrashed,
    CircuitOpen,
    ExternalRequestRejected,
    ExternalServiceError,
    OutcomeUnknown,
    PermanentJobError,
    TransientJobError,
    ValidationError,
)
from runtime.jobs.broker import JobBroker
from runtime.jobs.options import RetryPolicy, check_options
from runtime.jobs.retries import is_infrastructure_error, retry_delay_ms
from runtime.settings import Settings

SPEC = JobSpec("emails", "send_it")


def test_an_unknown_option_fails_when_the_message_is_built() -> None:
    with pytest.raises(ValidationError, match="unknown job option 'atempts'") as err:
        SPEC.message(1, atempts=3)
    assert err.value.field == "atempts"
    with pytest.raises(ValidationError, match="unknown job option"):
        SPEC.as_job(1, retry_forever=True)


@pytest.mark.parametrize(("name", "value"), [
    ("attempts", 0), ("attempts", "3"), ("priority", 11), ("priority", -11), ("delay_ms", -1),
    ("backoff", "linear"), ("job_id", "has space"), ("job_id", ""), ("jitter", 1),
    ("timeout_ms", 0), ("keep_completed", -1),
])
def test_bad_option_values_are_refused_with_the_option_named(name: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        check_options({name: value})
    assert err.value.field == name


def test_good_options_reach_the_message_and_timeout_becomes_dramatiqs_time_limit() -> None:
    message = SPEC.message(7, job_id="order-7:confirm", attempts=5, priority=3, timeout_ms=9000,
                           delay_ms=100)
    assert message.options == {"job_id": "order-7:confirm", "attempts": 5, "priority": 3,
                               "time_limit": 9000}


def test_exponential_backoff_doubles_up_to_its_cap_and_fixed_stays() -> None:
    policy = RetryPolicy(attempts=5, backoff_ms=1000, backoff_max_ms=5000, jitter=False)
    assert [policy.delay_ms(n) for n in range(5)] == [1000, 2000, 4000, 5000, 5000]
    fixed = RetryPolicy(attempts=5, backoff="fixed", backoff_ms=700, jitter=False)
    assert [fixed.delay_ms(n) for n in range(3)] == [700, 700, 700]


def test_jitter_spreads_a_delay_by_a_quarter_either_way() -> None:
    policy = RetryPolicy(attempts=3, backoff_ms=1000, backoff_max_ms=1000, jitter=True)
    assert policy.delay_ms(0, 0.0) == 750
    assert policy.delay_ms(0, 0.5) == 1000
    assert policy.delay_ms(0, 0.999) == 1249


def test_message_options_override_the_policy() -> None:
    base = RetryPolicy(attempts=3, backoff_ms=2000, backoff_max_ms=32000)
    custom = base.with_options({"attempts": 7, "backoff": "fixed", "backoff_ms": 10})
    assert (custom.attempts, custom.backoff, custom.backoff_ms) == (7, "fixed", 10)
    assert base.with_options({"max_retries": 0}).attempts == 1  # Dramatiq's spelling


POLICY = RetryPolicy(attempts=3, backoff_ms=100, backoff_max_ms=1600, jitter=False)


def test_permanent_errors_are_never_retried() -> None:
    assert retry_delay_ms(POLICY, 25, 0, PermanentJobError("bad address")) is None
    assert retry_delay_ms(POLICY, 25, 0, ExternalRequestRejected("400", status=400)) is None


def test_ordinary_failures_use_the_jobs_own_attempts() -> None:
    assert retry_delay_ms(POLICY, 25, 0, TransientJobError("flaky")) == 100
    assert retry_delay_ms(POLICY, 25, 1, TransientJobError("flaky")) == 200
    assert retry_delay_ms(POLICY, 25, 2, TransientJobError("flaky")) is None


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(), asyncpg.CannotConnectNowError("starting"),
    redis.exceptions.ConnectionError("down"), ExternalServiceError("503", status=503),
    CircuitOpen("open"), OutcomeUnknown("no answer"),
])
def test_outages_get_the_outage_budget(exc: BaseException) -> None:
    assert is_infrastructure_error(exc)
    assert retry_delay_ms(POLICY, 25, 10, exc) is not None
    assert retry_delay_ms(POLICY, 25, 25, exc) is None


def test_an_outage_behind_an_actor_crash_is_still_an_outage() -> None:
    try:
        try:
            raise ConnectionResetError("PostgreSQL went away")
        except ConnectionResetError as cause:
            raise ActorCrashed("reserver crashed") from cause
    except ActorCrashed as crash:
        assert is_infrastructure_error(crash)
        assert retry_delay_ms(POLICY, 25, 10, crash) is not None


def test_a_services_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    assert retry_delay_ms(POLICY, 25, 0, ExternalServiceError("429", retry_after_s=7.5)) == 7500
    assert retry_delay_ms(POLICY, 25, 0, OutcomeUnknown("grace", retry_after_s=0.01)) == 100


def test_the_built_broker_retries_like_the_original_system_by_default(
        servers: tuple[str, str], tmp_path: Path) -> None:
    """Default settings: 3 attempts, exponential backoff from 2 s (the original system's)."""
    redis_url, database_url = servers
    defaults = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": database_url,
                                  "SHOPFLOW_VAR_DIR": str(tmp_path)})
    broker = setup_broker(defaults)
    try:
        policy = broker.config.retry
        assert (policy.attempts, policy.backoff, policy.backoff_ms) == (3, "exponential", 2_000)
        assert [policy.delay_ms(n) for n in range(3)] == [2_000, 4_000, 8_000]  # 0.5: no jitter
        declare_actor(broker, SPEC, lambda: None)
        assert broker.max_attempts(SPEC.message()) == 3  # what a declared actor's job gets
    finally:
        broker.close()


def test_dramatiqs_own_send_with_options_is_checked_too(broker: JobBroker) -> None:
    """``actor.send_with_options`` builds its message without JobSpec: the broker checks it."""
    actor = declare_actor(broker, JobSpec(QUEUE_EMAILS, "jobs_test_options"), lambda n: None)
    with pytest.raises(ValidationError, match="unknown job option 'atempts'") as err:
        actor.send_with_options(args=(1,), atempts=3)
    assert err.value.field == "atempts"
    with pytest.raises(ValidationError, match="'priority' must be between"):
        actor.send_with_options(args=(1,), priority=99)
    assert broker.client.hlen(broker.keys.queue(QUEUE_EMAILS, "msgs")) == 0, "nothing was sent"
    sent = actor.send_with_options(args=(1,), attempts=2, timeout_ms=500, max_age=60_000)
    assert (sent.options["attempts"], sent.options["time_limit"]) == (2, 500)
    assert sent.options["max_age"] == 60_000, "an option another middleware owns passes"
    assert "timeout_ms" not in sent.options
    assert broker.client.hlen(broker.keys.queue(QUEUE_EMAILS, "msgs")) == 1
