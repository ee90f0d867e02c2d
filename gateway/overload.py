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
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

from . import logs
from .clock import Clock

log = logging.getLogger("voicegate.overload")

# How often the loop is asked to wake (its lateness is one sample), and how far back
# the samples are weighed.
TICK_S = 0.1
WINDOW_S = 2.0
MIN_SAMPLES = 5


class OverloadGate:
    """Whether the loop's recent lateness says "take no new call".

    ``observe(lag_s, now)`` takes one wake-up's lateness; ``overloaded`` is set once the
    median of the samples of the last ``window_s`` (and at least the last ``min_samples``)
    reaches ``threshold_s``, and cleared once it falls under half of it. A threshold of 0
    turns the gate off."""

    def __init__(self, threshold_s: float, window_s: float = WINDOW_S,
                 min_samples: int = MIN_SAMPLES) -> None:
        self.threshold_s = threshold_s
        self.window_s = window_s
        self.min_samples = min_samples
        self.overloaded = False
        self.lag_s = 0.0  # the window's median lateness, for /metrics and /readyz
        self.refused = 0  # calls refused since start
        self._samples: deque[tuple[float, float]] = deque()  # (when, lateness)

    def observe(self, lag_s: float, now: float) -> None:
        samples = self._samples
        samples.append((now, max(0.0, lag_s)))
        while len(samples) > self.min_samples and samples[0][0] < now - self.window_s:
            samples.popleft()
        self.lag_s = statistics.median(lag for _, lag in samples)
        if not self.threshold_s:
            return
        if not self.overloaded and len(samples) >= self.min_samples \
                and self.lag_s >= self.threshold_s:
            self.overloaded = True
            logs.event(log, "overloaded", logging.WARNING, loop_lag_ms=round(self.lag_s * 1e3),
                       threshold_ms=round(self.threshold_s * 1e3))
        elif self.overloaded and self.lag_s < self.threshold_s / 2:
            self.overloaded = False
            logs.event(log, "overload_over", loop_lag_ms=round(self.lag_s * 1e3),
                       refused=self.refused)


async def watch_loop_lag(gate: OverloadGate, clock: Clock, tick_s: float = TICK_S) -> None:
    """Forever: sleep ``tick_s`` on ``clock`` and tell ``gate`` how much later than asked
    the loop woke us (the time every call's next step waited too)."""
    while True:
        asked = clock.now()
        await clock.sleep(tick_s)
        now = clock.now()
        gate.observe(now - asked - tick_s, now)
