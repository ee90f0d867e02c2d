"""New calls refused while this replica cannot keep up with the calls it has.

Past what its cores carry, a replica's event loop falls behind every call at once:
reply frames leave late, and once a call's unread audio passes ``inbound_buffer_ms`` its
oldest audio is dropped, so words are lost, turns never answered and callers hung up as
idle (``bench/capacity.py --mode audio``, 500 calls on one 2-core replica: hits 4.8 s
late at the median and 14 calls hung up). Another call then only makes every call worse.
``max_calls`` cannot tell: a speaking caller costs several times a typing one.

So the replica watches how late its event loop wakes a timer (``LoopLag``), and while
that lateness stays high (``OverloadGate``: the median of the last seconds at or over
``overload_loop_lag_ms``) it refuses new calls at the upgrade with HTTP 503
``overloaded``, before any byte of the call, which a balancer retries on another
replica (deploy/haproxy.cfg). It takes them again once the median is under half the
threshold. The calls it has go on; nothing else changes.

A single stall (a long garbage collection, a blocking call) is one late sample among
several and never trips the gate: the median needs most of the window late, and the
window always holds at least ``MIN_SAMPLES`` wake-ups.

Lateness comes last, though: a timer waits only for the iteration under way, while each
call's frames wait behind every call's work. At 500 speaking callers arriving over 40 s
the median lateness stayed under 200 ms while a quarter of the frames left late (stop 68).
So the gate also weighs how busy the loop's own thread is: the CPU time it used over the
window's wall time (``overload_loop_busy``, a share of one core). A loop busy nearly all
the time has no slack left for the next call; it closes the gate as the lateness does,
and reopens it once the share is ``BUSY_REOPEN_BELOW`` under the threshold (half the
threshold, when that is less). A starved loop, its core taken by other processes, uses
little CPU while it falls behind: the lateness still sees that.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from typing import Callable

from . import logs
from .clock import Clock

log = logging.getLogger("voicegate.overload")

# How often the loop is asked to wake (its lateness is one sample), and how far back
# the samples are weighed.
TICK_S = 0.1
WINDOW_S = 2.0
MIN_SAMPLES = 5
# The busy share must fall this far under its threshold before calls are taken again
# (half the threshold when that is less: a share cannot fall to 0 or below).
BUSY_REOPEN_BELOW = 0.1


class OverloadGate:
    """Whether the loop's recent lateness says "take no new call".

    ``observe(lag_s, now, cpu_s)`` takes one wake-up's lateness and the loop thread's CPU
    clock then; ``overloaded`` is set once, over the samples of the last ``window_s`` (and
    at least the last ``min_samples``), the median lateness reaches ``threshold_s`` or the
    loop's busy share (CPU seconds over wall seconds) reaches ``busy_threshold``; it is
    cleared once the lateness is under half its threshold and the share
    ``BUSY_REOPEN_BELOW`` under its own (or half its own, when that is less). A threshold
    of 0 turns its signal off."""

    def __init__(self, threshold_s: float, window_s: float = WINDOW_S,
                 min_samples: int = MIN_SAMPLES, busy_threshold: float = 0.0) -> None:
        self.threshold_s = threshold_s
        self.busy_threshold = busy_threshold
        self.window_s = window_s
        self.min_samples = min_samples
        self.overloaded = False
        self.lag_s = 0.0  # the window's median lateness, for /metrics and /readyz
        self.busy = 0.0  # the window's share of one core the loop's thread used
        self.refused = 0  # calls refused since start
        self._samples: deque[tuple[float, float, float]] = deque()  # (when, lateness, cpu)

    def observe(self, lag_s: float, now: float, cpu_s: float = 0.0) -> None:
        samples = self._samples
        samples.append((now, max(0.0, lag_s), cpu_s))
        while len(samples) > self.min_samples and samples[0][0] < now - self.window_s:
            samples.popleft()
        self.lag_s = statistics.median(lag for _, lag, _ in samples)
        span_s = now - samples[0][0]
        self.busy = max(0.0, (cpu_s - samples[0][2]) / span_s) if span_s > 0 else 0.0
        if len(samples) < self.min_samples or not (self.threshold_s or self.busy_threshold):
            return  # too few samples to judge, or the gate is off (it neither closes nor opens)
        lagging = bool(self.threshold_s) and self.lag_s >= self.threshold_s
        busy = bool(self.busy_threshold) and self.busy >= self.busy_threshold
        if not self.overloaded and (lagging or busy):
            self.overloaded = True
            logs.event(log, "overloaded", logging.WARNING,
                       reason="loop_lag" if lagging else "loop_busy",
                       loop_lag_ms=round(self.lag_s * 1e3), loop_busy=round(self.busy, 2),
                       threshold_ms=round(self.threshold_s * 1e3),
                       busy_threshold=self.busy_threshold)
        elif self.overloaded and self._caught_up():
            self.overloaded = False
            logs.event(log, "overload_over", loop_lag_ms=round(self.lag_s * 1e3),
                       loop_busy=round(self.busy, 2), refused=self.refused)

    def _caught_up(self) -> bool:
        return ((not self.threshold_s or self.lag_s < self.threshold_s / 2)
                and (not self.busy_threshold
                     or self.busy < self.busy_threshold - self._busy_margin()))

    def _busy_margin(self) -> float:
        """How far under its threshold the busy share must fall to reopen: at most half
        the threshold, so a low one (0.1 or less) still reopens for an idle loop."""
        return min(BUSY_REOPEN_BELOW, self.busy_threshold / 2)


async def watch_loop_lag(gate: OverloadGate, clock: Clock, tick_s: float = TICK_S,
                         cpu_clock: Callable[[], float] = time.thread_time) -> None:
    """Forever: sleep ``tick_s`` on ``clock`` and tell ``gate`` how much later than asked
    the loop woke us (the time every call's next step waited too), and the CPU time of
    the loop's thread (``cpu_clock``, read on it) by then."""
    while True:
        asked = clock.now()
        await clock.sleep(tick_s)
        now = clock.now()
        gate.observe(now - asked - tick_s, now, cpu_clock())
