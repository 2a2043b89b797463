"""Actors that serve one concern's messages.

The concern's logic stays a plain async function. :class:`ServiceActor` gives
it a mailbox and a thread, and runs the coroutine on the process's event loop
via the bridge (its thread waits meanwhile). :class:`AsyncServiceActor` is the
same contract as an :class:`~runtime.actor.AsyncActor`: a task on the loop and
no thread of its own, for concerns that mostly wait on the network (the LLM
agents). Either way ``ask`` hands the function's exception back to the caller
(the thin Dramatiq actor), which lets Dramatiq's retries decide what happens
next.

The handler runs with the asker's job current (:mod:`runtime.jobs.context`):
``current_job()`` in it reports progress and sees a cancel request from any
process, and the handler is cut off at the job's time limit, at its asker's
deadline (less a margin for the answer) and at the actor's own ``timeout_s``,
whichever comes first; a message whose asker gave up while it waited in the
mailbox is not run at all (:mod:`runtime.actor`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import pykka

from runtime.actor import AsyncActor, MailboxConfig, SupervisedActor
from runtime.jobs.context import ask_time_left_s, current_job
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
        """Called in the actor's thread; blocks it until the coroutine finishes.

        The coroutine sees this thread's current job: the loop's task takes a copy
        of the context it was submitted from.
        """
        return self._bridge.run(self._handler(message), budget_s(self._timeout_s))


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


class AsyncServiceActor(AsyncActor):
    """Runs ``handler(message)`` for each message as a task on the process's loop.

    The crash rules, mailbox and supervision are those of :class:`ServiceActor`
    (both share :mod:`runtime.actor`'s crash policy); the difference is that no
    thread is parked while the handler waits on a remote service. Threads ask it
    as usual; a handler slower than ``timeout_s`` fails the ask with TimeoutError.
    """

    def __init__(self, name: str, handler: Handler, bridge: LoopBridge, timeout_s: float,
                 mailbox: MailboxConfig | None = None) -> None:
        super().__init__(bridge, mailbox=mailbox)
        self.name = name
        self._handler = handler
        self._timeout_s = timeout_s

    async def on_receive(self, message: Any) -> Any:
        """Called on the loop; the next message waits until this one is answered."""
        async with asyncio.timeout(budget_s(self._timeout_s)):
            return await self._handler(message)


def budget_s(timeout_s: float) -> float:
    """How long a handler may run: ``timeout_s`` from when the actor takes the message, or
    less if the current job's time limit or its asker's deadline comes first (after
    either, nobody waits for the answer any more).

    The asker's deadline counts from when it asked, and the message may have waited in
    the mailbox behind others since (several worker threads feed one actor): without it
    a handler started late would still run after its ask gave up, while the job is
    retried beside it.
    """
    limits = [timeout_s]
    job = current_job()
    job_left_s = job.time_left_s() if job is not None else None
    if job_left_s is not None:
        limits.append(job_left_s)
    ask_left_s = ask_time_left_s()
    if ask_left_s is not None:
        limits.append(ask_left_s)
    return min(limits)


def start_async_service_actor(ctx: ProcessContext, name: str, handler: Handler,
                              timeout_s: float | None = None) -> pykka.ActorRef[AsyncServiceActor]:
    """Start an :class:`AsyncServiceActor` on the process's loop, as :func:`start_service_actor`
    starts a thread one (same timeout default, mailbox from ``SHOPFLOW_MAILBOX_*``)."""
    return AsyncServiceActor.start(name, handler, ctx.bridge,
                                   timeout_s if timeout_s is not None else ctx.settings.actor_ask_timeout_s,
                                   mailbox=MailboxConfig.from_settings(ctx.settings))
