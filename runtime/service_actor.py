"""A pykka actor that serves one concern's messages.

The concern's logic stays a plain async function; this actor only gives it a
mailbox and a thread, and runs the coroutine on the process's event loop via
the bridge. ``ask`` hands the function's exception back to the caller (the
thin Dramatiq actor), which lets Dramatiq's retries decide what happens next.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import pykka

from runtime.actor import MailboxConfig, SupervisedActor
from runtime.loop import LoopBridge

if TYPE_CHECKING:
    from runtime.process import ProcessContext

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


def start_service_actor(ctx: ProcessContext, name: str, handler: Handler,
                        timeout_s: float | None = None) -> pykka.ActorRef[ServiceActor]:
    """Start a :class:`ServiceActor` the way every worker process does.

    The actor runs on the process's loop, answers within ``timeout_s``
    (default ``SHOPFLOW_ACTOR_ASK_TIMEOUT_S``) and gets the mailbox the
    settings ask for (``SHOPFLOW_MAILBOX_*``), not the class default, so an
    operator's bound and overflow policy reach every production actor.
    """
    return ServiceActor.start(name, handler, ctx.bridge,
                              timeout_s if timeout_s is not None else ctx.settings.actor_ask_timeout_s,
                              mailbox=MailboxConfig.from_settings(ctx.settings))
