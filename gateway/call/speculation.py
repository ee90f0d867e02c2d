"""Speculation: routing a call's partial transcripts while the caller is still talking.

The newest partial wins and at most one partial's routing is in flight per call, so
when the turn ends the decision for the final text is usually there already and a cache
hit needs no model work. A failed routing of a partial is only a lost speculation: it is
counted and logged, never raised; the final is routed again.

The early final (``settle``) and the final (``decide``) are handed to the router at
once, urgent, on their own: they never wait for the call's partial routing, which may
be queued in the partials' lane behind a batch or a forward pass. That routing is of
older words: it is cancelled (the router's batcher still joins identical words under
way), so its decision never replaces theirs.

Routing cost must not grow with the partials (a recogniser may send one per word), so
a partial is routed only when it can change the decision (``SpeculationRules``):

- it has ``min_words`` words (one or two never settle an intent);
- it is not the text already chosen, nor a prefix of it (recognisers repeat and
  shrink their interim results);
- it adds ``step_words`` words to the text chosen last, or revises its earlier words;
- the decision is not settled: ``settle_after`` routings in a row gave the same cache
  hit (the final is still routed on its own words, unless it is a routed text); each
  utterance starts unsettled (``new_utterance``).

A decision is reused (by the early final or the final) only while the cache version that
made it serves: one published in between may answer the same words otherwise.

A final's ``decide`` names its utterance: one decided after the caller began the next
(its final came late) forgets that utterance's partials only, not the next one's (its
chosen text, its routing under way, its agreement), so the next final can still reuse them.

Under load the batcher sheds queued partials (``RoutingShed``): a lost speculation,
not a failure. Finals and the early final are never shed.

Cancellation: ``reset`` and ``aclose`` cancel the routing tasks and wait for them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from intents.embedder import normalize_text
from intents.types import RouteDecision

from .. import logs
from ..route_batcher import RoutingShed

log = logging.getLogger("voicegate.call")

# route(text, urgent) -> decision; urgent for a final the caller is waiting on.
RouteFn = Callable[[str, bool], Awaitable[RouteDecision]]
# Told when a routing of a partial failed (the engine counts it).
OnFailure = Callable[[BaseException], None]
# The cache version serving now (``RouteDecision.version``).
VersionFn = Callable[[], "str | None"]


@dataclass(frozen=True)
class SpeculationRules:
    """When a partial is worth a routing (see the module docstring)."""

    min_words: int = 3
    step_words: int = 2
    settle_after: int = 2  # 0: never settled, every new partial is routed


# A turn's partial counts, as turn_metrics name them (``Speculation.take_counts``).
PARTIAL_COUNTS = ("partials_routed", "partials_skipped", "partials_shed")
_ROUTED, _SKIPPED, _SHED = range(len(PARTIAL_COUNTS))


class Speculation:
    def __init__(self, router: RouteFn | None, rules: SpeculationRules | int,
                 on_failure: OnFailure, version: VersionFn | None = None) -> None:
        """``version``: the cache version serving now; None: every decision is current."""
        self._router = router
        self._version = version
        # An int is the old signature's min_words, with no other rule.
        self._rules = rules if isinstance(rules, SpeculationRules) else SpeculationRules(
            min_words=rules, step_words=1, settle_after=0)
        self._on_failure = on_failure
        self._latest = ""  # newest partial worth routing
        self._chosen = ""  # normalized _latest: what the next partial is compared with
        self._chosen_words = 0
        self._routed: RouteDecision | None = None
        self._agreeing = 0  # routings in a row that gave the same cache hit
        self._utterance = 0  # counts new_utterance: a routing of older words agrees with none
        self._urgent = ""  # normalized text the caller is waiting on (the early final)
        # The utterances _latest (with the partials' routing) and _urgent (with the early
        # final's) are of: what a late final of an earlier utterance forgets (``_forget``).
        self._latest_of = self._urgent_of = 0
        self._task: asyncio.Task[None] | None = None  # the partials' routing
        # The early final's routing, urgent (None when it was not routed).
        self._settling: asyncio.Task[RouteDecision | None] | None = None
        # Routings cancelled without waiting (settle's): reset waits for them.
        self._cancelled: list[asyncio.Task] = []
        # What the rules saved (bench/capacity.py reads them through the engine), by the
        # utterance the partial was of: utterance -> counts in PARTIAL_COUNTS' order (a
        # routing may end after its turn took its counts: ``take_counts``).
        self._counts: dict[int, list[int]] = {}

    @property
    def utterance(self) -> int:
        """The current utterance's number (``new_utterance``), for its final's ``decide``."""
        return self._utterance

    @property
    def settled(self) -> bool:
        after = self._rules.settle_after
        return after > 0 and self._agreeing >= after

    def offer(self, text: str) -> None:
        """A partial transcript arrived."""
        if self._router is None:
            return
        wanted = normalize_text(text)
        words = _word_count(wanted)
        if words < self._rules.min_words or not self._worth_routing(wanted, words):
            self._count(_SKIPPED, self._utterance)
            return
        self._choose(text, wanted, words)

    def _worth_routing(self, wanted: str, words: int) -> bool:
        if self.settled:
            return False
        chosen = self._chosen
        if not chosen:
            return True
        if chosen.startswith(wanted) and (len(chosen) == len(wanted)
                                          or chosen[len(wanted)] == " "):
            return False  # the same words again, or fewer (a recogniser's revision)
        if wanted.startswith(chosen) and wanted[len(chosen)] == " ":
            return words - self._chosen_words >= self._rules.step_words
        return True  # earlier words revised: the decision may change

    def _choose(self, text: str, wanted: str, words: int) -> None:
        self._latest, self._chosen, self._chosen_words = text, wanted, words
        self._latest_of = self._utterance
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._route_latest(), name="vg-speculate")

    async def settle(self, text: str) -> RouteDecision | None:
        """Route ``text`` now, ahead of every call's partials and of this call's own
        partial routing: the early final, decoded at a pause, which the turn's end will
        most likely confirm. None when it is not routed (too short, no router), its
        routing failed, or a newer text came."""
        wanted = normalize_text(text)
        if wanted != self._urgent:  # a new early final: the last pause's is stale
            self._urgent = wanted
            self._settling = self._drop(self._settling)
        self._urgent_of = self._utterance  # the same words again: this utterance's now
        words = _word_count(wanted)
        if self._router is None or words < self._rules.min_words:
            return None
        # Whatever the partial rules say: the caller is waiting on this text. Partials
        # are compared with it from now on; one routing under way is of older words.
        self._task = self._drop(self._task)
        self._latest, self._chosen, self._chosen_words = text, wanted, words
        self._latest_of = self._utterance
        routed = self._routed
        if routed is not None and normalize_text(routed.text) == wanted \
                and self._current(routed):
            return routed  # a partial of these very words was routed already
        if self._settling is not None and self._settling.done() \
                and not self._settling.cancelled() and self._settling.exception() is None:
            earlier = self._settling.result()
            if earlier is not None and not self._current(earlier):
                self._settling = None  # these words, routed on a version replaced since
        if self._settling is None:
            self._settling = asyncio.create_task(self._route_urgent(text),
                                                 name="vg-route-early")
        task = self._settling
        decision = await _unless_dropped(task)
        return decision if task is self._settling else None

    async def _route_latest(self) -> None:
        """Route the newest partial until the decision is for it (one routing at a time)."""
        assert self._router is not None
        # Normalized: another call's identical text may have been routed in its spelling.
        while self._routed is None or \
                normalize_text(self._routed.text) != normalize_text(self._latest):
            # Of the utterance its partial was chosen in, which may have ended since (a
            # partial offered in the same loop pass as the next utterance's start).
            text, of = self._latest, self._latest_of
            try:
                decision = await self._router(text, False)
            except asyncio.CancelledError:
                raise
            except RoutingShed:  # the gateway is busy: the next partial or the final will do
                self._count(_SHED, of)
                self._chosen, self._chosen_words = self._routed_basis()
                return
            except Exception as exc:
                self._failed(exc)
                return
            self._count(_ROUTED, of)
            self._record(decision, of)

    async def _route_urgent(self, text: str) -> RouteDecision | None:
        """The early final's routing; None when it failed (the final is routed again)."""
        assert self._router is not None
        utterance = self._utterance
        try:
            decision = await self._router(text, True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            if self._settling is asyncio.current_task():
                self._settling = None  # not joined: these words are routed again
            return None
        if normalize_text(self._latest) == normalize_text(text):  # no newer partial chosen
            self._record(decision, utterance)
        return decision

    def _current(self, decision: RouteDecision) -> bool:
        """``decision`` was made on the cache version serving now (a new one may route
        the same words to another entry, or to none)."""
        return self._version is None or decision.version == self._version()

    def _record(self, decision: RouteDecision, utterance: int) -> None:
        """``decision`` is the newest routing; of the utterance numbered ``utterance``."""
        previous, self._routed = self._routed, decision
        if utterance != self._utterance:
            return  # an earlier utterance's words: no say in whether this one settled
        same_hit = self._agreeing > 0 and decision.hit and previous is not None and \
            previous.hit and previous.entry_id == decision.entry_id
        self._agreeing = self._agreeing + 1 if same_hit else (1 if decision.hit else 0)

    def _failed(self, exc: Exception) -> None:
        self._on_failure(exc)
        logs.event(log, "speculative_route_failed", logging.WARNING,
                   error=f"{type(exc).__name__}: {exc}"[:200])

    def _count(self, kind: int, utterance: int) -> None:
        self._counts.setdefault(utterance, [0] * len(PARTIAL_COUNTS))[kind] += 1

    def take_counts(self, upto: int | None = None) -> dict[str, int]:
        """Partials routed, skipped by the rules and shed under load since the last call
        (keyed by ``PARTIAL_COUNTS``); ``upto``: only those of that utterance and earlier
        ones. A partial's routing is counted when it ends, which may be after its turn
        took its counts (while its final decoded): ``decide`` ends the utterance's last
        ones (reused, or cancelled), so its counts taken after that are complete."""
        totals = [0] * len(PARTIAL_COUNTS)
        for utterance in [u for u in self._counts if upto is None or u <= upto]:
            for kind, count in enumerate(self._counts.pop(utterance)):
                totals[kind] += count
        return dict(zip(PARTIAL_COUNTS, totals))

    def _routed_basis(self) -> tuple[str, int]:
        """What the next partial is compared with after a shed routing: the routed text."""
        if self._routed is None:
            return "", 0
        routed = normalize_text(self._routed.text)
        return routed, len(routed.split())

    async def decide(self, text: str, utterance: int | None = None
                     ) -> tuple[RouteDecision | None, bool]:
        """The decision for the final ``text`` and whether it was decided already.
        ``utterance``: the one it ends (``utterance`` when its turn ended; None: the
        current one); only its partials, and earlier ones', are forgotten (``_forget``).

        The speculation's decision when it routed this text (True); the early final's
        routing when that is of this text and under way (joined, False); otherwise one
        urgent routing, at once (False): the call's partial routing is not waited for
        (the router joins a routing of the same text under way, and a queued one comes
        along to the finals' lane: route_batcher.RoutingLanes).
        Raises what the router raises: the engine decides what a failed final means.
        """
        if self._router is None:
            return None, False
        wanted = normalize_text(text)
        routed = self._routed
        if routed is not None and normalize_text(routed.text) == wanted \
                and self._current(routed):
            await self.reset(utterance)
            return routed, True
        settling = self._settling
        if settling is not None and self._urgent == wanted:
            # None when a later utterance's pause dropped it: routed on their own below.
            decision = await _unless_dropped(settling)
            if decision is not None and self._current(decision):
                await self.reset(utterance)
                return decision, False
        stale = self._forget(utterance)
        try:
            return await self._router(text, True), False
        finally:  # cancelled before the routing started: long done by now, as a rule
            await _finished(stale)

    def _forget(self, utterance: int | None = None) -> list[asyncio.Task]:
        """Forget the partials of ``utterance`` (None: the current one) and earlier ones;
        the routings under way for them are cancelled and returned, to be waited for."""
        if utterance is not None and utterance < self._utterance:
            return self._forget_earlier(utterance)
        self._routed, self._latest, self._urgent = None, "", ""
        self._chosen, self._chosen_words, self._agreeing = "", 0, 0
        # Older partials are not worth routing now; a final's routing is joined by the
        # batcher if it is the same text.
        stale = [task for task in (self._task, self._settling, *self._cancelled)
                 if task is not None and not task.done()]
        self._task = self._settling = None
        self._cancelled = []
        for task in stale:
            if not task.cancelling():  # once: a second cancel would break its clean-up
                task.cancel()
        return stale

    def _forget_earlier(self, utterance: int) -> list[asyncio.Task]:
        """The late final of ``utterance``: the caller has begun a later one since, whose
        chosen text, agreement and routings under way are its own and stay (wiped, its
        final would need a routing of its own, cold, while the caller waits). Only the
        early final and the partial routing of ``utterance`` or earlier go. The newest
        decision stays too: it is only reused for the very same words."""
        stale: list[asyncio.Task | None] = []
        if self._urgent_of <= utterance:
            self._urgent = ""
            stale.append(self._settling)
            self._settling = None
        if self._latest_of <= utterance:  # no later partial chosen: the routing is of old words
            self._latest = ""
            stale.append(self._task)
            self._task = None
        running = [task for task in stale if task is not None and not task.done()]
        for task in running:
            if not task.cancelling():
                task.cancel()
        return running

    def _drop(self, task: asyncio.Task | None) -> None:
        """Cancel ``task`` if it still runs, without waiting (it waits on the router and
        ends at its next step), and return None: the caller forgets it, reset waits."""
        if task is not None and not task.done():
            task.cancel()
            self._cancelled = [t for t in self._cancelled if not t.done()] + [task]
        return None

    def new_utterance(self) -> None:
        """The caller starts an utterance: the hit settled on, and the text partials are
        compared with, were the last one's (whose turn may have been stopped before its
        final was routed, and never reset this). Routings under way are left to finish:
        that turn's final may still join one; its reset, naming that utterance, forgets
        its own partials only (``decide``)."""
        self._utterance += 1
        self._agreeing = 0
        self._chosen, self._chosen_words = "", 0

    async def reset(self, utterance: int | None = None) -> None:
        """Forget the partials of ``utterance`` (None: the current one), as its final's
        routing would have (the turn ended), and earlier ones'."""
        await _finished(self._forget(utterance))

    async def aclose(self) -> None:
        await self.reset()


async def _unless_dropped(settling: asyncio.Task[RouteDecision | None]
                          ) -> RouteDecision | None:
    """The early final's decision, or None when its routing was dropped (``_drop``: a newer
    pause's words) while we waited: that cancel is the routing's, not the waiter's, whose
    own cancellation still raises."""
    try:
        return await asyncio.shield(settling)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return None


def _word_count(normalized: str) -> int:
    return normalized.count(" ") + 1 if normalized else 0


async def _finished(tasks: list[asyncio.Task]) -> None:
    """Wait for cancelled ``tasks`` to end (no loop iteration when they have)."""
    pending = [task for task in tasks if not task.done()]
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
