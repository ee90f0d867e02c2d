"""Python's cyclic garbage collector, kept off the calls' critical path.

A collection stops the whole process (it holds the GIL) while it walks every object of
the generations it collects: every call's next reply frame and every caller waiting on
a routing wait with it. Measured with ``bench/capacity.py --mode text`` at 500 calls on
a 2-core machine: young collections take ~0.07 ms (p99 ~1.3 ms), but Python's own full
collections, about every 8 s at that load (the calls' objects promoted into the old
generation trigger them), take 45-130 ms, and were most of the hit ``first_audio_ms``
p99. With the collector off altogether the p99 fell from 17 to 6 ms.

So, once start-up has built what lives as long as the process:

- that is frozen (``gc.freeze``): no collection walks the models and tokenizers again;
- Python's own full collections are off; one runs every ``full_interval_s`` instead
  (``gc_full_interval_s``, default 600 s), and cyclic garbage that reached the old
  generation waits at most that long. A full collection's pause grows with the live
  objects, not with the garbage: run every 60 s through 250 s of 500 calls, they took
  12-100 ms and freed 0-69 objects each;
- the young generations collect as before: their pauses are short and they free most
  cyclic garbage (a call's tasks and frames die young or by reference counting);
- every collection's pause is observed (``voicegate_gc_pause_seconds`` by generation),
  so an operator sees what the collector costs the loop.

``full_interval_s = 0`` leaves Python's own schedule (and still observes the pauses).
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import time
from typing import Any, Callable, Iterator

from prometheus_client.core import HistogramMetricFamily

from . import logs
from .clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("voicegate.collector")

# gc's third threshold counts young-generation collections between two full ones: a
# count no replica reaches in its lifetime turns Python's own full collections off.
_NEVER = 1 << 30
OLDEST = 2

ObservePause = Callable[[int, float], None]  # (generation, seconds)


class PauseHistogram:
    """Collection pauses by generation, as a Prometheus histogram
    (``voicegate_gc_pause_seconds``, registered in the process's registry).

    Counted in plain lists, without a lock: ``observe`` runs inside a collection, which
    may have interrupted any code, including a metric update holding its own lock."""

    BUCKETS_S = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

    def __init__(self) -> None:
        generations = OLDEST + 1
        self._counts = [[0] * (len(self.BUCKETS_S) + 1) for _ in range(generations)]
        self._sums = [0.0] * generations

    def observe(self, generation: int, seconds: float) -> None:
        self._counts[generation][bisect.bisect_left(self.BUCKETS_S, seconds)] += 1
        self._sums[generation] += seconds

    def count(self, generation: int) -> int:
        return sum(self._counts[generation])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "voicegate_gc_pause_seconds",
            "Pauses of Python's garbage collector by generation: the whole process, event "
            "loop included, stands still meanwhile (gateway/collector.py)",
            labels=["generation"])
        for generation, counts in enumerate(self._counts):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, self.BUCKETS_S), "+Inf"), counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family


class _ProcessCollector:
    """The process's one collector state, shared by every policy in the process (tests
    run several gateways in one): the thresholds are taken over while any policy runs
    and given back, as they were, when the last one closes; each observer hears each
    pause once, whichever policies registered it."""

    def __init__(self) -> None:
        self.observers: dict[ObservePause, int] = {}  # observer -> policies holding it
        self.takeovers = 0
        self.saved_thresholds: tuple[int, int, int] | None = None
        self._started_at: float | None = None  # perf_counter of the collection under way

    def take_over(self) -> None:
        if self.takeovers == 0:
            self.saved_thresholds = gc.get_threshold()
            young, middle, _ = self.saved_thresholds
            gc.set_threshold(young, middle, _NEVER)
        self.takeovers += 1

    def give_back(self) -> None:
        self.takeovers -= 1
        if self.takeovers == 0 and self.saved_thresholds is not None:
            gc.set_threshold(*self.saved_thresholds)
            self.saved_thresholds = None

    def add_observer(self, observe: ObservePause) -> None:
        if not self.observers:
            gc.callbacks.append(self._on_collection)
        self.observers[observe] = self.observers.get(observe, 0) + 1

    def remove_observer(self, observe: ObservePause) -> None:
        held = self.observers.pop(observe, 0) - 1
        if held > 0:
            self.observers[observe] = held
        if not self.observers and self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Called by gc itself, on whichever thread allocated (collections never overlap):
        # cheap, and never raises.
        if phase == "start":
            self._started_at = time.perf_counter()
        elif self._started_at is not None:
            paused = time.perf_counter() - self._started_at
            self._started_at = None
            generation = int(info["generation"])
            for observe in self.observers:
                observe(generation, paused)


_PROCESS = _ProcessCollector()


class CollectorPolicy:
    def __init__(self, full_interval_s: float, observe: ObservePause | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.full_interval_s = full_interval_s
        self._observe = observe
        self._clock = clock
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self.full_collections = 0  # run by this policy

    @property
    def scheduled(self) -> bool:
        """Full collections run on this policy's timer, not Python's."""
        return self.full_interval_s > 0

    def start(self) -> None:
        """Freeze what exists now (call it once start-up is done), take over the full
        collections and observe every pause. On the running event loop; once."""
        if self._started:
            return
        self._started = True
        gc.collect()
        gc.freeze()
        if self._observe is not None:
            _PROCESS.add_observer(self._observe)
        if self.scheduled:
            _PROCESS.take_over()
            self._task = asyncio.create_task(self._collect_on_schedule(), name="vg-gc")

    async def _collect_on_schedule(self) -> None:
        while True:
            await self._clock.sleep(self.full_interval_s)
            self.collect_full()

    def collect_full(self) -> int:
        """One full collection now; what it freed (objects)."""
        began = time.perf_counter()
        freed = gc.collect(OLDEST)
        self.full_collections += 1
        logs.event(log, "gc_full_collection", freed=freed,
                   pause_ms=round((time.perf_counter() - began) * 1000.0, 1))
        return freed

    async def aclose(self) -> None:
        """Give the collector back to Python (tests start many gateways in one process)."""
        if not self._started:
            return
        self._started = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            _PROCESS.give_back()
        if self._observe is not None:
            _PROCESS.remove_observer(self._observe)
