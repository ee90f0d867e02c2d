"""Time for the call engine: one object that tells the time and sleeps.

Everything in a call that depends on time (turn timelines, playout pacing, the
inbound audio rate limit) asks its ``Clock``; production uses the monotonic
``SystemClock``, tests a ``ManualClock`` they advance by hand, so whole calls run
deterministically in milliseconds of real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from typing import AsyncIterator, Awaitable, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class Expired(TimeoutError):
    """A deadline of a clock passed (``deadline``, ``Timeouts``): the timer's own
    ``TimeoutError``, never one the timed work raised, so a caller catches this and lets
    any other through."""


class Deadline:
    """What ``deadline`` yields: whether it expired (its ``Expired``, not another error), and
    when its ``seconds`` began to run (``started_at``, a time of its clock; None while it
    waits for ``after``): what is left of it, for work inside that plans waits of its own."""

    expired = False
    started_at: float | None = None


@contextlib.asynccontextmanager
async def deadline(clock: Clock, seconds: float,
                   after: asyncio.Event | tuple[asyncio.Event, ...] | None = None,
                   ) -> AsyncIterator[Deadline]:
    """``asyncio.timeout(seconds)`` on ``clock``: once ``seconds`` of it have passed the
    block is cancelled and ``Expired`` (a ``TimeoutError``) raised instead, so a test's
    ``ManualClock`` decides when (a stage's stall timeout). A cancel from outside meanwhile (a barge-in)
    stays a cancel. The block must not swallow ``CancelledError``. ``after``: the
    ``seconds`` start only once this event (or the first of these) is set (a wait that
    is no stall)."""
    task = asyncio.current_task()
    assert task is not None, "deadline() needs a task"
    state = Deadline()

    starts = (after,) if isinstance(after, asyncio.Event) else after or ()
    if not starts:
        state.started_at = clock.now()

    async def expire() -> None:
        if starts:
            waits = [asyncio.ensure_future(event.wait()) for event in starts]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            state.started_at = clock.now()
        await clock.sleep(seconds)
        state.expired = True
        task.cancel()

    watchdog = asyncio.create_task(expire(), name="vg-deadline")
    try:
        yield state
    except asyncio.CancelledError:
        if state.expired and task.uncancel() == 0:
            raise Expired(f"no result within {seconds:g} s") from None
        raise
    finally:
        watchdog.cancel()


class Timeouts:
    """``deadline`` for each of a stream's waits (the gap before its next item), on ``clock``,
    kept by one timer task for them all instead of a task per item.

    ``await timeouts.within(seconds, anext(items))`` is that item, or ``Expired`` (a
    ``TimeoutError``; ``expired`` set) once ``seconds`` of the clock pass first; between
    waits nothing is timed (the consumer's own time, a yield to it, never counts). One
    wait at a time, as one task reads a stream. A cancel from outside (a barge-in) stays a
    cancel. The awaitable must not swallow ``CancelledError``. ``close()`` (in a
    ``finally``) stops the timer."""

    def __init__(self, clock: Clock) -> None:
        self.expired = False  # the last wait timed out (its TimeoutError, not another)
        self._clock = clock
        self._due: float | None = None  # the wait under way times out then; None: none
        self._waiter: asyncio.Task[object] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._timer_due: float | None = None  # what the timer sleeps until (None: parked)
        self._moved = asyncio.Event()

    async def within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        return await self.until(self._clock.now() + seconds, awaitable)

    async def until(self, when: float, awaitable: Awaitable[T]) -> T:
        """``within``, to a time of the clock: a wait that times out at ``when`` ends with
        ``clock.now() >= when``."""
        task = asyncio.current_task()
        assert task is not None, "Timeouts needs a task"
        self._waiter, self._due, self.expired = task, when, False
        timer = self._timer
        if timer is None or timer.done() or (self._timer_due is not None
                                             and when < self._timer_due):
            if timer is not None:
                timer.cancel()  # it sleeps until later than this wait may last
            self._timer_due = when
            self._timer = asyncio.create_task(self._expire(), name="vg-timeouts")
        else:
            self._moved.set()  # wakes a parked timer; a sleeping one wakes in time anyway
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired and task.uncancel() == 0:
                raise Expired("no result in time") from None
            raise
        finally:
            self._due = None

    async def _expire(self) -> None:
        while True:
            due = self._due
            if due is None:  # no wait under way: park until one starts
                self._timer_due = None
                self._moved.clear()
                await self._moved.wait()
                continue
            left = due - self._clock.now()
            if left <= 0:
                break
            self._timer_due = due
            await self._clock.sleep(left)
        self._timer_due = None
        self._due = None
        self.expired = True
        assert self._waiter is not None
        self._waiter.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class ManualClock:
    """A clock that moves only when told to (``advance``); sleepers wake in order.

    ``advance`` lets the event loop run everything that became ready between two
    wake-ups, so code that sleeps in steps (paced playout) behaves as in real time.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # At least one step of the float: a sleep below the clock's resolution (what is
        # left of a wait computed as a difference of times) must still end after now, or
        # a loop that sleeps until a deadline never reaches it (IdleWatch.next).
        due = max(self._now + seconds, math.nextafter(self._now, math.inf))
        heapq.heappush(self._sleepers, (due, next(self._seq), future))
        await future

    async def settle(self, rounds: int = 30) -> None:
        """Let every task that can run without time passing run."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers at their due times."""
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            due, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, due)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()

    @property
    def sleeping(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())
