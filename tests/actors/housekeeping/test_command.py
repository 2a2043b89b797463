"""`shopflow schedules`: list (text and JSON), add and remove repeatable jobs."""

from __future__ import annotations

import argparse
import json

import pytest

from actors.housekeeping.command import _schedules, register
from actors.housekeeping.schedules import shop_schedules
from runtime.cli import build_parser
from runtime.errors import Conflict
from runtime.settings import Settings


def args(**kwargs: object) -> argparse.Namespace:
    base: dict[str, object] = {"add": None, "remove": None, "replace": False, "json": False}
    return argparse.Namespace(**{**base, **kwargs})


async def test_list_add_json_remove(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _schedules(args(), settings) == 0
    text = capsys.readouterr().out
    assert "leader: none" in text
    assert "daily-sales-report  [builtin]  cron 0 8 * * * (America/Sao_Paulo)" in text
    assert text.count("next: ") == len(shop_schedules(settings))

    promo = {"name": "promo", "queue": "maintenance", "actor": "send_promo",
             "cron": "30 2 * * *", "timezone": "America/New_York"}
    assert await _schedules(args(add=json.dumps(promo), json=True), settings) == 0
    out = capsys.readouterr().out
    view = json.loads(out[out.index("["):])
    assert [v["name"] for v in view][-1] == "promo"
    promo_view = view[-1]
    assert promo_view["source"] == "repeatable" and promo_view["zone"] == "America/New_York"
    assert len(promo_view["next_runs"]) == 3
    assert all(r["local"].endswith(("-05:00", "-04:00")) and r["utc"].endswith("+00:00")
               for r in promo_view["next_runs"])

    clash = dict(promo, name="cron-heartbeat")
    with pytest.raises(Conflict):
        await _schedules(args(add=json.dumps(clash)), settings)
    assert await _schedules(args(add="{not json"), settings) == 2
    assert await _schedules(args(remove="promo"), settings) == 0
    assert await _schedules(args(remove="promo"), settings) == 1


def test_commands_are_registered_through_the_entry_point() -> None:
    parser = build_parser()
    parsed = parser.parse_args(["scheduler", "--once"])
    assert parsed.once is True
    parsed = parser.parse_args(["schedules", "--json"])
    assert parsed.json is True
    assert callable(register)
