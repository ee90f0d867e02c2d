"""A hedged pair of streaming LLM calls.

The primary starts at once; the secondary after a hedge delay (fixed, 0 = both at
once, or adaptive: a high percentile of the primary's recent time to first token).
The first leg to yield content (not whitespace alone) or a tool call (its first
fragment: the arguments may take seconds to write) wins and is streamed to the caller;
the other is cancelled, which closes its HTTP stream. A leg that fails before its first
token (error, empty reply, or no token within
``first_token_timeout_s``) hands the turn to the other at once, starting the secondary
early if need be. When no leg answers and one of them ended with an empty reply (the
model answered, with nothing), the stream ends with no chunk (``empty_replies``): no
outage, the agent decides; only when every leg failed otherwise does it raise.

A leg refused for a rate limit (``RateLimited``: a 429 that is no spent quota) before its
first token is asked again instead, when the wait ends inside its first-token budget
(counted from its first request, so the caller waits no longer than before): the
provider's Retry-After, else the exhausted limit's reset when that ends in time, else
``retry_backoff_s`` doubling (jittered), at most ``rate_limit_retries`` times a leg. Both
legs normally share one account, so a 429 usually reaches both: failing them both handed
the caller off though the provider said "in 200 ms". Waiting, the leg is still live, and
the secondary starts at once, as after a failure (it may be another account or provider;
on the same account it is refused too and waits its own); the wait is one more deadline of
the race's loop, so a barge-in ends it at once. Any other
refusal, or a wait past the budget, fails the leg at once, as before.

The stream ends with its winner, at its model's finish (``LLMChunk.finished``: the
``finish_reason``), at once, rather than at its body's end: the consumer says the answer's
last piece and runs its tool calls at the stream's end, which must not wait for the body.
The rest ([DONE], the end of the response) normally comes with the finish and is read
after the stream's end, without the caller (its connection reused), a body not ended
within ``FINISH_GRACE_S`` is cut, and one that breaks then fails nothing (a proxy holding
the connection open stalled a whole answer into the idle timeout, then, until the
stream's end no longer waited for it, its last piece by the grace). That, and a loser's
teardown (an HTTP close) still under way, goes on without the caller, its outcome
retrieved; ``aclose`` waits for what is left of them (``CLOSE_TIMEOUT_S`` at most).
Before a win every leg is the stream's to close, and its end waits (for an unfinished
winner's close too); cancelled again meanwhile (a barge-in, then the call's teardown), it
stops waiting, and those closes go on, left to ``aclose`` as well: a cancel never cuts a
close under way short.

The hedge delay and both timeouts run on a ``Clock`` (gateway/clock.py; the monotonic
``SYSTEM_CLOCK`` in production), so a test's ``ManualClock`` decides when they pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from gateway.providers.base import ChatModel, LLMChunk, ProviderError, RateLimited, ToolSpec
from gateway.providers.rate_limits import retry_wait
from . import logs
from .clock import SYSTEM_CLOCK, Clock, Expired, Timeouts

log = logging.getLogger("voicegate.hedge")

# How long ``aclose`` waits for the losers' teardowns (HTTP closes, normally milliseconds):
# a provider whose close hangs must not hang the shutdown with it.
CLOSE_TIMEOUT_S = 5.0
# How long a winner whose model finished (``finish_reason``) may take to end its body
# ([DONE], the end of the response) before it is cut: both normally come with the finish.
FINISH_GRACE_S = 0.2


class AdaptiveDelay:
    """A percentile of the primary's recent time to first token, clamped to [floor, ceiling]
    (``initial_s`` too, until ``min_samples`` races were seen).

    A primary cancelled as the loser at time t contributes t (``observe_lost``): its true
    TTFT is at least that, and t is above the current delay, so the percentile estimate
    keeps the right count of samples above it.

    A primary that lost ``degraded_after`` races in a row is degraded (hung, or far slower
    than it was): the secondary then starts at the floor until the primary wins again.
    Those losses push the percentile up by the secondary's own time each window, towards
    the ceiling, so every miss waited up to the ceiling (2 s) before the only leg that
    answers was even asked. Healthy, the secondary wins a race only now and then. Every
    ``probe_every``-th race while degraded is a probe at the percentile: at the floor a
    primary back to health, but slower than the floor plus the secondary's time, never won,
    and every turn went to the secondary (two requests) for good. A loss at the floor is
    no sample: cut that early it would drag the percentile under the primary's own times,
    and the probe with it.
    """

    def __init__(self, percentile: float = 0.9, floor_s: float = 0.06, ceiling_s: float = 2.0,
                 initial_s: float = 0.4, window: int = 200, min_samples: int = 20,
                 degraded_after: int = 3, probe_every: int = 10) -> None:
        self.percentile = percentile
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.initial_s = initial_s
        self.min_samples = min_samples
        self.degraded_after = degraded_after  # 0: never
        self.probe_every = probe_every  # 0: no probe (at the floor until the primary wins)
        self._samples: deque[float] = deque(maxlen=window)
        self._cached: float | None = None
        self._lost_in_a_row = 0

    def observe(self, ttft_s: float) -> None:
        """The primary won, its first token ``ttft_s`` after its request."""
        self._samples.append(ttft_s)
        self._cached = None
        self._lost_in_a_row = 0

    def observe_lost(self, at_least_s: float) -> None:
        """The primary lost the race, cancelled ``at_least_s`` after its request (a sample
        unless its secondary started at the floor)."""
        if not self._at_floor():
            self._samples.append(at_least_s)
            self._cached = None
        self._lost_in_a_row += 1

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_after) and self._lost_in_a_row >= self.degraded_after

    def _at_floor(self) -> bool:
        """Degraded, and the next race no probe (every ``probe_every``-th is)."""
        if not self.degraded:
            return False
        races = self._lost_in_a_row - self.degraded_after  # lost since it was degraded
        return not self.probe_every or (races + 1) % self.probe_every != 0

    def delay_s(self) -> float:
        if self._at_floor():
            return self.floor_s
        if len(self._samples) < self.min_samples:
            # Clamped as the percentile is: the ceiling is the latest a secondary starts.
            return min(self.ceiling_s, max(self.floor_s, self.initial_s))
        if self._cached is None:
            ordered = sorted(self._samples)
            rank = min(len(ordered) - 1, max(0, math.ceil(self.percentile * len(ordered)) - 1))
            self._cached = min(self.ceiling_s, max(self.floor_s, ordered[rank]))
        return self._cached


@dataclass
class HedgeStats:
    turns: int = 0
    requests: int = 0  # requests made: legs started, and legs asked again (``retries``)
    extra_requests: int = 0  # secondary legs started (hedge timer or failover)
    failovers: int = 0  # secondary started early because the primary failed
    retries: int = 0  # a leg asked again after a rate limit (a 429) before its first token
    primary_wins: int = 0
    secondary_wins: int = 0
    leg_failures: int = 0  # before the first token (then the other leg answers) or after it
    all_failed: int = 0  # every leg failed before a token: the round raised
    # No leg answered and one ended empty (no text, no tool call): the stream ended empty.
    empty_replies: int = 0
    # Recent turns only (bounded): start -> first chunk yielded.
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "ttft_s"}
        data["extra_request_ratio"] = self.extra_requests / self.turns if self.turns else 0.0
        return data


_DONE = object()


@dataclass
class _Leg:
    role: str  # "primary" | "secondary"
    model: ChatModel
    started: float  # its first request: its first-token budget counts from here
    asked: float = 0.0  # its request under way (a later one after a 429)
    task: asyncio.Task[None] | None = None
    failed: bool = False
    empty: bool = False  # it ended with nothing (also failed: it cannot win)
    retries: int = 0  # times asked again after a 429
    retry_at: float | None = None  # waiting out a 429: asked again then (no request under way)
    cancelled: bool = False  # its task cancelled: once only (again would cut its close short)


class HedgedChat:
    """A ``ChatModel`` racing a primary and an optional secondary ``ChatModel``."""

    def __init__(self, primary: ChatModel, secondary: ChatModel | None = None, *,
                 hedge_delay_s: float | None = None, adaptive: AdaptiveDelay | None = None,
                 first_token_timeout_s: float = 4.0, idle_timeout_s: float = 10.0,
                 rate_limit_retries: int = 3, retry_backoff_s: float = 0.1,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.name = f"hedged({primary.name}, {secondary.name})" if secondary else primary.name
        self.primary = primary
        self.secondary = secondary
        self.fixed_delay_s = hedge_delay_s  # None: adaptive
        self.adaptive = adaptive or AdaptiveDelay()
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.rate_limit_retries = rate_limit_retries  # a leg's, after a 429
        self.retry_backoff_s = retry_backoff_s  # the first wait when a 429 names none
        self._clock = clock  # the hedge delay's and the timeouts' (a test's ManualClock)
        self.stats = HedgeStats()
        # Losers' teardowns, after their stream: each task, and its leg for the log
        # ("primary openai:primary").
        self._closing: dict[asyncio.Task[None], str] = {}

    async def aclose(self) -> None:
        """Wait for the losers' teardowns still under way (before their clients close),
        ``CLOSE_TIMEOUT_S`` of the clock at most: one still running then is cancelled
        again, logged (``llm_close_timed_out``) and left."""
        if not self._closing:
            return
        timeouts = Timeouts(self._clock)
        try:
            # Shielded: the timeout must not cancel them, so what is left can be named.
            await timeouts.within(CLOSE_TIMEOUT_S, asyncio.shield(
                asyncio.gather(*self._closing, return_exceptions=True)))
        except Expired:
            left = {task: leg for task, leg in self._closing.items() if not task.done()}
            logs.event(log, "llm_close_timed_out", logging.WARNING, waited_s=CLOSE_TIMEOUT_S,
                       legs=", ".join(left.values()))
            for task in left:
                task.cancel()  # a close awaiting I/O may yet end; its outcome is retrieved
        finally:
            timeouts.close()

    def hedge_delay_s(self) -> float:
        return self.fixed_delay_s if self.fixed_delay_s is not None else self.adaptive.delay_s()

    async def stream(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        queue: asyncio.Queue[tuple[_Leg, Any]] = asyncio.Queue()
        legs: list[_Leg] = []
        errors: list[str] = []
        clock = self._clock
        timeouts = Timeouts(clock)  # every wait of this stream, on one timer task
        t0 = clock.now()
        self.stats.turns += 1
        winner: _Leg | None = None
        finished = False  # the winner's model finished its answer (``LLMChunk.finished``)

        def ask(leg: _Leg) -> None:
            # A leg asked again replaces a pump that has ended: its stream raised at the
            # request (the 429), so it had nothing left to close.
            leg.asked, leg.retry_at = clock.now(), None
            leg.task = asyncio.create_task(_pump(leg, messages, tools, queue),
                                           name=f"llm-{leg.role}")
            self.stats.requests += 1

        def start(role: str, model: ChatModel) -> None:
            leg = _Leg(role, model, clock.now())
            legs.append(leg)
            ask(leg)
            if role == "secondary":
                self.stats.extra_requests += 1

        try:
            start("primary", self.primary)
            hedge_at = t0 + self.hedge_delay_s() if self.secondary is not None else math.inf
            first: LLMChunk | None = None
            while winner is None:
                live = [leg for leg in legs if not leg.failed]
                if not live:
                    if self.secondary is None or len(legs) == 2:
                        if any(leg.empty for leg in legs):
                            # A model that answered with nothing is not down: no error to
                            # raise (the agent asks again, then hands off, no llm_failed).
                            self.stats.empty_replies += 1
                            return
                        self.stats.all_failed += 1
                        raise ProviderError(self.name, "every LLM failed: " + "; ".join(errors))
                    self.stats.failovers += 1  # the primary failed before the hedge fired
                    start("secondary", self.secondary)
                    continue
                now = clock.now()
                if len(legs) == 1 and now >= hedge_at and self.secondary is not None:
                    start("secondary", self.secondary)
                    continue
                due = [leg for leg in live if leg.retry_at is not None and now >= leg.retry_at]
                for leg in due:  # its 429's wait is over
                    self.stats.retries += 1
                    ask(leg)
                if due:
                    continue
                # A leg waiting out a 429 wakes the loop when its wait ends, which is before
                # its first-token deadline (_retry_wait): no other timer, no other task.
                deadlines = [leg.started + self.first_token_timeout_s if leg.retry_at is None
                             else leg.retry_at for leg in live]
                if len(legs) == 1:
                    deadlines.append(hedge_at)
                try:
                    # Timed as asyncio.timeout is, not wait_for: on Python 3.11 wait_for
                    # swallows a cancellation (a barge-in) that lands as the item arrives,
                    # and the stream would go on with nobody reading it. Once it times
                    # out, the clock has reached the earliest deadline.
                    leg, item = await timeouts.until(min(deadlines), queue.get())
                except Expired:
                    for leg in live:
                        if leg.retry_at is None and \
                                clock.now() >= leg.started + self.first_token_timeout_s:
                            self._fail(leg, "no first token after "
                                            f"{self.first_token_timeout_s:g} s", errors)
                    continue
                if leg.failed:
                    continue  # a late item from a leg already given up on
                if isinstance(item, LLMChunk) and item.finished:
                    item = _DONE  # finished with nothing said: an empty reply, body or not
                if isinstance(item, LLMChunk):
                    if item.tool_call is None and not item.tool_call_fragment \
                            and not item.text.strip():
                        # Whitespace ("\n\n" before a model thinks) says nothing: no first
                        # token, so no win, and the other leg and the timeouts still count.
                        continue
                    winner, first = leg, item
                elif item is _DONE:
                    leg.empty = True
                    self._fail(leg, "empty reply", errors)
                elif (wait := self._retry_wait(leg, item)) is not None:
                    leg.retry_at = clock.now() + wait
                    # Which leg, whose refusal, how long: never the key nor the conversation.
                    logs.event(log, "llm_retry", logging.WARNING, role=leg.role,
                               provider=leg.model.name, status=429, retry=leg.retries + 1,
                               wait_s=round(wait, 3))
                    leg.retries += 1
                    if len(legs) == 1 and self.secondary is not None:
                        # As for a failure: the secondary may be another account or
                        # provider, which need not wait out this one's limit (the same
                        # account refuses it too, and it waits its own).
                        self.stats.failovers += 1
                        start("secondary", self.secondary)
                else:
                    asked = f" (asked {leg.retries + 1} times)" if leg.retries else ""
                    self._fail(leg, f"{item}{asked}", errors)

            # Cancelled now (the finally does not cancel them again), not awaited: its
            # stream's teardown (an HTTP close) runs while the winner streams, never before
            # its first token, nor before its end.
            _cancel([leg for leg in legs if leg is not winner])
            self._record_win(winner, legs, t0)
            assert first is not None
            yield first
            while not finished:
                try:
                    leg, item = await timeouts.within(self.idle_timeout_s, queue.get())
                except Expired:
                    self.stats.leg_failures += 1
                    raise ProviderError(winner.model.name,
                                        f"stream stalled for {self.idle_timeout_s:g} s") from None
                if leg is not winner:
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    self.stats.leg_failures += 1  # the winner broke after its first token
                    raise item
                if item.finished:
                    # The answer is whole: the round ends now, not when the body does
                    # (a connection held open would stall it, one reset would fail it).
                    finished = True
                    if item.cut:  # at max_tokens: the consumer drops a sentence broken off
                        yield item
                    continue
                yield item
        finally:
            # Normal end, error, consumer's aclose() or cancellation (a barge-in): every
            # leg is stopped and its HTTP stream closed. After a win only the winner's
            # close is waited for: the caller has its answer, and the losers' teardowns,
            # cancelled at the win (not again: that would cut a close under way short),
            # are left to ``aclose``.
            timeouts.close()
            if winner is None:
                await self._stop(legs)
            else:
                self._leave_closing([leg for leg in legs if leg is not winner])
                if finished:
                    # Not awaited: the consumer learns the answer is whole (its last
                    # piece said, its tool calls run) now, not after the body's grace.
                    self._finish_later(winner)
                else:
                    await self._stop([winner])

    def _finish_later(self, winner: _Leg) -> None:
        """``_finish`` the winner without the stream's consumer, as a loser's teardown
        goes on: in a task of its own, left to ``aclose``."""
        task = winner.task
        if task is None or task.done():
            return
        finishing = asyncio.create_task(self._finish(winner), name="llm-finish")
        self._closing[finishing] = f"{winner.role} {winner.model.name}"
        finishing.add_done_callback(lambda t: self._closing.pop(t, None))
        finishing.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _finish(self, winner: _Leg) -> None:
        """The winner's model finished its answer: the rest of its body ([DONE], its end)
        normally comes with the finish, and is read (its connection is reused); a body
        not ended within ``FINISH_GRACE_S`` of the clock (held open, or a proxy's
        heartbeats) is cut then, and one that breaks is no failure: the answer is whole.
        Run after the stream has ended (``_finish_later``): cancelled (``aclose`` past its
        timeout), the winner's close goes on, left to ``aclose``."""
        task = winner.task
        if task is not None and not task.done():
            timeouts = Timeouts(self._clock)
            try:
                # asyncio.wait: neither the pump's own error (moot now) nor a cancel of
                # this wait reaches its task.
                await timeouts.within(FINISH_GRACE_S, asyncio.wait({task}))
            except Expired:
                pass
            except asyncio.CancelledError:  # aclose past its timeout: the close goes on
                _cancel([winner])
                self._leave_closing([winner])
                raise
            finally:
                timeouts.close()
        await self._stop([winner])

    async def _stop(self, legs: list[_Leg]) -> None:
        """Cancel ``legs`` and wait for their teardowns (HTTP closes). Cancelled again
        meanwhile (a barge-in, then the call's teardown), the wait ends, as a cancel asks,
        but the closes go on, not cut short: left to ``aclose`` as a loser's are."""
        # A leg cancelled before (one that failed) is closing already: not cut short by a
        # second cancel, nor waited for (the caller gets its error now), left to ``aclose``.
        self._leave_closing([leg for leg in legs if leg.cancelled])
        legs = [leg for leg in legs if not leg.cancelled]
        _cancel(legs)
        # return_exceptions: a leg's own errors were already reported through the queue.
        # Shielded: a cancel of this wait would reach the legs, in their closes.
        waiting = asyncio.gather(*(leg.task for leg in legs if leg.task is not None),
                                 return_exceptions=True)
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            self._leave_closing(legs)
            raise

    def _leave_closing(self, losers: list[_Leg]) -> None:
        """Hand the teardowns of ``losers`` (already cancelled) to ``aclose``."""
        for leg in losers:
            task = leg.task
            if task is not None and not task.done():
                self._closing[task] = f"{leg.role} {leg.model.name}"
                task.add_done_callback(lambda t: self._closing.pop(t, None))
                # Its errors were the race's business (reported through the queue, or
                # moot once it lost); one of the close itself is retrieved here.
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _retry_wait(self, leg: _Leg, error: object) -> float | None:
        """How long ``leg`` waits before it is asked again after ``error``, which it raised
        before its first token; None: it has failed. Only a rate limit (``RateLimited``), at
        most ``rate_limit_retries`` times a leg, and only a wait that ends inside the leg's
        first-token budget: past it the caller would wait for nothing, so the leg hands over
        at once instead. A Retry-After is obeyed (asked sooner, the provider refuses again);
        without one, the reset of the limit it hit, when sooner than the budget's end (it is
        whole again then, at the latest), else ``retry_backoff_s`` doubling, jittered so legs
        and calls refused together do not ask again together."""
        if not isinstance(error, RateLimited) or leg.retries >= self.rate_limit_retries:
            return None
        left = leg.started + self.first_token_timeout_s - self._clock.now()
        asked = error.retry_after_s
        if asked is None and error.reset_s is not None and error.reset_s < left:
            asked = error.reset_s
        return retry_wait(asked, leg.retries, self.retry_backoff_s, left)

    def _fail(self, leg: _Leg, reason: str, errors: list[str]) -> None:
        leg.failed = True
        self.stats.leg_failures += 1
        errors.append(f"{leg.role} {leg.model.name}: {reason}")
        logs.event(log, "llm_leg_failed", logging.WARNING, role=leg.role, model=leg.model.name, reason=str(reason)[:300])
        _cancel([leg])  # its close goes on; left to ``aclose`` (the stream's finally)

    def _record_win(self, winner: _Leg, legs: list[_Leg], t0: float) -> None:
        now = self._clock.now()
        self.stats.ttft_s.append(now - t0)
        # The model's time to first token, from the request that answered: a 429's wait
        # is the account's, not the model's, and must not lengthen the hedge delay.
        if winner.role == "primary":
            self.stats.primary_wins += 1
            self.adaptive.observe(now - winner.asked)
        else:
            self.stats.secondary_wins += 1
            primary = legs[0]
            if not primary.failed and primary.retry_at is None:  # censored: at least this
                self.adaptive.observe_lost(now - primary.asked)


async def _pump(leg: _Leg, messages: list[dict[str, Any]], tools: list[ToolSpec] | None,
                queue: asyncio.Queue[tuple[_Leg, Any]]) -> None:
    stream = leg.model.stream(messages, tools)
    try:
        async for chunk in stream:
            queue.put_nowait((leg, chunk))
        queue.put_nowait((leg, _DONE))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # handed to the racing loop; never lost
        queue.put_nowait((leg, exc if isinstance(exc, ProviderError)
                          else ProviderError(leg.model.name, f"{type(exc).__name__}: {exc}")))
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _cancel(legs: list[_Leg]) -> None:
    """Cancel each leg's task once: a second cancel would land in its close under way."""
    for leg in legs:
        if leg.task is not None and not leg.cancelled:
            leg.cancelled = True
            leg.task.cancel()  # a no-op on a finished leg
