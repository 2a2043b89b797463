"""Print the README's per-concern settings tables from the rows in docs/*.md.

Every setting read in runtime/settings.py must appear in README.md
(tests/test_docs.py checks it). Each concern documents its settings as table
rows ``| NAME | default | meaning |`` in its docs page; this gathers them:

    python ops/tools/settings_table.py > /tmp/rows.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\|\s*`?([A-Z][A-Z0-9_]+)`?\s*\|\s*([^|]*)\|\s*([^|]*)\|\s*$")


def rows(page: Path) -> list[tuple[str, str, str]]:
    """The settings rows of one docs page, in order, without duplicates."""
    seen: dict[str, tuple[str, str, str]] = {}
    for line in page.read_text().splitlines():
        match = ROW.match(line)
        if match and ("_" in match.group(1)) and match.group(1) not in seen:
            name, default, meaning = (g.strip() for g in match.groups())
            seen[name] = (name, default or "unset", meaning)
    return list(seen.values())


def default_cell(default: str) -> str:
    """A default as a README cell: a value is shown as code; prose that marks up its own
    code (``generated into `<var>/secrets/token_secret```) is kept as it is written."""
    value = default[1:-1] if default.startswith("`") and default.endswith("`") \
        and default.count("`") == 2 else default
    return value if "`" in value else f"`{value}`"


def main() -> int:
    for page in sorted((ROOT / "docs").glob("*.md")):
        found = rows(page)
        if not found:
            continue
        print(f"\n**{page.stem}** ([docs/{page.name}](docs/{page.name}))\n")
        print("| variable | default | meaning |\n| --- | --- | --- |")
        for name, default, meaning in found:
            print(f"| `{name}` | {default_cell(default)} | {meaning} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
