"""The README tells the truth about settings and commands."""

from __future__ import annotations

import re
from pathlib import Path

from runtime.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _settings_read() -> set[str]:
    source = (ROOT / "runtime" / "settings.py").read_text()
    return set(re.findall(r'e(?:\.get)?\(?[^"\n]*"([A-Z][A-Z0-9_]+)"', source)) - {"e"}


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in _settings_read() if f"`{name}`" not in readme)
    assert not missing, f"settings missing from README.md: {missing} (ops/tools/settings_table.py)"


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = sorted(name for name in sub.choices if f"shopflow {name}" not in readme)  # type: ignore[attr-defined]
    assert not missing, f"commands missing from README.md: {missing}"
