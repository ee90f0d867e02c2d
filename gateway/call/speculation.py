"""Speculation: routing a call's partial transcripts while the caller is still talking.

The newest partial wins and at most one routing is in flight per call, so when the
turn ends the decision for the final text is usually there already and a cache hit
needs no model work. A failed routing of a partial is only a lost speculation: it is
counted and logged, never raised; the final is routed again.

Cancellation: ``reset`` and ``aclose`` cancel the routing task and wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from intents.embedder import normalize_text
from intents.types import RouteDecision

from .. import logs

log = logging.getLogger("voicegate.call")

# route(text, urgent) -> decision; urgent for a final the caller is waiting on.
RouteFn = Callable[[str, bool], Awaitable[RouteDecision]]
# Told when a routing of a partial failed (the engine counts it).
OnFailure = Callable[[BaseException], None]


class Speculation:
    def __init__(self, router: RouteFn | None, min_words: int, on_failure: OnFailure) -> None:
        self._router = router
        self._min_words = min_words
        self._on_failure = on_failure
        self._latest = ""  # newest partial worth routing
        self._routed: RouteDecision | None = None
        self._task: asyncio.Task[None] | None = None

    def offer(self, text: str) -> None:
        """A partial transcript arrived."""
        # One or two words ("I", "how do") never settle an intent: not worth a routing.
        if self._router is None or len(text.split()) < self._min_words:
            return
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._route_latest(), name="vg-speculate")

    async def _route_latest(self) -> None:
        assert self._router is not None
        # Normalized: another call's identical text may have been routed in its spelling.
        while self._routed is None or \
                normalize_text(self._routed.text) != normalize_text(self._latest):
            text = self._latest
            try:
                self._routed = await self._router(text, False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_failure(exc)
                logs.event(log, "speculative_route_failed", logging.WARNING,
                           error=f"{type(exc).__name__}: {exc}"[:200])
                return

    async def decide(self, text: str) -> tuple[RouteDecision | None, bool]:
        """The decision for the final ``text`` and whether the partials had it already.

        The speculation's decision when it routed this text; otherwise one urgent
        routing, ahead of every call's partials, which takes along this text's
        partial routing if that is still queued or running (never routed twice).
        Raises what the router raises: the engine decides what a failed final means.
        """
        if self._router is None:
            return None, False
        wanted = normalize_text(text)
        routed = self._routed
        speculating = normalize_text(self._latest) == wanted
        await self.reset()
        if routed is not None and normalize_text(routed.text) == wanted:
            return routed, True
        return await self._router(text, True), speculating

    async def reset(self) -> None:
        """Forget this utterance's partials (a new utterance starts, or the turn ended)."""
        self._routed, self._latest = None, ""
        task, self._task = self._task, None
        if task is not None and not task.done():
            # Older partials are not worth routing now; a final's routing is joined by
            # the batcher if it is the same text.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def aclose(self) -> None:
        await self.reset()
