"""Supervisable actors: threaded (:class:`SupervisedActor`) and async (:class:`AsyncActor`).

Both are pykka actors with a bounded :class:`~runtime.mailbox.Mailbox` and a
defined notion of *crash*, which pykka does not have:

- an exception escaping ``on_start`` is a **start failure**;
- an exception escaping a handler for a ``tell`` is a **crash** (pykka's own
  rule: nobody is waiting for the answer);
- an exception escaping a handler for an ``ask`` is, by default, a **crash**
  unless it is a :class:`~runtime.errors.ShopflowError` (a domain or job error
  the caller must see: validation, not found, conflict, permanent/transient
  job errors) or an **infrastructure error** (a connection error of asyncpg,
  redis or the OS, as :func:`runtime.jobs.retries.is_infrastructure_error` lists
  them): a server that is away is not the actor's fault and a restart would
  not bring it back, so the asker gets
  :class:`~runtime.errors.InfrastructureUnavailable` (a transient job error,
  the driver's error as ``__cause__``) and the actor lives on; a PostgreSQL
  outage therefore cannot use up a supervisor's restart intensity and end the
  process. On a crash the asker gets :class:`~runtime.errors.ActorCrashed`
  (an ``ActorUnavailable``, hence a transient job error) with the original
  exception as ``__cause__``: the thin Dramatiq actor raises, Dramatiq does
  not acknowledge the message as done and retries it under its attempts and
  backoff, so *a message held by a crashing actor is redelivered*. Override
  :meth:`is_crash` to change the rule for one actor;
- an actor can mark itself failed with :meth:`fail`.

A crashed actor stops at once: every message still in its mailbox is answered
with ``ActorDeadError`` (the supervisor's ``ask`` turns that into
``ActorUnavailable``), the mailbox refuses new messages, and then the
mailbox's close listeners (its supervisor) hear the :class:`Exit` reason.

Plain ``pykka.ThreadingActor`` children also work under a supervisor, with
pykka's semantics (every ask exception goes back to the caller, the actor
lives on) and an unbounded mailbox; the supervisor watches them with a thread
and treats any stop it did not ask for as a crash.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

import pykka
from pykka import ActorRegistry, messages
from pykka._threading import ThreadingFuture

from runtime.errors import ActorCrashed, AskTimeout, InfrastructureUnavailable, ShopflowError
from runtime.jobs.context import WithJob, ask_scope
from runtime.jobs.context import unwrap as unwrap_ask
from runtime.jobs.retries import is_infrastructure_error
from runtime.loop import LoopBridge
from runtime.mailbox import NORMAL_EXIT, Exit, Mailbox, Overflow
from runtime.settings import Settings

log = logging.getLogger(__name__)

# A mailbox bigger than this means the actor is far behind; senders should wait.
DEFAULT_ACTOR_MAILBOX_SIZE = 100
# How long a sender waits for room in a full mailbox under the BLOCK policy.
DEFAULT_MAILBOX_PUT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class MailboxConfig:
    """Size and overflow policy of one actor's mailbox."""

    max_size: int = DEFAULT_ACTOR_MAILBOX_SIZE
    overflow: Overflow = Overflow.BLOCK
    put_timeout_s: float = DEFAULT_MAILBOX_PUT_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: Settings) -> MailboxConfig:
        """The process-wide mailbox settings (SHOPFLOW_MAILBOX_*)."""
        return cls(settings.mailbox_size, Overflow(settings.mailbox_overflow),
                   settings.mailbox_put_timeout_s)

    def build(self) -> Mailbox:
        """A new empty mailbox with this configuration."""
        return Mailbox(self.max_size, self.overflow, self.put_timeout_s)


class _SelfFailed(Exception):
    """Raised by :meth:`SupervisedActor.fail` to end the current handler as a crash."""


class _CrashPolicy:
    """What the two actor kinds share: the crash rule and the exit bookkeeping."""

    # Asks may come in a WithJob envelope (runtime.jobs.context): the actor takes it off and
    # handles the message with the asker's job current, and not at all once the asker has
    # given up waiting (see too_late). Plain pykka actors get messages bare.
    accepts_job_context: ClassVar[bool] = True
    actor_inbox: Any
    actor_ref: Any
    actor_stopped: Any
    _exit: Exit

    def is_crash(self, exc: BaseException, *, asked: bool) -> bool:
        """True when ``exc`` escaping a handler should crash this actor (see module doc)."""
        if isinstance(exc, _SelfFailed):
            return True
        if not asked:
            return True
        return not (isinstance(exc, ShopflowError) or is_infrastructure_error(exc))

    def error_for_asker(self, exc: BaseException) -> BaseException:
        """What the asker gets for a handler error that is not a crash.

        Domain and job errors go back as they are; an infrastructure error is
        translated to :class:`InfrastructureUnavailable` with the driver's
        error as ``__cause__`` (the retry layer reads it), so the thin
        Dramatiq actor retries the job later instead of failing it as broken.
        """
        if isinstance(exc, ShopflowError) or not is_infrastructure_error(exc):
            return exc
        log.warning("actor %s: a server is unavailable (%r); the asker will retry",
                    self.actor_ref, exc)
        error = InfrastructureUnavailable(f"{self.actor_ref}: server unavailable: {exc!r}")
        error.__cause__ = exc
        return error

    def _answer_not_crash(self, reply_to: Any, exc: BaseException) -> None:
        """Hand a non-crash handler error back to the asker; the actor lives on."""
        error = self.error_for_asker(exc)
        reply_to.set_exception(exc_info=(type(error), error, error.__traceback__))

    def fail(self, reason: str) -> None:
        """Mark this actor failed from inside a handler: it crashes and is restarted."""
        raise _SelfFailed(reason)

    def too_late(self, ask: WithJob, reply_to: Any) -> bool:
        """True (and the asker answered with AskTimeout) when ``ask`` waited in the mailbox
        until its asker's deadline (less the answer's margin) had passed.

        Such a message is not run: its asker has given up, or will before any answer,
        and its job is retried; running it anyway would do the work twice (a second
        e-mail, a second model call billed) beside the retry.
        """
        if ask.deadline_s is None or ask.time_left_s():
            return False
        log.warning("actor %s: a message waited in the mailbox past its ask's deadline; "
                    "not run", self.actor_ref)
        if reply_to is not None:
            error = AskTimeout(f"{self.actor_ref}: the message waited in the mailbox past "
                               f"its ask's deadline and was not run")
            reply_to.set_exception(exc_info=(AskTimeout, error, None))
        return True

    def _record_crash(self, kind: str, exc: BaseException, reply_to: Any | None) -> None:
        """Stop after a crash: answer the asker, unregister, set the stopped flag."""
        self._exit = Exit(kind, exc)
        log.error("actor %s %s", self.actor_ref, self._exit.describe(), exc_info=exc)
        if reply_to is not None:
            crashed = ActorCrashed(f"{self.actor_ref} crashed handling the message: {exc!r}")
            crashed.__cause__ = exc
            reply_to.set_exception(exc_info=(ActorCrashed, crashed, None))
        ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()

    @property
    def mailbox(self) -> Mailbox:
        """This actor's bounded mailbox."""
        inbox: Mailbox = self.actor_inbox
        return inbox


class SupervisedActor(_CrashPolicy, pykka.ThreadingActor):
    """A threaded pykka actor with a bounded mailbox and OTP-style crash semantics.

    Hooks run in the actor's own thread, as in pykka. The thread is a daemon
    thread so that a process whose root supervisor escalated can exit even if
    a handler is stuck; graceful stops go through the supervisor.
    """

    use_daemon_thread: ClassVar[bool] = True
    default_mailbox: ClassVar[MailboxConfig] = MailboxConfig()

    def __init__(self, *, mailbox: MailboxConfig | None = None) -> None:
        self._mailbox_config = mailbox or type(self).default_mailbox
        self._exit = NORMAL_EXIT
        super().__init__()

    def _create_actor_inbox(self) -> Mailbox:  # type: ignore[override]
        return self._mailbox_config.build()

    def _actor_loop(self) -> None:
        """The actor's thread: setup, running, and a teardown that always runs.

        pykka runs the three steps in a row, so an exception escaping setup or
        the loop would skip the teardown: the mailbox would stay open (asks wait
        for their timeout) and the supervisor would never hear of the exit (no
        restart). The teardown closes the mailbox and announces the exit however
        the thread ends.
        """
        try:
            self._actor_loop_setup()
            self._actor_loop_running()
        finally:
            self._actor_loop_teardown()

    def _actor_loop_setup(self) -> None:
        try:
            self.on_start()
        except BaseException as exc:  # noqa: BLE001 - reported to the supervisor as a start failure
            self._record_crash("start_failed", exc, None)
        else:
            self.mailbox.mark_started()

    def _actor_loop_running(self) -> None:
        while not self.actor_stopped.is_set():
            envelope = self.actor_inbox.get()
            ask = unwrap_ask(envelope.message)
            if self.too_late(ask, envelope.reply_to):
                continue
            try:
                with ask_scope(ask):
                    response = self._handle_receive(ask.message)
            except Exception as exc:  # noqa: BLE001 - the crash rule decides, nothing is dropped
                asked = envelope.reply_to is not None
                if not self.is_crash(exc, asked=asked):
                    self._answer_not_crash(envelope.reply_to, exc)
                    continue
                self._record_crash("crash", exc, envelope.reply_to)
                self._call_on_failure()
            except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt, ...
                # A crash like any other: logged with its traceback, the asker answered,
                # the exit announced to the supervisor by the teardown. Not re-raised:
                # it would only end this thread (SystemExit cannot end the process from
                # here), which the crash has just done in order.
                self._record_crash("crash", exc, envelope.reply_to)
                self._call_on_failure()
            else:
                if envelope.reply_to is not None:
                    envelope.reply_to.set(response)

    def _call_on_failure(self) -> None:
        try:
            self.on_failure(*sys.exc_info())
        except Exception:
            log.exception("on_failure of %s raised", self.actor_ref)

    def _actor_loop_teardown(self) -> None:
        self.mailbox.close(self._exit)
        super()._actor_loop_teardown()
        self.mailbox.announce_closed()


class AsyncActor(_CrashPolicy, pykka.Actor):
    """An actor whose hooks and handler are ``async def``, run on the process's loop.

    pykka only has thread actors; this one is a task on the :class:`LoopBridge`
    loop instead of a thread, so async concerns (the notifier, HTTP-calling
    agents) share the one loop with asyncpg and aiohttp. ``on_start``,
    ``on_stop``, ``on_failure`` and ``on_receive`` are coroutines running on
    the loop. Threads reach it with the usual ``ref.ask``/``ref.tell``; code
    already on the loop must use :func:`ask_async` (a blocking ask from the
    loop thread would wait for itself).
    """

    default_mailbox: ClassVar[MailboxConfig] = MailboxConfig()

    def __init__(self, bridge: LoopBridge, *, mailbox: MailboxConfig | None = None) -> None:
        self.bridge = bridge
        self._mailbox_config = mailbox or type(self).default_mailbox
        self._exit = NORMAL_EXIT
        self._task: asyncio.Future[None] | None = None
        super().__init__()

    def _create_actor_inbox(self) -> Mailbox:  # type: ignore[override]
        return self._mailbox_config.build()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.bridge.loop)  # type: ignore[assignment]

    async def on_start(self) -> None:  # type: ignore[override]
        """Set up, on the loop, before the first message."""

    async def on_stop(self) -> None:  # type: ignore[override]
        """Clean up, on the loop, after a requested stop."""

    async def on_failure(self, exc: BaseException) -> None:  # type: ignore[override]
        """Clean up, on the loop, after a crash."""

    async def on_receive(self, message: Any) -> Any:
        """Handle one message, on the loop; the return value answers an ask."""
        log.warning("unexpected message to %s: %r", self.actor_ref, message)
        return None

    async def _run(self) -> None:
        try:
            await self.on_start()
        except Exception as exc:  # noqa: BLE001 - reported to the supervisor as a start failure
            self._record_crash("start_failed", exc, None)
        else:
            self.mailbox.mark_started()
        try:
            while not self.actor_stopped.is_set():
                envelope = await self.mailbox.get_async()
                await self._handle_envelope(envelope)
        finally:
            self.mailbox.close(self._exit)
            self._actor_loop_teardown()
            self.mailbox.announce_closed()

    async def _handle_envelope(self, envelope: Any) -> None:
        asked = envelope.reply_to is not None
        ask = unwrap_ask(envelope.message)
        if self.too_late(ask, envelope.reply_to):
            return
        try:
            with ask_scope(ask):
                response = await self._dispatch(ask.message)
        except Exception as exc:  # noqa: BLE001 - the crash rule decides, nothing is dropped
            if asked and not self.is_crash(exc, asked=True):
                self._answer_not_crash(envelope.reply_to, exc)
                return
            self._record_crash("crash", exc, envelope.reply_to)
            await self._safe_on_failure(exc)
        except BaseException as exc:  # cancelled: the loop is going away
            self._record_crash("crash", exc, envelope.reply_to)
            raise
        else:
            if asked:
                envelope.reply_to.set(response)

    async def _dispatch(self, message: Any) -> Any:
        if isinstance(message, messages._ActorStop):
            ActorRegistry.unregister(self.actor_ref)
            self.actor_stopped.set()
            await self.on_stop()
            return None
        if isinstance(message, (messages.ProxyCall, messages.ProxyGetAttr, messages.ProxySetAttr)):
            result = self._handle_receive(message)
            return await result if inspect.isawaitable(result) else result
        return await self.on_receive(message)

    async def _safe_on_failure(self, exc: BaseException) -> None:
        try:
            await self.on_failure(exc)
        except Exception:
            log.exception("on_failure of %s raised", self.actor_ref)


@dataclass(frozen=True)
class _TaskEnded:
    """Message a :class:`TaskActor` sends itself when its task ended on its own."""

    error: BaseException | None


class TaskEnded(Exception):
    """A :class:`TaskActor`'s task returned or was cancelled while nobody asked it to stop."""


# How long a stopping TaskActor waits for its task to end after asking it to.
DEFAULT_TASK_STOP_TIMEOUT_S = 5.0


class TaskActor(AsyncActor):
    """An async actor whose life is one long-running coroutine (a relay, a tailer, a ticker).

    ``body()`` is started as a task on the loop in ``on_start`` and kept by
    the actor. When the task raises, or returns, without the actor having been
    asked to stop, the actor **crashes** with that error (an infrastructure
    error included: the body was supposed to ride outages out itself), so its
    supervisor restarts it by the child's restart type and intensity, with a
    log line, a metric and an event; a fire-and-forget task would just be gone.
    A restart calls ``body()`` again. ``ready()``, if given, is awaited in
    ``on_start`` after the task started, so the supervisor starts the next
    child only once this one is usable (keep it shorter than the child's
    ``start_timeout_s``).

    On a requested stop, ``stop()`` (if given) asks the body to end by itself
    (set the event it waits on, say), and the task gets ``stop_timeout_s``
    to do so before it is cancelled; without ``stop()`` it is cancelled at
    once. Every hook runs on the loop.
    """

    def __init__(self, bridge: LoopBridge, name: str,
                 body: Callable[[], Coroutine[Any, Any, None]], *,
                 ready: Callable[[], Awaitable[None]] | None = None,
                 stop: Callable[[], None] | None = None,
                 stop_timeout_s: float = DEFAULT_TASK_STOP_TIMEOUT_S,
                 mailbox: MailboxConfig | None = None) -> None:
        super().__init__(bridge, mailbox=mailbox)
        self.name = name
        self._body = body
        self._ready = ready
        self._request_stop = stop
        self._stop_timeout_s = stop_timeout_s
        self._body_task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:  # type: ignore[override]
        """Start the body's task (on the loop), then wait until it is ready."""
        self._body_task = asyncio.create_task(self._body(), name=self.name)
        self._body_task.add_done_callback(self._task_done)
        if self._ready is not None:
            await self._ready()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """Done callback (on the loop): an end nobody asked for becomes a crash message."""
        if self.actor_stopped.is_set():
            return  # stopping or crashed already: on_stop / on_failure own the task
        error = TaskEnded(f"{self.name} was cancelled") if task.cancelled() else task.exception()
        try:
            self.actor_ref.tell(_TaskEnded(error))
        except pykka.ActorDeadError:
            pass  # the actor died meanwhile; its supervisor heard of it already

    async def on_receive(self, message: Any) -> Any:
        """Crash on :class:`_TaskEnded`; anything else is answered by :meth:`handle`."""
        if isinstance(message, _TaskEnded):
            raise message.error or TaskEnded(f"{self.name} returned while it should run")
        return await self.handle(message)

    async def handle(self, message: Any) -> Any:
        """Answer a message sent to the running actor (none by default)."""
        log.warning("unexpected message to %s: %r", self.name, message)
        return None

    async def on_stop(self) -> None:  # type: ignore[override]
        """A requested stop: let the body end by itself within the timeout, then cancel it."""
        if self._request_stop is not None:
            self._request_stop()
        await self._end_task(self._stop_timeout_s if self._request_stop is not None else 0.0)

    async def on_failure(self, exc: BaseException) -> None:  # type: ignore[override]
        """After a crash (the body's or another message's): cancel the body if it still runs."""
        await self._end_task(0.0)

    async def _end_task(self, grace_s: float) -> None:
        task = self._body_task
        if task is None:
            return
        if task.done():  # it ended by itself: that end was the crash, reported already
            if not task.cancelled():
                task.exception()
            return
        if grace_s > 0:
            await asyncio.wait({task}, timeout=grace_s)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed while stopping", self.name, exc_info=task.exception())


async def ask_async(ref: pykka.ActorRef[Any], message: Any, timeout_s: float) -> Any:
    """Ask any actor from code running on the event loop without blocking the loop."""
    future = ref.ask(message, block=False)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: future.get(timeout=timeout_s))
