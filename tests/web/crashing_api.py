"""``shopflow web`` whose outbox relay has a bug: every publish raises (``python -m``).

For the test that an api process whose root supervisor gives up exits 70 so
supervisord restarts it. Only this test process is patched; the runtime has
no test hooks.
"""

from __future__ import annotations

import sys

from runtime.cli import main
from runtime.outbox import OutboxRelay


async def _broken_publish(self: OutboxRelay) -> int:
    raise RuntimeError("a bug in the relay (injected by the test)")


if __name__ == "__main__":
    OutboxRelay.publish_batch = _broken_publish  # type: ignore[method-assign]
    sys.exit(main(["web"]))
