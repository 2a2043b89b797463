"""Job settings that only make sense together are checked together, when they are read."""

from __future__ import annotations

import pytest

from runtime.errors import ConfigError
from runtime.settings import Settings


def test_a_sweep_interval_not_well_within_the_heartbeat_timeout_is_refused() -> None:
    """The keeper beats once per sweep interval: half the timeout or more, and a live
    worker running a slow job could look dead, its job run twice."""
    env = {**Settings().to_env(), "SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS": "30000"}
    with pytest.raises(ConfigError, match="SHOPFLOW_JOB_SWEEP_INTERVAL_S .* less than half"):
        Settings.from_env({**env, "SHOPFLOW_JOB_SWEEP_INTERVAL_S": "15"})
    with pytest.raises(ConfigError, match="SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS"):
        Settings.from_env({**env, "SHOPFLOW_JOB_SWEEP_INTERVAL_S": "40"})
    accepted = Settings.from_env({**env, "SHOPFLOW_JOB_SWEEP_INTERVAL_S": "14.5"})
    assert accepted.job_sweep_interval_s == 14.5
