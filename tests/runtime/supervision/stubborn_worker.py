"""``shopflow worker --kind inventory`` whose stock reserver ignores a stop (``python -m``).

For the test that a worker's graceful stop keeps to its budget: every
reservation takes a database connection, says so with a marker file in the
var dir, and then never finishes, shrugging off cancellation too. Only this
test process is patched; the runtime has no test hooks.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import actors.inventory.actor as inventory_actor
from runtime.cli import main

MARKER = "stubborn-job-running"


async def _stubborn_reserve(conn: Any, order_id: int, ttl_s: float) -> Any:
    await conn.fetchval("SELECT 1")  # holds its pooled connection from here on
    (Path(os.environ["SHOPFLOW_VAR_DIR"]) / MARKER).write_text(str(order_id))
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue  # a job that ignores the stop, the worst case for a graceful stop


if __name__ == "__main__":
    inventory_actor.reserve_for_order = _stubborn_reserve  # type: ignore[attr-defined]
    sys.exit(main(["worker", "--kind", "inventory"]))
