"""A pykka actor that serves one concern's messages.

The concern's logic stays a plain async function; this actor only gives it a
mailbox and a thread, and runs the coroutine on the process's event loop via
the bridge. ``ask`` hands the function's exception back to the caller (the
thin Dramatiq actor), which lets Dramatiq's retries decide what happens next.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from runtime.actor import MailboxConfig, SupervisedActor
from runtime.loop import LoopBridge

Handler = Callable[[Any], Coroutine[Any, Any, Any]]


class ServiceActor(SupervisedActor):
    """Runs ``handler(message)`` for each message; runs in its own thread.

    A bounded mailbox; an unexpected exception crashes it: the asker gets
    ActorCrashed (retried by Dramatiq) and the supervisor restarts it. Domain
    and job errors (ShopflowError) go back to the asker as they are, and a
    connection error of PostgreSQL, Redis or the OS goes back as
    InfrastructureUnavailable: neither is a crash, so an outage does not
    restart the actor (see :mod:`runtime.actor`).
    """

    def __init__(self, name: str, handler: Handler, bridge: LoopBridge, timeout_s: float,
                 mailbox: MailboxConfig | None = None) -> None:
        super().__init__(mailbox=mailbox)
        self.name = name
        self._handler = handler
        self._bridge = bridge
        self._timeout_s = timeout_s

    def on_receive(self, message: Any) -> Any:
        """Called in the actor's thread; blocks it until the coroutine finishes."""
        return self._bridge.run(self._handler(message), self._timeout_s)
