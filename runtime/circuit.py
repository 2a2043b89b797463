"""A circuit breaker for calls to services outside the process.

A service that is down makes every caller wait for its timeout; a breaker
notices a run of failures and fails callers fast for a while instead, then
lets one trial call through to see whether the service is back:

- **closed**: calls pass; ``failure_threshold`` consecutive failures open it.
- **open**: calls fail at once with :class:`CircuitOpen` for ``reset_timeout_s``.
- **half-open**: up to ``half_open_max_calls`` trial calls pass; a success
  closes the breaker, a failure opens it again for another ``reset_timeout_s``.
  Callers of :meth:`CircuitBreaker.call` that arrive while the trial is in
  flight wait for its outcome instead of failing: after a success they go
  ahead, after a failure they fail fast. A trial that ends without a verdict
  (cancelled) only frees its slot for the next caller.

Time is a parameter (``clock``), so tests move it instead of sleeping. A
breaker is shared by every caller of one service in one process; it is
thread-safe, but it is process-local on purpose: each process learns about the
service's health from its own calls.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from runtime.errors import CircuitOpen

log = logging.getLogger(__name__)

T = TypeVar("T")

# Five consecutive failures: enough to ignore a blip, few enough to stop
# hammering a service that is really down within one sync interval.
DEFAULT_FAILURE_THRESHOLD = 5
# Long enough for a restarting service to come back, short enough that a
# recovered one is used again within about one sync interval.
DEFAULT_RESET_TIMEOUT_S = 30.0


class BreakerState(enum.Enum):
    """Where the breaker is in its cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSnapshot:
    """An immutable view of a breaker, for metrics and the dashboard."""

    name: str
    state: BreakerState
    consecutive_failures: int
    opened_at: float | None
    times_opened: int


class CircuitBreaker:
    """Counts consecutive failures of one service and fails fast while it is down.

    ``on_change(name, old, new)`` runs on the calling thread with the breaker's
    lock held (keep it short: set a gauge, write a log line; never call back
    into the breaker).
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        reset_timeout_s: float = DEFAULT_RESET_TIMEOUT_S,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.name = name
        self._threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._half_open_max = half_open_max_calls
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at: float | None = None
        self._half_open_in_flight = 0
        self._times_opened = 0
        # Callers waiting for the trial in flight: (their loop, a future to resolve).
        self._trial_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose timeout ran out reads as half-open)."""
        with self._lock:
            self._refresh()
            return self._state

    def snapshot(self) -> BreakerSnapshot:
        """An immutable copy of the breaker's state."""
        with self._lock:
            self._refresh()
            return BreakerSnapshot(self.name, self._state, self._failures, self._opened_at,
                                   self._times_opened)

    def before_call(self) -> None:
        """Admit one call or raise :class:`CircuitOpen`; pair it with a ``record_*`` call."""
        with self._lock:
            self._admit()

    def _admit(self) -> None:
        """:meth:`before_call` with the lock held."""
        self._refresh()
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            left_s = self._opened_at + self._reset_timeout_s - self._clock()
            raise CircuitOpen(
                f"circuit {self.name!r} is open; next trial in {max(left_s, 0):.1f}s",
                retry_after_s=max(left_s, 0.0),
            )
        if self._state is BreakerState.HALF_OPEN:
            if self._half_open_in_flight >= self._half_open_max:
                raise CircuitOpen(f"circuit {self.name!r} is half-open, trial call in flight")
            self._half_open_in_flight += 1

    async def admit(self) -> None:
        """Admit one call, waiting for a half-open trial in flight to decide; or raise CircuitOpen.

        Runs on the caller's loop. While the trial runs, the caller waits for
        its outcome (the trial is bounded by the service's own timeouts, and a
        cancelled caller stops waiting): a success admits it, a failure raises
        :class:`CircuitOpen`, a trial without a verdict lets it try for the slot.
        """
        while True:
            with self._lock:
                try:
                    self._admit()
                    return
                except CircuitOpen:
                    if self._state is not BreakerState.HALF_OPEN:
                        raise
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                entry = (asyncio.get_running_loop(), waiter)
                self._trial_waiters.append(entry)
            try:
                await waiter
            finally:
                with self._lock:
                    if entry in self._trial_waiters:
                        self._trial_waiters.remove(entry)

    def record_success(self) -> None:
        """The admitted call worked: close the breaker."""
        with self._lock:
            self._failures = 0
            if self._state is BreakerState.HALF_OPEN:
                self._half_open_in_flight = max(0, self._half_open_in_flight - 1)
            self._set(BreakerState.CLOSED)
            self._wake_trial_waiters()

    def record_failure(self) -> None:
        """The admitted call failed in a way that says something about the service's health."""
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN:
                self._half_open_in_flight = max(0, self._half_open_in_flight - 1)
                self._open()
            elif self._state is BreakerState.CLOSED and self._failures >= self._threshold:
                self._open()
            self._wake_trial_waiters()

    def record_neutral(self) -> None:
        """The admitted call ended without saying anything about health (e.g. a 4xx we caused).

        The service answered, so a half-open breaker closes.
        """
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._half_open_in_flight = max(0, self._half_open_in_flight - 1)
                self._failures = 0
                self._set(BreakerState.CLOSED)
            self._wake_trial_waiters()

    def release(self) -> None:
        """The admitted call ended with no evidence at all (cancelled): free its trial slot only."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._half_open_in_flight = max(0, self._half_open_in_flight - 1)
            self._wake_trial_waiters()

    async def call(self, fn: Callable[[], Awaitable[T]],
                   is_failure: Callable[[BaseException], bool] = lambda exc: True) -> T:
        """Run ``fn`` through the breaker; ``is_failure`` says which exceptions count against it.

        A call that arrives while a half-open trial is in flight waits for the
        trial's outcome (:meth:`admit`). An exception that is not an
        :class:`Exception` (cancellation, a shutdown) says nothing about the
        service: it only frees the slot.
        """
        await self.admit()
        try:
            result = await fn()
        except Exception as exc:
            if is_failure(exc):
                self.record_failure()
            else:
                self.record_neutral()
            raise
        except BaseException:
            self.release()
            raise
        self.record_success()
        return result

    def _wake_trial_waiters(self) -> None:
        """Tell every caller waiting for the trial that it ended (lock held; any thread)."""
        waiters, self._trial_waiters = self._trial_waiters, []
        for loop, waiter in waiters:
            if not loop.is_closed():  # a closed loop has no one left waiting
                loop.call_soon_threadsafe(_resolve, waiter)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._times_opened += 1
        self._set(BreakerState.OPEN)

    def _refresh(self) -> None:
        if (self._state is BreakerState.OPEN and self._opened_at is not None
                and self._clock() - self._opened_at >= self._reset_timeout_s):
            self._half_open_in_flight = 0
            self._set(BreakerState.HALF_OPEN)

    def _set(self, new: BreakerState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        log.warning("circuit %s: %s -> %s", self.name, old.value, new.value,
                    extra={"circuit": self.name, "from_state": old.value, "to_state": new.value})
        if self._on_change is not None:
            self._on_change(self.name, old, new)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
