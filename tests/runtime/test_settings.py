"""Settings survive the trip to a child process: ``from_env(s.to_env()) == s``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from runtime.settings import _ENV_NAMES, Settings

# Fields whose values are checked against a list, a zone or a cron grammar.
_VALID: dict[str, Any] = {
    "timezone": "Europe/Lisbon",
    "log_level": "DEBUG",
    "llm_on_limit": "fallback",
    "mailbox_overflow": "fail",
    "sales_report_cron": "5 7 * * 1",
    "daily_report_cron": "15 9 * * *",
    "moderation_min_confidence": 0.55,
    "monitor_backlog_thresholds": (("emails", 500.0), ("inventory", 2000.5)),
    "monitor_oldest_age_thresholds_s": (("emails", 120.25),),
    "monitor_failure_rate_thresholds": (("support", 0.5),),
    "monitor_no_consumer_graces_s": (("analytics", 600.0), ("emails", 15.5)),
    "queue_max_lengths": (("emails", 10000.0),),
    "queue_full_policy": "fail",
    "token_secret": "a-secret-of-at-least-16-chars",
}


def _not_default(field: dataclasses.Field[Any], tmp_path: Path) -> Any:
    """A valid value different from the field's default."""
    if field.name in _VALID:
        return _VALID[field.name]
    default = getattr(Settings(), field.name)
    if field.type in ("Path", "Path | None"):
        return (tmp_path / field.name).resolve()
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, float):
        return default + 0.375
    return f"x-{field.name}"  # str and str | None


def test_every_setting_round_trips_through_the_environment(tmp_path: Path) -> None:
    """A setting changed in code reaches child processes (they read ``to_env``)."""
    values = {f.name: _not_default(f, tmp_path) for f in dataclasses.fields(Settings)}
    changed = Settings(**values)
    for name, value in values.items():
        assert getattr(Settings(), name) != value, f"{name}: test value equals the default"
    assert Settings.from_env(changed.to_env()) == changed
    assert set(_ENV_NAMES) == {f.name for f in dataclasses.fields(Settings)}


def test_defaults_round_trip_and_none_stays_unset() -> None:
    """Unset optional settings are left out, so the child reads None, not an empty string."""
    defaults = Settings()
    env = defaults.to_env()
    assert Settings.from_env(env) == defaults
    assert "SENDGRID_API_KEY" not in env and "PROMETHEUS_MULTIPROC_DIR" not in env
