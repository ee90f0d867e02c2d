"""Caller silence once the bot has finished: first a prompt, then a goodbye.

``IdleWatch`` is told what happens on the line (``caller_active``, ``bot_started``,
``bot_finished``; ``recheck`` when ``busy`` ended with nothing said) and asks the call
whether anything is going on right now (``busy``: a reply, a filler or tool call inside it,
the caller speaking or their voice just begun, keys being collected). ``next`` returns
``"prompt"`` after ``idle_s`` of quiet since the bot finished, and ``"goodbye"`` after a
second period in which the caller stayed silent; anything the caller does starts the
count afresh.

Time is the call's ``Clock``. Cancellation: ``next`` cancels its own waits (one clock
sleep, one event wait); it owns nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Literal

from ..clock import Clock

IdleStep = Literal["prompt", "goodbye"]


class IdleWatch:
    def __init__(self, clock: Clock, idle_s: float, busy: Callable[[], bool]) -> None:
        self._clock = clock
        self.idle_s = idle_s
        self._busy = busy
        # Since when the bot has finished and nothing happened; None: not quiet.
        self._since: float | None = None
        self._prompted = False
        self._changed = asyncio.Event()

    def caller_active(self) -> None:
        """The caller spoke, typed or pressed a key: no prompt, and a fresh count."""
        self._since = None
        self._prompted = False
        self._changed.set()

    def bot_started(self) -> None:
        self._since = None
        self._changed.set()

    def bot_finished(self) -> None:
        """The bot's latest reply is over: the silence counts from now."""
        self._since = self._clock.now()
        self._changed.set()

    def recheck(self) -> None:
        """``busy`` ended with nothing said (voice that was no speech): look again. A count
        running goes on from where it was; one a key or a typed partial stopped meanwhile
        (``quiet_unless_busy`` found the line busy) starts from now."""
        if self._since is None:
            self.quiet_unless_busy()
        self._changed.set()

    def quiet_unless_busy(self) -> None:
        """Something ended without a reply (keys that led nowhere, a typed partial or an
        empty message): quiet from now. ``caller_active`` stopped the count, and only a
        reply's end would start it again."""
        if self._since is None and not self._busy():
            self.bot_finished()

    def idle_for(self) -> float | None:
        """Seconds of quiet, or None while the line is not idle."""
        if self._since is None or self._busy():
            return None
        return self._clock.now() - self._since

    async def next(self) -> IdleStep:
        """Wait for the next idle period: the prompt first, then the goodbye."""
        while True:
            idle = self.idle_for()
            if idle is not None and idle >= self.idle_s:
                break
            self._changed.clear()
            waits = [asyncio.ensure_future(self._changed.wait())]
            if idle is not None:
                waits.append(asyncio.ensure_future(self._clock.sleep(self.idle_s - idle)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        # The next period counts from this step: its reply (``bot_started``) stops the
        # count at once; a step lost to a bug (the loop started again) does not make the
        # next one due at once (the goodbye right after a prompt never said).
        self._since = self._clock.now()
        if self._prompted:
            return "goodbye"
        self._prompted = True
        return "prompt"
