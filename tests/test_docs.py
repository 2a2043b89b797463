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


def _table_cells(text: str) -> list[str]:
    """Every cell of every Markdown table row (``| a | b |``); ``\\|`` does not split."""
    cells: list[str] = []
    for line in text.splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells += [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
    return cells


def test_no_readme_table_cell_has_an_unclosed_code_span() -> None:
    """A cell with an odd number of backticks renders as broken code (it once did, for the
    generated default of SHOPFLOW_TOKEN_SECRET)."""
    readme = (ROOT / "README.md").read_text()
    broken = [cell for cell in _table_cells(readme) if cell.count("`") % 2]
    assert not broken, f"README table cells with an unclosed code span: {broken}"


def test_the_settings_table_keeps_a_prose_default_as_written() -> None:
    from ops.tools.settings_table import default_cell

    assert default_cell("30.0") == "`30.0`"
    assert default_cell("`block`") == "`block`"
    assert default_cell("generated into `<var>/x`") == "generated into `<var>/x`"
