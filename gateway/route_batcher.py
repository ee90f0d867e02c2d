"""Routes every call's pending transcripts together, in one embedding batch.

Each call keeps at most one partial's routing in flight (its newest partial wins), so
a batch holds at most one partial per call. Finals are urgent: a caller is waiting in
silence for them, so they go first, a batch never waits for more partials, and a
final whose text is already queued as a partial takes that routing along with it
instead of being routed twice (``RoutingLanes`` gives finals lanes of their own: the
queued routing moves there; one under way is joined, and where that lane embeds its
texts one by one, ``FinalsFirst``, the final's is embedded next, even where the lane
pauses for another final, and answered at once). The same text from several calls is
routed once. Routing has its own threads, so a batch never delays VAD.

Under load partials are shed, never finals: when more partials wait than fit in the
next batch, the newest of them are taken and the older ones fail with ``RoutingShed``
(their calls have newer words by now, and the final is routed anyway).

Batches are sized by time, not count: the batcher learns what one text costs
(a cached embedding ~0.05 ms, a MiniLM forward pass several ms) and fills a batch
to about ``target_batch_ms``, so partials never hold a lane for long. A batch
still takes at least ``min_batch`` texts when that many wait: every forward pass has
a fixed cost (~15 ms for one MiniLM pass on this 2-core machine, against ~3 ms for
each further text), and batches of one would pay it for every text. The dynamic int8
embedders (``onnx-int8-dynamic`` and ``-7bit``, the default on every CPU) run their
texts one by one (intents/onnx_encoder.py): a batch then shares no pass, only the hops
between the loop and the routing thread, and ``route_gather_cold_finals`` buys nothing.

Few loop iterations: under load one iteration of the event loop takes milliseconds, and
a routing's hand-offs on the loop are silence its caller hears. A batch's callers are
answered from the routing thread's completion (``call_soon_threadsafe``), not by a task
awaiting ``run_in_executor``, which took two iterations more. A batch of partials
gathers for one iteration (texts arriving in it share the batch); a final's starts at once
(``gather_finals=False``) and its decision reaches the caller two iterations after it was
asked, where it took five. A cold final too: finals needing a forward pass within one
iteration of each other are rare (at 200 text calls, ~3 a second), and those arriving
while one runs share the next pass anyway, so waiting an iteration for company cost every
one of them an iteration (``route_gather_cold_finals`` brings the wait back).
tests/test_route_batcher.py counts the iterations; docs/operations.md ("Capacity") has the
measurements.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Protocol, Sequence

from intents.embedder import normalize_text
from intents.types import RouteDecision

from .executors import run_in

RouteMany = Callable[[Sequence[str]], list[RouteDecision]]


class EarlyRouteMany(Protocol):
    """A ``RouteMany`` that can answer a text before its batch ends: ``urgent()`` gives the
    indices of the texts a final now waits for (asked while the batch runs), and
    ``answer(i, decision)`` is called, on the routing thread, once ``texts[i]`` is decided
    ahead of the rest. It still returns every text's decision."""

    def __call__(self, texts: Sequence[str], urgent: Callable[[], Collection[int]] = ...,
                 answer: Callable[[int, RouteDecision], None] | None = ...
                 ) -> list[RouteDecision]: ...


class RoutingShed(Exception):
    """A partial's routing dropped because the router is behind (not a failure)."""


ROUTING_LANES = ("warm", "cold", "warm_finals", "cold_finals")
PARTIAL_LANES = ("warm", "cold")


class RoutingLanes:
    """Four lanes, each a batcher on a thread of its own, so that nobody waits behind work
    that is not theirs. A text is *warm* when its vector is cached (routing it is a
    lookup, ~0.1 ms) and *cold* when it needs a forward pass (several ms); a final is
    urgent (a caller waits in silence), a partial is not:

    - ``warm`` and ``cold``: partials, batched up to ``target_batch_ms`` of work;
    - ``warm_finals`` and ``cold_finals``: finals, which never queue behind a batch of
      partials, and a warm final never behind a forward pass.

    Why: at 500 text calls (bench/capacity.py) a final routed at the end of its turn
    waited for the partials' batch under way (up to ``target_batch_ms``). With these
    lanes that wait is gone (p99 2.6 ms), but the hit ``first_audio_ms`` p99 did not
    measurably change (12.2 vs 12.6 ms): what is left is the routing itself, stretched
    by contention for the cores and the GIL.
    """

    def __init__(self, warm: RouteBatcher, cold: RouteBatcher, warm_finals: RouteBatcher,
                 cold_finals: RouteBatcher, is_warm: Callable[[str], bool]) -> None:
        self.warm = warm
        self.cold = cold
        self.warm_finals = warm_finals
        self.cold_finals = cold_finals
        self._is_warm = is_warm

    @classmethod
    def build(cls, route_many: RouteMany, executors: dict[str, Executor],
              is_warm: Callable[[str], bool], target_batch_ms: float = 30.0,
              gather_cold_finals: bool = False,
              embed_one: Callable[[str], object] | None = None) -> "RoutingLanes":
        """The four lanes, each on its executor (``ROUTING_LANES``). Partials always gather
        an iteration; a final starts at once unless ``gather_cold_finals`` (a cold one).
        ``embed_one`` (a text into the embedder's vector cache), given where texts embedded
        together share no forward pass: cold finals go first (``FinalsFirst``)."""
        routes = dict.fromkeys(ROUTING_LANES, route_many)
        gate: FinalsFirst | None = None
        if embed_one is not None:
            gate = FinalsFirst()
            routes["cold"] = gate.partials(route_many, embed_one)
            routes["cold_finals"] = gate.finals(route_many)
        return cls(**{lane: RouteBatcher(
            routes[lane], executors[lane], target_batch_ms=target_batch_ms,
            gather_finals=lane == "cold" or (lane == "cold_finals" and gather_cold_finals),
            answers_early=lane == "cold" and gate is not None,
            on_hurry=gate.hurry if lane == "cold" and gate is not None else None)
            for lane in ROUTING_LANES}, is_warm=is_warm)

    async def route(self, text: str, urgent: bool = False) -> RouteDecision:
        if self._is_warm(text):
            partials, finals = self.warm, self.warm_finals
        else:
            partials, finals = self.cold, self.cold_finals
        if not urgent:
            return await partials.route(text)
        if partials.is_running(text):  # a partial's routing of these words is under way
            return await partials.route(text, True)
        # Queued there as a partial: its waiters come along, routed once, with the final.
        partials.hand_over(text, finals)
        return await finals.route(text, True)

    @property
    def shed(self) -> int:
        return self.warm.shed + self.cold.shed


class FinalsFirst:
    """A cold final's forward pass before the partials': while a final is routed, the
    partials' cold lane waits between its texts (at most ``max_wait_s`` each time).

    Two cores hold the event loop, the recogniser or the load, and both cold lanes; a
    partials' batch (up to ``target_batch_ms`` of forward passes) running beside a final's
    pass takes part of the core the final needs while its caller waits in silence. Only
    where a batch's texts are embedded one by one anyway (the dynamic int8 backend):
    embedding them one at a time first, the cache then holding every vector, splits no
    shared pass.
    """

    def __init__(self, max_wait_s: float = 0.05) -> None:
        self._max_wait_s = max_wait_s
        self._finals = 0  # finals being routed now
        self._changed = threading.Condition()
        self.pauses = 0  # times a partials' batch waited for a final

    def finals(self, route_many: RouteMany) -> RouteMany:
        def route(texts: Sequence[str]) -> list[RouteDecision]:
            with self._final():
                return route_many(texts)
        return route

    def partials(self, route_many: RouteMany, embed_one: Callable[[str], object]
                 ) -> "EarlyRouteMany":
        """The partials' cold lane: texts embedded one by one, waiting between them while
        a final is routed. A final that joined one of these texts (``urgent``) is a caller
        waiting in silence: its text is embedded next, without waiting, and decided and
        ``answer``-ed at once, not at the batch's end (up to ``target_batch_ms`` later)."""
        def route(texts: Sequence[str], urgent: Callable[[], Collection[int]] = frozenset,
                  answer: Callable[[int, RouteDecision], None] | None = None
                  ) -> list[RouteDecision]:
            left = dict.fromkeys(range(len(texts)))  # in order; a final's first
            answered: dict[int, RouteDecision] = {}

            def decide_embedded() -> None:  # a final's text embedded by now is decided now
                if answer is not None:
                    for j in urgent():
                        if j not in left and j not in answered:
                            (answered[j],) = route_many([texts[j]])
                            answer(j, answered[j])

            def hurried() -> bool:  # a final waits for a text not decided yet
                return any(j in left or (answer is not None and j not in answered)
                           for j in urgent())

            while left:
                decide_embedded()  # before another text's embedding
                if not any(j in left for j in urgent()) and self._let_finals_pass(hurried):
                    continue  # a final joined: its text first, then the pause goes on
                waiting = [j for j in urgent() if j in left]
                i = waiting[0] if waiting else next(iter(left))
                del left[i]
                embed_one(texts[i])
            decide_embedded()
            rest = [j for j in range(len(texts)) if j not in answered]
            # Every vector cached by now: no forward pass.
            decided = dict(zip(rest, route_many([texts[j] for j in rest]))) if rest else {}
            decided.update(answered)
            return [decided[j] for j in range(len(texts))]
        return route

    @contextmanager
    def _final(self) -> Iterator[None]:
        with self._changed:
            self._finals += 1
        try:
            yield
        finally:
            with self._changed:
                self._finals -= 1
                if not self._finals:
                    self._changed.notify_all()

    def hurry(self) -> None:
        """A final now waits for a text of the partials' batch under way (its ``urgent()``
        changed): a pause between the batch's texts ends, so that text goes next."""
        with self._changed:
            self._changed.notify_all()

    def _let_finals_pass(self, hurried: Callable[[], bool] = lambda: False) -> bool:
        """Wait while a final is routed, unless (or until: ``hurry``) a final waits for one
        of this batch's texts (``hurried``): then True, the wait not over."""
        with self._changed:
            if self._finals and not hurried():
                self.pauses += 1
                self._changed.wait_for(lambda: not self._finals or hurried(),
                                       timeout=self._max_wait_s)
            return bool(self._finals) and hurried()


class _Slot:
    """One text to route and everyone waiting for its decision."""

    __slots__ = ("text", "futures", "urgent", "decision")

    def __init__(self, text: str, urgent: bool) -> None:
        self.text = text
        self.futures: list[asyncio.Future[RouteDecision]] = []
        self.urgent = urgent
        self.decision: RouteDecision | None = None  # answered before its batch ended

    def live(self) -> bool:
        """Somebody still waits (a call that moved on cancels its future)."""
        self.futures = [f for f in self.futures if not f.cancelled()]
        return bool(self.futures)


class RouteBatcher:
    def __init__(self, route_many: RouteMany, executor: Executor, max_batch: int = 128,
                 target_batch_ms: float = 30.0, min_batch: int = 8,
                 gather_finals: bool = True, answers_early: bool = False,
                 on_hurry: Callable[[], None] | None = None) -> None:
        """``gather_finals``: a final waits one loop iteration for others to share its
        batch, as partials do; worth it only where a batch has a fixed cost to share (a
        forward pass), so the warm lanes start a final's batch at once. ``answers_early``:
        ``route_many`` is an ``EarlyRouteMany``, and a final that joins a running batch
        is answered as soon as its text is decided; ``on_hurry`` is called (on the loop)
        once the batch's ``urgent()`` changed, to wake a routing thread pausing between its
        texts (``FinalsFirst.hurry``)."""
        self._route_many = route_many
        self._answers_early = answers_early
        self._on_hurry = on_hurry
        self._gather_finals = gather_finals
        self._executor = executor
        self._max_batch = max_batch
        self._min_batch = max(1, min(min_batch, max_batch))
        self._target_s = target_batch_ms / 1000.0
        self._per_text_s = 0.0  # running estimate of one text's routing cost
        self._pending: dict[str, _Slot] = {}  # insertion order = arrival order
        self._running: dict[str, _Slot] = {}
        self._positions: dict[str, int] = {}  # the running batch's texts: their place in it
        self._urgent_now: frozenset[int] = frozenset()  # of those, the ones finals wait for
        self._active = False
        self.answered_early = 0
        self.batches = 0
        self.routed = 0
        self.shed = 0

    async def route(self, text: str, urgent: bool = False) -> RouteDecision:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RouteDecision] = loop.create_future()
        key = normalize_text(text)  # what the router sees: case and spacing never matter
        slot = self._running.get(key)
        if slot is not None and slot.decision is not None:
            return slot.decision  # decided already, ahead of its batch
        if slot is None:
            slot = self._pending.get(key)
            if slot is None:
                slot = self._pending[key] = _Slot(text, urgent)
        elif urgent:
            self._hurry(key)
        # A final joining a running routing is urgent there too: a batch that breaks
        # retries its urgent texts first (_run_each).
        slot.urgent = slot.urgent or urgent
        slot.futures.append(future)
        self._wake(slot.urgent)
        return await future

    def _wake(self, urgent: bool = False) -> None:
        """Start a batch unless one is under way (its end starts the next): on the loop's
        next iteration, so that texts arriving in this one share it, or at once for a final
        when finals are not gathered."""
        if not self._active:
            self._active = True
            if urgent and not self._gather_finals:
                self._start_batch()
            else:
                asyncio.get_running_loop().call_soon(self._start_batch)

    def is_running(self, text: str) -> bool:
        """``text`` is in the batch being routed now."""
        return normalize_text(text) in self._running

    def hand_over(self, text: str, to: "RouteBatcher") -> None:
        """Move ``text``'s queued routing, and everyone waiting for it, to ``to``'s queue,
        urgent (a final came for words still queued here as a partial)."""
        slot = self._pending.pop(normalize_text(text), None)
        if slot is not None and slot.live():
            to._adopt(slot)

    def _adopt(self, slot: _Slot) -> None:
        key = normalize_text(slot.text)
        mine = self._running.get(key) or self._pending.get(key)
        if mine is not None and mine.decision is not None:  # decided ahead of its batch
            for future in slot.futures:
                if not future.done():
                    future.set_result(mine.decision)
            return
        if mine is not None:
            mine.futures.extend(slot.futures)
            mine.urgent = True
            if key in self._running:
                self._hurry(key)
            return
        slot.urgent = True
        self._pending[key] = slot
        self._wake(urgent=True)

    def _hurry(self, key: str) -> None:
        """A final waits for ``key``, in the batch under way: where the lane can, it is
        decided next and answered at once (read by the routing thread: a new frozenset)."""
        if self._answers_early:
            self._urgent_now = self._urgent_now | {self._positions[key]}
            if self._on_hurry is not None:  # after the change: the thread's check sees it
                self._on_hurry()

    def _answer_early(self, slot: _Slot, decision: RouteDecision) -> None:
        """On the loop: a running batch's text decided ahead of the rest."""
        slot.decision = decision
        self.answered_early += 1
        for future in slot.futures:
            if not future.done():
                future.set_result(decision)

    def batch_limit(self) -> int:
        """How many texts fit in ``target_batch_ms`` at the cost measured so far."""
        if self._per_text_s <= 0.0:
            return self._max_batch
        return max(self._min_batch, min(self._max_batch, int(self._target_s / self._per_text_s)))

    def _take(self) -> list[_Slot]:
        """Finals first (beyond the limit they wait for the next batch, never dropped),
        then the newest partials that fit; every older partial is shed."""
        limit = self.batch_limit()
        batch: list[_Slot] = []
        partials: list[_Slot] = []
        for key, slot in list(self._pending.items()):
            if not slot.urgent:
                del self._pending[key]
                if slot.live():  # one nobody waits for any more takes no live one's room
                    partials.append(slot)
            elif len(batch) < limit:
                del self._pending[key]
                if slot.live():
                    batch.append(slot)
        room = limit - len(batch)
        cut = max(0, len(partials) - room)
        for slot in partials[:cut]:
            self._shed(slot)
        batch.extend(partials[cut:])
        return batch

    def _shed(self, slot: _Slot) -> None:
        if not slot.live():
            return
        self.shed += 1
        for future in slot.futures:
            if not future.done():
                future.set_exception(RoutingShed(slot.text))

    def _start_batch(self) -> None:
        batch = self._take()
        if not batch:
            self._active = False
            return
        self._running = {normalize_text(slot.text): slot for slot in batch}
        self._positions = {key: i for i, key in enumerate(self._running)}
        self._urgent_now = frozenset(i for i, slot in enumerate(batch) if slot.urgent)
        # Handed to the thread here and answered from its completion, not through a task
        # awaiting run_in_executor: under load every event-loop iteration takes
        # milliseconds, and that path cost a routing two more of them (the task's first
        # step, and its resumption after the executor future's result).
        loop = asyncio.get_running_loop()

        def answer(i: int, decision: RouteDecision) -> None:  # on the routing thread
            try:
                loop.call_soon_threadsafe(self._answer_early, batch[i], decision)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                pass

        try:
            work = self._executor.submit(self._timed_route_many, [s.text for s in batch],
                                         answer if self._answers_early else None)
        except RuntimeError as exc:  # the executor is shut down: nobody hangs
            self._finish(batch, exc)
            return

        def done(work: Future) -> None:  # on the routing thread
            try:
                loop.call_soon_threadsafe(self._finish, batch, work)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                pass

        work.add_done_callback(done)

    def _timed_route_many(self, texts: list[str],
                          answer: Callable[[int, RouteDecision], None] | None = None
                          ) -> tuple[list[RouteDecision], float]:
        started = time.perf_counter()
        if answer is None:
            decisions = self._route_many(texts)
        else:
            decisions = self._route_many(texts, urgent=lambda: self._urgent_now,
                                         answer=answer)  # type: ignore[call-arg]
        return decisions, time.perf_counter() - started

    def _finish(self, batch: list[_Slot], work: "Future | BaseException") -> None:
        """On the loop: answer the batch's callers, then start the next batch."""
        if isinstance(work, BaseException):
            failure: BaseException | None = work
        elif work.cancelled():  # the executor shut down before its thread took the batch
            failure = RuntimeError("the routing executor shut down")
        else:
            failure = work.exception()
        if failure is not None:
            # One text may have broken the batch: route each alone, so only the calls
            # waiting for a text that fails learn of it.
            retry = asyncio.ensure_future(self._run_each(batch))
            retry.add_done_callback(lambda _t: self._start_batch())
            return
        decisions, seconds = work.result()
        per_text = seconds / len(batch)
        self._per_text_s = per_text if self._per_text_s <= 0.0 else (
            0.7 * self._per_text_s + 0.3 * per_text)
        self._running, self._positions, self._urgent_now = {}, {}, frozenset()
        self.batches += 1
        self.routed += len(batch)
        for slot, decision in zip(batch, decisions):
            for future in slot.futures:
                if not future.done():
                    future.set_result(decision)
        self._start_batch()

    async def _run_each(self, batch: list[_Slot]) -> None:
        # Finals first (one may have joined a partial's routing): a caller waiting in
        # silence never waits behind other texts' retries.
        for slot in sorted(batch, key=lambda s: not s.urgent):
            try:
                # One answered early (a final joined it) was decided: its callers have it.
                if slot.decision is None and slot.live():
                    await self._route_alone(slot)
            finally:
                # Done with: the same words asked from now on are a routing of their own
                # (joined to this slot, which nobody resolves any more, they would hang).
                self._running.pop(normalize_text(slot.text), None)

    async def _route_alone(self, slot: _Slot) -> None:
        try:
            (decision,) = await self._in_executor([slot.text])
        except Exception as exc:  # these callers learn of it; none hangs
            for future in slot.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future in slot.futures:
            if not future.done():
                future.set_result(decision)

    async def _in_executor(self, texts: list[str]) -> list[RouteDecision]:
        """``route_many(texts)`` on the lane's thread; its shutdown is an error the callers
        learn of (``executors.run_in``), never a wait for good."""
        return await run_in(self._executor, "routing", self._route_many, texts)
