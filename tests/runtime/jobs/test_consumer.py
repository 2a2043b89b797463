"""The job consumer on real Redis, without worker threads: wake-ups and the finish call.

These pin down what the consumer's shortcuts must not change: a consumer that
emptied its queue waits for a wake-up instead of fetching again, and still sees
every job sent afterwards at once; a count another part of the runtime asks for
(the queue monitor's outcomes) is written by the finish call itself, once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from dramatiq.broker import MessageProxy

from runtime.broker import QUEUE_ANALYTICS, JobSpec, declare_actor, setup_broker
from runtime.jobs.broker import JobBroker, JobConsumer
from runtime.jobs.outcome import Outcome, Tally, add_tally, set_outcome
from runtime.settings import Settings

JOB = JobSpec(QUEUE_ANALYTICS, "consumer_test_job")
# Long enough that a lost wake-up would show as a consumer coming back empty-handed.
LONG_IDLE_TIMEOUT_MS = 20_000


@pytest.fixture
def patient(settings: Settings) -> Iterator[JobBroker]:
    """A job broker whose idle consumers wait for a wake-up for a long time."""
    broker = setup_broker(replace(settings, worker_idle_timeout_ms=LONG_IDLE_TIMEOUT_MS))
    declare_actor(broker, JOB, lambda n: None)
    yield broker
    broker.close()


def _consumer(broker: JobBroker, prefetch: int = 8) -> JobConsumer:
    consumer = broker.consume(QUEUE_ANALYTICS, prefetch)
    assert isinstance(consumer, JobConsumer)
    return consumer


def _next_message(consumer: JobConsumer, tries: int) -> MessageProxy:
    for _ in range(tries):
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError(f"no message after {tries} looks")


def test_a_fetch_that_empties_the_queue_drops_its_wake_up_tokens(
        settings: Settings, patient: JobBroker) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    wake_key = patient.keys.queue(QUEUE_ANALYTICS, "wake")
    for n in range(3):
        JOB.send(patient, n)
    assert client.llen(wake_key) == 3
    consumer = _consumer(patient)
    got = [_next_message(consumer, 1) for _ in range(3)]
    assert [m.args for m in got] == [(0,), (1,), (2,)]
    assert client.llen(wake_key) == 0, "no idle consumer should wake for jobs already taken"
    client.close()


def test_a_fetch_that_leaves_jobs_waiting_keeps_the_tokens_for_other_consumers(
        settings: Settings, patient: JobBroker) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    wake_key = patient.keys.queue(QUEUE_ANALYTICS, "wake")
    for n in range(3):
        JOB.send(patient, n)
    _next_message(_consumer(patient, prefetch=1), 1)
    assert client.llen(wake_key) == 3
    client.close()


def test_a_consumer_that_emptied_its_queue_still_sees_the_next_job_at_once(
        patient: JobBroker) -> None:
    consumer = _consumer(patient)
    JOB.send(patient, 1)
    first = _next_message(consumer, 1)
    JOB.send(patient, 2)
    # Drained: the next look waits on the wake-up list, which the send above filled, so
    # it returns at once instead of after the 20 s idle timeout; the look after fetches.
    second = _next_message(consumer, 2)
    assert (first.args, second.args) == ((1,), (2,))


def test_a_tally_is_written_by_the_finish_once_and_not_by_a_finish_that_lost_the_job(
        settings: Settings, patient: JobBroker) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    key = f"{settings.namespace}:consumer-test:tally"
    JOB.send(patient, 1)
    consumer = _consumer(patient)
    message = _next_message(consumer, 1)
    patient.jobs("start", QUEUE_ANALYTICS, message.options["redis_message_id"],
                 message.options["job_id"], JOB.actor, patient.broker_id, 1, "")
    outcome = Outcome("completed", {"result": None, "attempt": 1})
    tally = Tally(key, "completed", 600)
    set_outcome(message, outcome)
    add_tally(message, tally)
    consumer.ack(message)
    assert client.hget(patient.keys.job(message.options["job_id"]), "state") == b"completed"
    assert client.hgetall(key) == {b"completed": b"1"}
    assert 0 < client.ttl(key) <= 600
    # A second finish of the same message (an ack retried after its reply was lost)
    # finds the job ended and not held: it records nothing and counts nothing.
    patient.finish(QUEUE_ANALYTICS, message, outcome, tally)
    assert client.hgetall(key) == {b"completed": b"1"}
    client.close()


def test_a_held_connection_the_server_closed_is_replaced_before_the_next_call(
        settings: Settings, patient: JobBroker) -> None:
    held = patient.jobs.connection()
    held_id = held.client_id()
    admin = redis.Redis.from_url(settings.redis_url or "")
    assert admin.client_kill_filter(_id=str(held_id)) == 1  # as a Redis restart would, for this one
    admin.close()
    # The pool checks a connection before every command; the held one must not fail either.
    assert patient.jobs("progress", "no-such-job", "1") == ["missing"]
    assert patient.jobs.connection() is held and held.client_id() != held_id


def test_an_idle_wait_longer_than_the_socket_timeout_ends_quietly(settings: Settings) -> None:
    """A 20 s idle timeout on a connection that times out reads after 1 s: each look at
    the wake-up list ends before the socket gives up (else redis-py raises TimeoutError
    and Dramatiq restarts the consumer, seconds later)."""
    url = f"{settings.redis_url}{'&' if '?' in (settings.redis_url or '') else '?'}socket_timeout=1"
    broker = setup_broker(replace(settings, redis_url=url,
                                  worker_idle_timeout_ms=LONG_IDLE_TIMEOUT_MS))
    try:
        consumer = _consumer(broker)
        for _ in range(2):  # an empty fetch, then the wait on the wake-up list
            assert next(consumer) is None
    finally:
        broker.close()
