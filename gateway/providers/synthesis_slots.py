"""A cap on a cloud voice's concurrent syntheses, the most urgent served first.

A voice service limits an account's concurrent requests (ElevenLabs: by plan) and refuses
the rest with a 429. A replica's calls easily go past it: each reply synthesizes its
first sentence and fetches up to two more ahead, and an operator's seed renders answers
beside them. Over the limit, the service picks which request it refuses, and the first
sentence a caller is waiting for in silence is as likely refused as a sentence that plays
seconds later. ``SynthesisSlots`` holds a replica below the limit and hands a freed slot
to the most urgent waiter: a reply's first sentence, then later sentences by their place
in their reply, then the seed.

How urgent a synthesis is, is said by whoever starts its task, in the ``URGENCY`` context
variable (a task runs in a copy of its creator's context): lower is sooner, the default
(0, a reply's first sentence, a prompt) the most urgent.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from contextvars import ContextVar
from typing import AsyncIterator

URGENCY: ContextVar[int] = ContextVar("voicegate_synthesis_urgency", default=0)
# A seed's answers: behind every caller's sentence.
SEEDING = 1_000
# A sentence fetched ahead of the one playing: set once its reply waits for its audio
# (the caller would hear silence). Until then, or until it holds a slot, its wait is no
# stall and its first-audio budget does not run. None: the caller waits from the start.
WANTED: ContextVar[asyncio.Event | None] = ContextVar("voicegate_synthesis_wanted",
                                                      default=None)


class SynthesisSlots:
    """At most ``limit`` syntheses at once; a freed slot goes to the waiter of the lowest
    ``URGENCY`` (the earliest among equals). Used from one event loop."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self.busy = 0
        self.waits = 0  # syntheses that found no slot free and waited (Prometheus)
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, granted in self._waiting if not granted.done())

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the block; waits for one (cancellable) when none is free."""
        await self._acquire(URGENCY.get())
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, urgency: int) -> None:
        if self.busy < self.limit and not self.waiting:
            self.busy += 1
            return
        self.waits += 1
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (urgency, next(self._order), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted as it was cancelled: the slot goes on to the next
            else:
                granted.cancel()  # left in the heap, skipped when it comes up
            raise

    def _release(self) -> None:
        """A slot is free: to the most urgent waiter still waiting, else back to the pool
        (``busy`` unchanged when it is handed on)."""
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)
                return
        self.busy -= 1
