"""Chaos fixtures' view of the outcome: a failed test keeps its var dir (logs, data) to read."""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report on the item (``item.stash``), for fixtures' teardown."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def failed(item: pytest.Item) -> bool:
    """True if the test's setup or call phase failed."""
    reports = item.stash.get(PHASE_REPORTS, {})
    return any(r.failed for r in reports.values())
