"""Dramatiq's ``eta`` and its ``.DQ`` delay queues: every such message runs, once.

Left on a stored message, an ``eta`` makes Dramatiq's worker park the job in
its own memory and send it again when due; that second send is refused as a
duplicate of the job's own record, so the job would never run. The runtime
turns an eta into its own delay instead, on the producer side, on the consumer
side (a message written straight to Redis) and for a plain Dramatiq producer's
``Q.DQ`` queue.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from runtime.broker import QUEUE_ANALYTICS, JobSpec, declare_actor
from runtime.jobs.broker import JobBroker

from .conftest import Seen

LATER = JobSpec(QUEUE_ANALYTICS, "jobs_test_eta")
# How far ahead the etas are: enough to be "not yet due" when the worker first sees them.
AHEAD_MS = 300


def _record(broker: JobBroker, job_id: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = broker.client.hgetall(broker.keys.job(job_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def _history(broker: JobBroker, job_id: str) -> list[str]:
    """The job's events, oldest first."""
    entries = broker.client.lrange(broker.keys.history(job_id), 0, -1)
    return [json.loads(e)["event"] for e in reversed(entries)]


def _started_ms(broker: JobBroker, job_id: str) -> int:
    """When the start script ran the job (the clock the delayed set is scored on)."""
    return int(_record(broker, job_id)["started_ms"])


def test_a_message_sent_with_dramatiqs_eta_runs_when_due(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    ran: list[str] = []
    actor = declare_actor(broker, LATER, ran.append)
    eta_ms = int(time.time() * 1000) + AHEAD_MS
    message = actor.message_with_options(args=("producer",), eta=eta_ms)
    sent = broker.submit(message)
    with running({QUEUE_ANALYTICS}, threads=1):
        seen.wait("completed", sent.job_id)
    assert ran == ["producer"]
    assert sent.state == "delayed"
    assert "eta" not in json.loads(_record(broker, sent.job_id)["message"])["options"]
    assert _started_ms(broker, sent.job_id) >= eta_ms
    assert _record(broker, sent.job_id)["run_at_ms"] == str(eta_ms)


def _write_raw(broker: JobBroker, queue_key: str, msgs_key: str, message: dict[str, Any]) -> None:
    rid = message["options"]["redis_message_id"]
    broker.client.hset(msgs_key, rid, json.dumps(message))
    broker.client.rpush(queue_key, rid)


def _outside_message(queue: str, tag: str, eta_ms: int) -> dict[str, Any]:
    return {"queue_name": queue, "actor_name": LATER.actor, "args": [tag], "kwargs": {},
            "options": {"redis_message_id": str(uuid.uuid4()), "eta": eta_ms},
            "message_id": str(uuid.uuid4()), "message_timestamp": int(time.time() * 1000)}


def test_a_message_written_to_redis_with_an_eta_waits_for_it_in_redis_then_runs(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    ran: list[str] = []
    declare_actor(broker, LATER, ran.append)
    eta_ms = int(time.time() * 1000) + AHEAD_MS
    message = _outside_message(QUEUE_ANALYTICS, "outside", eta_ms)
    _write_raw(broker, broker.keys.queue(QUEUE_ANALYTICS),
               broker.keys.queue(QUEUE_ANALYTICS, "msgs"), message)
    job_id = message["message_id"]
    with running({QUEUE_ANALYTICS}, threads=1):
        seen.wait("completed", job_id)
    assert ran == ["outside"]
    assert _history(broker, job_id) == ["delayed", "waiting", "active", "completed"]
    assert _started_ms(broker, job_id) >= eta_ms


def test_a_plain_dramatiq_producers_delayed_message_on_the_dq_queue_is_consumed(
        broker: JobBroker, seen: Seen, running: Callable[..., Any]) -> None:
    ran: list[str] = []
    declare_actor(broker, LATER, ran.append)
    redis_url = broker.client.connection_pool.connection_kwargs
    plain = RedisBroker(host=redis_url["host"], port=redis_url["port"],
                        db=redis_url.get("db", 0), namespace=broker.keys.namespace,
                        maintenance_chance=0, middleware=[])  # type: ignore[no-untyped-call]
    try:
        plain_actor: dramatiq.Actor[Any, Any] = dramatiq.Actor(
            ran.append, broker=plain, actor_name=LATER.actor, queue_name=LATER.queue,
            priority=0, options={})
        before_ms = int(time.time() * 1000)
        sent = plain_actor.send_with_options(args=("plain-dramatiq",), delay=AHEAD_MS)
    finally:
        plain.close()
    assert sent.queue_name == f"{QUEUE_ANALYTICS}.DQ"  # Dramatiq's own delay queue
    with running({QUEUE_ANALYTICS}, threads=1):
        seen.wait("completed", sent.message_id)
    assert ran == ["plain-dramatiq"]
    assert _history(broker, sent.message_id) == ["delayed", "waiting", "active", "completed"]
    assert _started_ms(broker, sent.message_id) >= before_ms + AHEAD_MS
    assert broker.client.llen(broker.keys.queue(f"{QUEUE_ANALYTICS}.DQ")) == 0
