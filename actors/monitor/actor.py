"""The queue monitor as a supervised actor of the flow worker, plus its thin Dramatiq actor.

:func:`concern` gives the worker process (``runtime.worker.Concern``) a pykka
actor that checks every queue each ``monitor_interval_s`` (a ticker thread
tells it to), and binds :data:`CHECK_QUEUES` so a cron schedule or an operator
can ask for a check now.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
import pykka
from dramatiq.brokers.redis import RedisBroker
from redis.exceptions import RedisError

from actors.monitor.messages import CHECK_QUEUES
from actors.monitor.service import CheckReport, QueueMonitor
from runtime.actor import MailboxConfig, SupervisedActor
from runtime.alerts import Alerter
from runtime.broker import ALL_QUEUES, QUEUE_MAINTENANCE, declare_actor
from runtime.errors import MailboxFull
from runtime.loop import LoopBridge
from runtime.metrics import get_metrics
from runtime.process import ProcessContext
from runtime.supervision import ChildSpec
from runtime.worker import Asker, Concern

log = logging.getLogger(__name__)

CHILD_ID = "queue-monitor"
#: The message the ticker and the Dramatiq actor send the monitor actor.
CHECK = "check"


class QueueMonitorActor(SupervisedActor):
    """Runs checks in its own thread (each on the process loop); a ticker thread paces it.

    A :class:`~runtime.actor.SupervisedActor`, so its mailbox is bounded like
    every other actor's (``SHOPFLOW_MAILBOX_*``): a ticker that finds it full
    skips that tick instead of piling up checks.
    """

    def __init__(self, monitor: QueueMonitor, bridge: LoopBridge, interval_s: float,
                 timeout_s: float, mailbox: MailboxConfig | None = None) -> None:
        super().__init__(mailbox=mailbox)
        self._monitor = monitor
        self._bridge = bridge
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None

    def on_start(self) -> None:
        """Actor thread: check once now, then every interval."""
        self._ticker = threading.Thread(target=self._tick, name="queue-monitor-ticker",
                                        daemon=True)
        self._ticker.start()
        self.actor_ref.tell(CHECK)

    def _tick(self) -> None:
        """Ticker thread: tell the actor to check every interval until it stops."""
        while not self._stopping.wait(self._interval_s):
            try:
                self.actor_ref.tell(CHECK)
            except pykka.ActorDeadError:
                return
            except MailboxFull:
                log.warning("queue monitor is behind (mailbox full); skipping this tick")

    def on_receive(self, message: Any) -> CheckReport | None:
        """Actor thread: one check. A Redis failure is logged; the next tick tries again."""
        if message != CHECK:
            raise ValueError(f"queue monitor got an unknown message {message!r}")
        try:
            return self._bridge.run(self._monitor.check(), self._timeout_s)
        except RedisError:
            log.exception("queue check failed on Redis; retrying at the next tick")
            return None

    def on_stop(self) -> None:
        """Actor thread: stop the ticker."""
        self._stop_ticker()

    def on_failure(self, *exc_info: Any) -> None:
        """Actor thread, after a crash: stop the ticker so the restarted actor owns the only one."""
        self._stop_ticker()

    def _stop_ticker(self) -> None:
        self._stopping.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=5)


def concern(ctx: ProcessContext) -> Concern:
    """The queue monitor for a worker process (DESIGN: the flow worker)."""
    settings = ctx.settings
    metrics = get_metrics(settings)
    monitor = QueueMonitor(settings, ctx.redis, Alerter(settings, ctx.redis, metrics), metrics,
                           ALL_QUEUES)

    def start() -> pykka.ActorRef[QueueMonitorActor]:
        return QueueMonitorActor.start(monitor, ctx.bridge, settings.monitor_interval_s,
                                       settings.actor_ask_timeout_s,
                                       MailboxConfig.from_settings(settings))

    def declare(broker: RedisBroker, ask: Asker) -> None:
        def monitor_check_queues() -> None:
            """Thin Dramatiq actor: check every queue now."""
            ask(CHILD_ID, CHECK)

        declare_actor(broker, CHECK_QUEUES, monitor_check_queues, max_retries=0)

    return Concern("monitor", [ChildSpec(CHILD_ID, start)], declare, (QUEUE_MAINTENANCE,))


def declare_monitor_actor(
    broker: dramatiq.Broker, monitor: QueueMonitor, bridge: LoopBridge
) -> dramatiq.Actor[Any, Any]:
    """Bind :data:`CHECK_QUEUES` straight to ``monitor`` (a process without the actor tree).

    No retries: a missed check is not worth one; the next comes within a minute.
    """

    def monitor_check_queues() -> None:
        bridge.run(monitor.check())

    return declare_actor(broker, CHECK_QUEUES, monitor_check_queues, max_retries=0)
