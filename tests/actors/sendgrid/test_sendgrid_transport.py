"""The SendGrid transport on the official SDK against a local v3 server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import asyncpg
import pytest

from actors.emailer.sendgrid_transport import (
    SendGridConfig,
    SendGridTransport,
    build_mail,
    make_sendgrid_transport,
)
from actors.emailer.transports import OutgoingEmail
from ops.simulators.faults import serve
from runtime.errors import (
    ExternalServiceError,
    OutcomeUnknown,
    PermanentJobError,
    TransientJobError,
)
from runtime.settings import Settings
from tests.actors.sendgrid.fake_sendgrid import (
    API_KEY,
    FakeSendGrid,
    create_fake_sendgrid,
    validate_mail,
)

TEMPLATE_ID = "d-0c1f2a7e5b8d4e1aa3f4c5d6e7f8a9b0"
# What the ``fake`` fixture gives: the server's base URL and its state.
Fake = tuple[str, FakeSendGrid]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, FakeSendGrid]]:
    app, state = create_fake_sendgrid()
    async with serve(app) as url:
        yield url, state


def _config(url: str, **changes: object) -> SendGridConfig:
    base = SendGridConfig(api_key=API_KEY, from_email="ShopFlow <loja@shopflow.example>", host=url,
                          timeout_s=0.5, reconcile_grace_s=600.0,
                          templates={"order_confirmation": TEMPLATE_ID})
    return replace(base, **changes)  # type: ignore[arg-type]


def _email(key: str = "order-confirmation:42", template: str | None = "order_confirmation") -> OutgoingEmail:
    return OutgoingEmail(idempotency_key=key, to="ana@example.com.br", subject="Pedido 42 confirmado",
                         text="Obrigado!", html="<p>Obrigado!</p>", template=template,
                         template_data={"order_id": 42, "total": "R$ 99,90"})


async def _ledger(pool: asyncpg.Pool, key: str) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM email_provider_sends WHERE idempotency_key = $1", key)


async def test_template_send_matches_the_v3_contract(pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    transport = SendGridTransport(_config(url), pool)

    result = await transport.send(_email())

    [request] = state.requests
    headers, body = request["headers"], request["body"]
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("sendgrid/")
    assert body == {
        "from": {"name": "ShopFlow", "email": "loja@shopflow.example"},
        "personalizations": [{
            "to": [{"email": "ana@example.com.br"}],
            "dynamic_template_data": {"subject": "Pedido 42 confirmado", "order_id": 42,
                                      "total": "R$ 99,90"},
        }],
        "template_id": TEMPLATE_ID,
        "custom_args": {"idempotency_key": "order-confirmation:42"},
    }
    assert result.provider_id == state.accepted[0].msg_id
    row = await _ledger(pool, "order-confirmation:42")
    assert row["state"] == "accepted" and row["attempts"] == 1

    again = await transport.send(_email())  # a retried job: answered from the ledger
    assert again == result and len(state.requests) == 1


async def test_without_a_template_id_the_content_is_sent(pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    await SendGridTransport(_config(url), pool).send(_email("reminder:1", template="cart_reminder"))
    body = state.requests[0]["body"]
    assert "template_id" not in body and body["subject"] == "Pedido 42 confirmado"
    assert body["content"] == [{"type": "text/plain", "value": "Obrigado!"},
                               {"type": "text/html", "value": "<p>Obrigado!</p>"}]
    assert validate_mail(body) == []


@pytest.mark.parametrize("status", [400, 401])
async def test_permanent_errors_are_not_retried(
        pool: asyncpg.Pool, fake: Fake, status: int) -> None:
    url, state = fake
    state.script = [status]
    with pytest.raises(PermanentJobError):
        await SendGridTransport(_config(url), pool).send(_email())
    assert (await _ledger(pool, "order-confirmation:42"))["state"] == "rejected"
    assert state.accepted == []


async def test_wrong_key_is_a_permanent_401(pool: asyncpg.Pool, fake: Fake) -> None:
    url, _ = fake
    with pytest.raises(PermanentJobError, match="401"):
        await SendGridTransport(_config(url, api_key="SG.wrong"), pool).send(_email())


async def test_429_is_transient_with_retry_after_then_one_email(
        pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    state.script = [(429, 7), 503]
    transport = SendGridTransport(_config(url), pool)
    with pytest.raises(ExternalServiceError) as info:
        await transport.send(_email())
    assert isinstance(info.value, TransientJobError) and info.value.retry_after_s == 7
    with pytest.raises(TransientJobError):
        await transport.send(_email())
    await transport.send(_email())
    assert len(state.accepted) == 1 and len(state.requests) == 3
    assert (await _ledger(pool, "order-confirmation:42"))["attempts"] == 3


@pytest.mark.slow
async def test_timeout_after_acceptance_still_sends_one_email(
        pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    state.script = ["accept_hang"]
    transport = SendGridTransport(_config(url), pool)

    with pytest.raises(OutcomeUnknown):
        await transport.send(_email())
    assert (await _ledger(pool, "order-confirmation:42"))["state"] == "sending"

    result = await transport.send(_email())  # the job's retry reconciles instead of re-sending

    assert len(state.accepted) == 1 and len(state.requests) == 1
    assert result.provider_id == f"{state.accepted[0].msg_id}.filter0001"
    assert (await _ledger(pool, "order-confirmation:42"))["state"] == "accepted"


@pytest.mark.slow
async def test_unknown_outcome_waits_for_the_grace_period_then_resends(
        pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    state.script = ["hang"]
    with pytest.raises(OutcomeUnknown):
        await SendGridTransport(_config(url), pool).send(_email())
    with pytest.raises(OutcomeUnknown, match="does not show it yet"):
        await SendGridTransport(_config(url), pool).send(_email())
    assert len(state.requests) == 1

    await SendGridTransport(_config(url, reconcile_grace_s=0.001), pool).send(_email())
    assert len(state.accepted) == 1 and len(state.requests) == 2


@pytest.mark.slow
async def test_without_the_activity_api_an_unknown_outcome_is_never_resent(
        pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    state.script = ["accept_hang"]
    state.activity_status = 403
    transport = SendGridTransport(_config(url, reconcile_grace_s=0.001), pool)
    with pytest.raises(OutcomeUnknown):
        await transport.send(_email())
    with pytest.raises(PermanentJobError, match="check by hand"):
        await transport.send(_email())
    assert len(state.accepted) == 1 and len(state.requests) == 1


def test_config_from_settings_maps_template_ids() -> None:
    assert SendGridConfig.from_settings(Settings()) is None
    config = SendGridConfig.from_settings(Settings(
        sendgrid_api_key="SG.x", sendgrid_template_cart_reminder="d-abc"))
    assert config is not None and config.templates == {"cart_reminder": "d-abc"}
    body = build_mail(_email(template="cart_reminder"), config)
    assert body["template_id"] == "d-abc"


async def test_factory_uses_the_outbox_when_no_key_is_set(pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    assert make_sendgrid_transport(Settings(), pool) is None
    transport = make_sendgrid_transport(
        Settings(sendgrid_api_key=API_KEY, sendgrid_host=url), pool)
    assert transport is not None and transport.name == "sendgrid"
    await transport.send(_email("k-factory", template=None))
    assert state.requests[0]["body"]["from"] == {"name": "ShopFlow",
                                                 "email": "pedidos@shopflow.example"}


@pytest.mark.slow
async def test_stale_unknown_outcomes_are_settled_by_the_sweep(
        pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    transport = SendGridTransport(_config(url), pool)
    state.script = ["accept_hang", "hang"]
    for key in ("accepted-then-timeout", "never-arrived"):
        with pytest.raises(OutcomeUnknown):
            await transport.send(_email(key))
    await pool.execute("UPDATE email_provider_sends SET last_sent_at = now() - interval '1 hour'")

    assert await transport.reconcile_stale() == {"accepted": 1, "not_sent": 1, "unresolved": 0}

    await transport.send(_email("accepted-then-timeout"))  # answered from the ledger
    await transport.send(_email("never-arrived"))  # safe to send now
    assert sorted(a.body["custom_args"]["idempotency_key"] for a in state.accepted) == [
        "accepted-then-timeout", "never-arrived"]


@pytest.mark.slow
async def test_the_sweep_stops_at_the_first_failed_lookup(pool: asyncpg.Pool, fake: Fake) -> None:
    url, state = fake
    transport = SendGridTransport(_config(url), pool)
    state.script = ["hang", "hang", "hang"]
    for key in ("a", "b", "c"):
        with pytest.raises(OutcomeUnknown):
            await transport.send(_email(key))
    await pool.execute("UPDATE email_provider_sends SET last_sent_at = now() - interval '1 hour'")
    state.activity_status = 500  # the activity feed is down

    assert await transport.reconcile_stale() == {"accepted": 0, "not_sent": 0, "unresolved": 3}
    assert state.activity_lookups == 1, "the other rows do not each wait out a timeout"
    assert {r["state"] for r in await pool.fetch("SELECT state FROM email_provider_sends")} == {
        "sending"}


def _valid_body() -> dict[str, object]:
    return build_mail(_email("strict:1", template=None), _config("http://unused"))


def test_the_fake_refuses_unknown_top_level_fields() -> None:
    body = {**_valid_body(), "to": [{"email": "ana@example.com.br"}], "priority": "high"}
    assert [field for _, field in validate_mail(body)] == ["priority", "to"]


def test_the_fake_wants_text_plain_before_text_html() -> None:
    body = _valid_body()
    assert validate_mail(body) == []
    body["content"] = [{"type": "text/html", "value": "<p>Oi</p>"}, {"type": "text/plain", "value": "Oi"}]
    assert [field for _, field in validate_mail(body)] == ["content"]
    body["content"] = [{"type": "text/html", "value": "<p>Oi</p>"}]  # html alone is fine
    assert validate_mail(body) == []


async def test_the_fake_checks_the_key_before_the_body(fake: Fake) -> None:
    url, state = fake
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v3/mail/send", data="not json",
                                headers={"Authorization": "Bearer SG.wrong",
                                         "Content-Type": "text/plain"}) as wrong_key:
            assert wrong_key.status == 401
        async with session.post(f"{url}/v3/mail/send", json={"subject": "no recipients"},
                                headers={"Authorization": f"Bearer {API_KEY}"}) as bad_body:
            assert bad_body.status == 400
            fields = {e["field"] for e in (await bad_body.json())["errors"]}
            assert {"from", "personalizations", "content"} <= fields
    assert state.accepted == [] and len(state.requests) == 2
