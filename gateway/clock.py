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
from typing import AsyncIterator, Protocol


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


class Deadline:
    """What ``deadline`` yields: whether it expired (its ``TimeoutError``, not another)."""

    expired = False


@contextlib.asynccontextmanager
async def deadline(clock: Clock, seconds: float) -> AsyncIterator[Deadline]:
    """``asyncio.timeout(seconds)`` on ``clock``: once ``seconds`` of it have passed the
    block is cancelled and ``TimeoutError`` raised instead, so a test's ``ManualClock``
    decides when (a stage's stall timeout). A cancel from outside meanwhile (a barge-in)
    stays a cancel. The block must not swallow ``CancelledError``."""
    task = asyncio.current_task()
    assert task is not None, "deadline() needs a task"
    state = Deadline()

    async def expire() -> None:
        await clock.sleep(seconds)
        state.expired = True
        task.cancel()

    watchdog = asyncio.create_task(expire(), name="vg-deadline")
    try:
        yield state
    except asyncio.CancelledError:
        if state.expired and task.uncancel() == 0:
            raise TimeoutError(f"no result within {seconds:g} s") from None
        raise
    finally:
        watchdog.cancel()


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
