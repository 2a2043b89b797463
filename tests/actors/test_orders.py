"""Order state machine and order services against real PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from actors.orders import service, state
from runtime.errors import InvalidTransition, ValidationError
from tests.factories import make_order, make_shop


def test_every_status_is_reachable_only_along_declared_moves() -> None:
    assert state.allowed_from(state.PAID) == {state.RESERVED}
    state.check(state.PENDING, state.RESERVED)
    with pytest.raises(InvalidTransition):
        state.check(state.PENDING, state.READY_TO_SHIP)
    with pytest.raises(InvalidTransition):
        state.check(state.FAILED, state.RESERVED)


@pytest.mark.parametrize("body, field", [
    ({}, "customer_id"),
    ({"customer_id": "1", "items": [{"product_id": 1, "quantity": 1}]}, "customer_id"),
    ({"customer_id": 1}, "items"),
    ({"customer_id": 1, "items": []}, "items"),
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": -2}]}, "items[0].quantity"),
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": 0}]}, "items[0].quantity"),
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": 1.5}]}, "items[0].quantity"),
    ({"customer_id": 1, "items": [{"product_id": True, "quantity": 1}]}, "items[0].product_id"),
    ({"customer_id": 1, "items": [{"product_id": 1}]}, "items[0]"),
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}] * 2}, "items[1].product_id"),
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "external_ref": ""}, "external_ref"),
    # One unknown field is named (a typo); several are listed in the message, with no field.
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "externalref": "x"}, "externalref"),
    ({"customer_id": 1, "items": [{"product_id": 1, "quantity": 1}], "a": 1, "b": 2}, None),
])
def test_bad_order_requests_name_the_field(body: dict[str, object], field: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        service.parse_new_order(body)
    assert info.value.field == field


async def test_transition_writes_history_and_outbox_in_one_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        order_id = await make_order(conn, 1, {1: 2})
        async with conn.transaction():
            await service.transition(conn, order_id, state.RESERVED)
        with pytest.raises(InvalidTransition):
            async with conn.transaction():
                await service.transition(conn, order_id, state.READY_TO_SHIP)
        order = await service.get_order(conn, order_id)
        assert order["status"] == state.RESERVED
        assert [h["to_status"] for h in order["history"]] == [state.PENDING, state.RESERVED]
        events = await conn.fetch("SELECT payload FROM outbox WHERE event_type = 'order.status_changed' ORDER BY id")
        assert [e["payload"]["to_status"] for e in events] == [state.PENDING, state.RESERVED]


async def test_same_external_ref_returns_the_existing_order(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        req = service.parse_new_order({"customer_id": 1, "external_ref": "cdnow:1",
                                       "items": [{"product_id": 1, "quantity": 1}]})
        first, created = await service.create_order(conn, req, {"queue": "inventory", "actor": "reserve_stock"})
        again, created_again = await service.create_order(conn, req, {"queue": "inventory", "actor": "reserve_stock"})
        assert (created, created_again) == (True, False)
        assert first == again
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1


async def test_unknown_product_changes_nothing(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await make_shop(conn, {1: 5})
        with pytest.raises(ValidationError, match="unknown product"):
            await make_order(conn, 1, {1: 1, 999: 1})
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
