"""Bounded actor mailboxes with an overflow policy, a visible depth and a close hook.

pykka's own inbox is an unbounded ``queue.Queue``: a slow actor would let its
backlog grow until the process runs out of memory, and nobody could see the
backlog. :class:`Mailbox` is a drop-in inbox (pykka's ``ActorInbox`` protocol:
``put``/``get``/``empty``) that

- holds at most ``max_size`` user messages; a sender that finds it full either
  waits up to ``put_timeout_s`` (:attr:`Overflow.BLOCK`) or is refused at once
  (:attr:`Overflow.FAIL_FAST`), and in both cases gets :class:`MailboxFull`,
  a transient job error, so the Dramatiq message that caused it is retried
  with backoff (backpressure reaches the broker instead of memory);
- lets control messages (pykka's stop, proxy attribute reads the supervisor
  uses to confirm a start) through even when full, so a full actor can still
  be stopped;
- is *closed* by its actor when it dies: later senders get ``ActorDeadError``
  at once instead of waiting for a reply that will never come, and the
  close listeners (the supervisor) learn why the actor exited.

It is shared by the actor and every ``ActorRef`` to it (``ref.actor_inbox``),
which is why the exit reason and the depth live here.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
from pykka import messages

from runtime.errors import MailboxFull


class Overflow(enum.Enum):
    """What a sender experiences when the mailbox is full."""

    BLOCK = "block"  # wait up to put_timeout_s for room, then MailboxFull
    FAIL_FAST = "fail"  # MailboxFull at once


@dataclass(frozen=True)
class Exit:
    """Why an actor stopped: ``normal`` (asked to stop), ``crash`` or ``start_failed``."""

    kind: str
    error: BaseException | None = None

    @property
    def abnormal(self) -> bool:
        """True when a transient child should be restarted."""
        return self.kind != "normal"

    def describe(self) -> str:
        """One line for logs and events."""
        if self.error is None:
            return self.kind
        return f"{self.kind}: {type(self.error).__name__}: {self.error}"


NORMAL_EXIT = Exit("normal")
CloseListener = Callable[[Exit], None]


def _is_control(message: Any) -> bool:
    """Messages that must never be refused: stop requests and start probes."""
    return isinstance(message, (messages._ActorStop, messages.ProxyGetAttr))


class Mailbox:
    """A thread-safe bounded FIFO of pykka envelopes (see the module docstring)."""

    def __init__(
        self,
        max_size: int,
        overflow: Overflow = Overflow.BLOCK,
        put_timeout_s: float = 1.0,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.max_size = max_size
        self.overflow = overflow
        self.put_timeout_s = put_timeout_s
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed: Exit | None = None
        self._announced = False
        self._started = False
        self._listeners: list[CloseListener] = []
        self._async_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self.refused = 0  # senders turned away since start, for the tree view

    # --- pykka's ActorInbox protocol -------------------------------------------------

    def put(self, envelope: Any, /) -> None:
        """Add an envelope; raises MailboxFull (policy) or ActorDeadError (closed)."""
        with self._cond:
            self._raise_if_closed()
            if not _is_control(envelope.message):
                self._wait_for_room()
            self._items.append(envelope)
            self._cond.notify_all()
            waiter = self._async_waiter
        if waiter is not None:
            loop, event = waiter
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop closed under an async actor: it is gone
                raise pykka.ActorDeadError("the actor's event loop is closed") from None

    def get(self) -> Any:
        """Take the oldest envelope, waiting for one (the actor's thread)."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def empty(self) -> bool:
        """True when nothing waits."""
        with self._cond:
            return not self._items

    # --- async actors ------------------------------------------------------------------

    async def get_async(self) -> Any:
        """Take the oldest envelope without blocking the event loop (async actors)."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify_all()
                    self._async_waiter = None
                    return item
                event.clear()
                self._async_waiter = (loop, event)
            await event.wait()

    # --- depth and life ----------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Messages waiting right now (the one being handled is not counted)."""
        with self._cond:
            return len(self._items)

    @property
    def exit(self) -> Exit | None:
        """Why the owning actor stopped, or None while it lives."""
        return self._closed

    def mark_started(self) -> None:
        """The actor's on_start finished (its thread/task); wakes :meth:`wait_started`."""
        with self._cond:
            self._started = True
            self._cond.notify_all()

    def wait_started(self, timeout_s: float) -> Exit | bool:
        """True once on_start finished, the Exit if the actor stopped first, False on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._started or self._closed is not None, timeout_s)
            if self._started:
                return True
            return self._closed if self._closed is not None else False

    def close(self, reason: Exit) -> None:
        """Refuse further puts from now on (the actor's thread, as it starts to stop)."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._cond.notify_all()

    def announce_closed(self) -> None:
        """Tell the close listeners why the actor stopped (after pending asks were failed)."""
        with self._cond:
            if self._closed is None or self._announced:
                return
            self._announced = True
            reason, listeners = self._closed, list(self._listeners)
            self._listeners.clear()
        for listener in listeners:
            listener(reason)

    def add_close_listener(self, listener: CloseListener) -> None:
        """Call ``listener(exit)`` once when the actor has stopped (at once if it has)."""
        with self._cond:
            if not self._announced:
                self._listeners.append(listener)
                return
            reason = self._closed
        assert reason is not None
        listener(reason)

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            raise pykka.ActorDeadError(f"actor stopped ({self._closed.describe()})")

    def _wait_for_room(self) -> None:
        """Apply the overflow policy; called with the condition held."""
        if len(self._items) < self.max_size:
            return
        if self.overflow is Overflow.BLOCK:
            deadline = time.monotonic() + self.put_timeout_s
            while len(self._items) >= self.max_size and self._closed is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._raise_if_closed()
            if len(self._items) < self.max_size:
                return
        self.refused += 1
        raise MailboxFull(
            f"mailbox full ({self.max_size} waiting, policy {self.overflow.value}"
            + (f", waited {self.put_timeout_s}s)" if self.overflow is Overflow.BLOCK else ")")
        )
