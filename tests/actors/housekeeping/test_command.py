"""`shopflow schedules`: list (text and JSON), add and remove repeatable jobs."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import pytest

from actors.housekeeping.command import _schedules, register, render_schedules
from actors.housekeeping.schedules import shop_schedules
from runtime.broker import QUEUE_ANALYTICS, JobSpec
from runtime.cli import build_parser
from runtime.errors import Conflict, NotFound, ValidationError
from runtime.scheduling import CronTrigger, Schedule
from runtime.scheduling.store import LeaseInfo, ScheduleState
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
    with pytest.raises(ValidationError, match="--add needs a JSON object"):
        await _schedules(args(add="{not json"), settings)
    assert await _schedules(args(remove="promo"), settings) == 0
    with pytest.raises(NotFound, match="no repeatable job named 'promo'"):
        await _schedules(args(remove="promo"), settings)


def test_commands_are_registered_through_the_entry_point() -> None:
    parser = build_parser()
    parsed = parser.parse_args(["scheduler", "--once"])
    assert parsed.once is True
    parsed = parser.parse_args(["schedules", "--json"])
    assert parsed.json is True
    assert callable(register)


def test_the_listing_dates_utc_times_too() -> None:
    """22:30 in São Paulo is 01:30 UTC the next day: the UTC time carries its own date."""
    schedule = Schedule("late-report", CronTrigger.parse("30 22 * * *", "America/Sao_Paulo"),
                        JobSpec(QUEUE_ANALYTICS, "report"))
    empty = ScheduleState(None, None, None, None, None, None, None, None, None, False, 0, {})
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    text = render_schedules([schedule], {"late-report": empty},
                            LeaseInfo(None, None, None, 0), now, "America/Sao_Paulo")
    assert "2026-03-10 22:30:00-0300 (2026-03-11 01:30:00Z)" in text
