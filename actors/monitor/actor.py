"""The thin Dramatiq actor around the queue monitor (for a cron schedule to send)."""

from __future__ import annotations

from typing import Any

import dramatiq

from actors.monitor.messages import CHECK_QUEUES
from actors.monitor.service import QueueMonitor
from runtime.broker import declare_actor
from runtime.loop import LoopBridge


def declare_monitor_actor(
    broker: dramatiq.Broker, monitor: QueueMonitor, bridge: LoopBridge
) -> dramatiq.Actor[Any, Any]:
    """Bind :data:`CHECK_QUEUES` on ``broker``: one check on the process's loop, no retries.

    A missed check is not worth retrying: the next one comes within a minute.
    """

    def check_queues() -> None:
        bridge.run(monitor.check())

    return declare_actor(broker, CHECK_QUEUES, check_queues, max_retries=0)
