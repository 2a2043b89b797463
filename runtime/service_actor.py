"""A pykka actor that serves one concern's messages.

The concern's logic stays a plain async function; this actor only gives it a
mailbox and a thread, and runs the coroutine on the process's event loop via
the bridge. ``ask`` hands the function's exception back to the caller (the
thin Dramatiq actor), which lets Dramatiq's retries decide what happens next.

An outage (PostgreSQL or Redis restarting, an outside service down) is not
a crash of this actor: it holds no state the outage could have broken, so it
answers the asker with the original error, which Dramatiq retries under the
outage budget (``SHOPFLOW_JOB_INFRA_RETRIES``), and lives on. Restarting it
instead would only count restarts: a PostgreSQL restart fails every job in
flight at once, which exceeds the supervisor's intensity and takes the whole
worker process down with its other jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from runtime.actor import MailboxConfig, SupervisedActor
from runtime.broker import is_infrastructure_error
from runtime.loop import LoopBridge

Handler = Callable[[Any], Coroutine[Any, Any, Any]]


class ServiceActor(SupervisedActor):
    """Runs ``handler(message)`` for each message; runs in its own thread.

    A bounded mailbox; an unexpected (non-ShopflowError) exception crashes it:
    the asker gets ActorCrashed (retried by Dramatiq) and the supervisor restarts it.
    An outage error during an ask goes back to the asker as it is (see module doc).
    """

    def __init__(self, name: str, handler: Handler, bridge: LoopBridge, timeout_s: float,
                 mailbox: MailboxConfig | None = None) -> None:
        super().__init__(mailbox=mailbox)
        self.name = name
        self._handler = handler
        self._bridge = bridge
        self._timeout_s = timeout_s

    def is_crash(self, exc: BaseException, *, asked: bool) -> bool:
        """Not for an outage during an ask (called in the actor's thread)."""
        if asked and is_infrastructure_error(exc):
            return False
        return super().is_crash(exc, asked=asked)

    def on_receive(self, message: Any) -> Any:
        """Called in the actor's thread; blocks it until the coroutine finishes."""
        return self._bridge.run(self._handler(message), self._timeout_s)
