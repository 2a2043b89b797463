"""Escalation out of the root supervisor ends the process with code 70; SIGTERM stops cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def program(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.supervision.program", mode],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("mode", ["crashloop", "crashloop-hook"])
def test_escalation_out_of_the_root_exits_the_process_with_70(mode: str) -> None:
    proc = program(mode)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 70, err
    assert out.splitlines()[:2] == ["start a", "start b"]
    assert out.splitlines()[-1] == "stop a"
    assert "root supervisor" in err and "gave up" in err


def test_sigterm_stops_the_children_in_reverse_and_exits_0() -> None:
    proc = program("serve")
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(4)]
    assert lines == ["start a", "start b", "start c", "ready"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["stop", "c", "stop", "b", "stop", "a"]
