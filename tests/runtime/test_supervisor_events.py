"""`shopflow supervisor-events`: a FATAL program pages on-call once per incident."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from runtime.alerts import Alerter
from runtime.settings import DEFAULT_ALERT_RESOLVE_AFTER_S, Settings
from runtime.supervisor_events import AlertingFatalPager, serve
from tests.runtime.metrics_helpers import scrape, value
from tests.runtime.webhook_receiver import Receiver, webhook_receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as r:
        yield r


def _events(*events: tuple[str, str]) -> io.StringIO:
    return io.StringIO("".join(
        f"ver:3.0 server:supervisor serial:{i} pool:supervisor-events poolserial:{i} "
        f"eventname:{name} len:{len(body)}\n{body}" for i, (name, body) in enumerate(events)))


async def test_a_fatal_program_pages_once_per_incident_and_resolves_when_it_runs_again(
    settings: Settings, receiver: Receiver
) -> None:
    """With the default resolve hysteresis: RUNNING closes the incident at once, so a second
    FATAL soon after pages again (a hold would keep the first incident open and swallow it)."""
    settings = replace(settings, alert_webhook_url=receiver.url,
                       alert_resolve_after_s=DEFAULT_ALERT_RESOLVE_AFTER_S)
    fatal = ("PROCESS_STATE_FATAL", ("processname:stock-sync groupname:stock-sync "
                                    "from_state:BACKOFF"))
    running = ("PROCESS_STATE_RUNNING", ("processname:stock-sync groupname:stock-sync "
                                        "from_state:STARTING pid:77"))
    stdin, stdout = _events(fatal, fatal, running, fatal), io.StringIO()
    published: list[tuple[str, dict[str, str]]] = []
    pager = AlertingFatalPager(settings, settings.redis_url or "")
    try:
        await asyncio.to_thread(serve, stdin, stdout,
                                lambda channel, fields: published.append((channel, fields)),
                                pager)
    finally:
        await asyncio.to_thread(pager.close)
    assert stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 4
    assert [f["type"] for _, f in published] == ["process.fatal"] * 3
    bodies = await receiver.wait_for(3)
    assert [(b["status"], b["alerts"][0]["labels"]["alertname"]) for b in bodies] == [
        ("firing", "ProcessFatal"), ("resolved", "ProcessFatal"), ("firing", "ProcessFatal")]
    labels = bodies[0]["alerts"][0]["labels"]
    assert labels["severity"] == "critical" and labels["program"] == "stock-sync"
    assert value(scrape(settings), "shopflow_process_fatal_total", program="stock-sync") == 3


async def test_incidents_are_per_process_and_counted_per_program(
    settings: Settings, receiver: Receiver
) -> None:
    """api runs x4: api-2 starting again says nothing about api-0, which stays FATAL and
    paged once; each process pages and resolves on its own; the metric counts the program."""
    settings = replace(settings, alert_webhook_url=receiver.url,
                       alert_resolve_after_s=DEFAULT_ALERT_RESOLVE_AFTER_S)

    def event(name: str, process: str) -> tuple[str, str]:
        return (name, f"processname:{process} groupname:api from_state:BACKOFF")

    stdin = _events(event("PROCESS_STATE_FATAL", "api-0"), event("PROCESS_STATE_RUNNING", "api-2"),
                    event("PROCESS_STATE_FATAL", "api-1"), event("PROCESS_STATE_FATAL", "api-0"),
                    event("PROCESS_STATE_RUNNING", "api-1"))
    pager = AlertingFatalPager(settings, settings.redis_url or "")
    try:
        await asyncio.to_thread(serve, stdin, io.StringIO(), lambda channel, fields: None, pager)
    finally:
        await asyncio.to_thread(pager.close)
    # serve answers each event after its page, so every notification is in by now.
    bodies = await receiver.wait_for(3)
    assert [(b["status"], b["alerts"][0]["labels"]["process"]) for b in bodies] == [
        ("firing", "api-0"), ("firing", "api-1"), ("resolved", "api-1")]
    assert {b["alerts"][0]["labels"]["program"] for b in bodies} == {"api"}
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        still_open = await Alerter(settings, client).open_incidents()
    finally:
        await client.aclose()
    assert [i["labels"]["process"] for i in still_open.values()] == ["api-0"]
    assert value(scrape(settings), "shopflow_process_fatal_total", program="api") == 3


async def test_a_page_the_webhook_refuses_answers_ok_and_waits_in_redis(
    settings: Settings, receiver: Receiver
) -> None:
    """The event is recorded (OK to supervisord); the page waits for the next delivery round."""
    settings = replace(settings, alert_webhook_url=receiver.url, alert_webhook_attempts=1,
                       alert_webhook_timeout_s=2.0)
    receiver.status = 503
    stdin = _events(("PROCESS_STATE_FATAL", "processname:api groupname:api from_state:BACKOFF"))
    stdout = io.StringIO()
    pager = AlertingFatalPager(settings, settings.redis_url or "")
    try:
        await asyncio.to_thread(serve, stdin, stdout, lambda channel, fields: None, pager)
    finally:
        await asyncio.to_thread(pager.close)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        undelivered = await Alerter(settings, client).undelivered()
    finally:
        await client.aclose()
    assert stdout.getvalue() == "READY\nRESULT 2\nOKREADY\n"
    assert [u["body"]["alerts"][0]["labels"]["program"] for u in undelivered.values()] == ["api"]
