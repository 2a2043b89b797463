"""``shopflow worker --kind inventory`` whose stock reserver has a bug (``python -m``).

For the test that a worker process whose root supervisor gives up exits 70
(so supervisord restarts it): every reservation raises a plain RuntimeError,
which crashes the reserver actor. Only this test process is patched; the
runtime has no test hooks.
"""

from __future__ import annotations

import sys
from typing import Any

import actors.inventory.actor as inventory_actor
from runtime.cli import main


async def _broken_reserve(conn: Any, order_id: int, ttl_s: float) -> Any:
    raise RuntimeError(f"a bug in the reserver (injected by the test), order {order_id}")


if __name__ == "__main__":
    inventory_actor.reserve_for_order = _broken_reserve  # type: ignore[assignment]
    sys.exit(main(["worker", "--kind", "inventory"]))
