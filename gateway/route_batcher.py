"""Routes every call's pending transcripts together, in one embedding batch.

Each call keeps at most one routing in flight (its newest partial wins), so the
batch holds at most one text per call. Finals are urgent: a caller is waiting in
silence for them, so they go first and a batch never waits for more partials.
Routing has its own thread, so a batch never delays VAD.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Sequence

from intents.types import RouteDecision

RouteMany = Callable[[Sequence[str]], list[RouteDecision]]
_Request = tuple[str, "asyncio.Future[RouteDecision]"]


class RouteBatcher:
    def __init__(self, route_many: RouteMany, executor: Executor, max_batch: int = 128) -> None:
        self._route_many = route_many
        self._executor = executor
        self._max_batch = max_batch
        self._urgent: list[_Request] = []
        self._partials: list[_Request] = []
        self._running = False
        self.batches = 0
        self.routed = 0

    async def route(self, text: str, urgent: bool = False) -> RouteDecision:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RouteDecision] = loop.create_future()
        (self._urgent if urgent else self._partials).append((text, future))
        if not self._running:
            self._running = True
            loop.call_soon(self._start_batch)
        return await future

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        for queue in (self._urgent, self._partials):
            while queue and len(batch) < self._max_batch:
                text, future = queue.pop(0)
                if not future.cancelled():  # the call moved on (newer text, hang-up)
                    batch.append((text, future))
        return batch

    def _start_batch(self) -> None:
        batch = self._take()
        if not batch:
            self._running = False
            return
        task = asyncio.ensure_future(self._run(batch))
        task.add_done_callback(lambda _t: self._start_batch())

    async def _run(self, batch: list[_Request]) -> None:
        texts = [text for text, _ in batch]
        try:
            decisions = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._route_many, texts)
        except Exception as exc:  # every waiting call learns of it; none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        self.routed += len(batch)
        for (_, future), decision in zip(batch, decisions):
            if not future.done():
                future.set_result(decision)
