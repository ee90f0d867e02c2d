"""Speculation: which partials are worth a routing, shedding, and the final's reuse."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.call.speculation import Speculation, SpeculationRules
from gateway.route_batcher import RoutingShed
from intents.types import Action, RouteDecision, miss


def hit(text: str, entry: str = "opening_hours") -> RouteDecision:
    return RouteDecision(text=text, intent=entry, action=Action.ANSWER, hit=True,
                         entry_id=entry, score=0.9)


class Router:
    """Records every routing; decides by a function of the text."""

    def __init__(self, decide=lambda text: miss(text, "no")) -> None:
        self.texts: list[tuple[str, bool]] = []
        self.decide = decide
        self.shed: set[str] = set()

    async def __call__(self, text: str, urgent: bool) -> RouteDecision:
        self.texts.append((text, urgent))
        await asyncio.sleep(0)
        if text in self.shed:
            raise RoutingShed(text)
        return self.decide(text)


class BusyLaneRouter(Router):
    """Urgent routings (the finals' lane) are answered at once; a partial's waits until
    ``lane`` is set (the partials' lane is busy with a batch), then is decided, shed or
    fails as ``outcome`` says."""

    def __init__(self, outcome: str = "ok") -> None:
        super().__init__(decide=lambda text: hit(text))
        self.lane = asyncio.Event()
        self.outcome = outcome

    async def __call__(self, text: str, urgent: bool) -> RouteDecision:
        self.texts.append((text, urgent))
        if not urgent:
            await self.lane.wait()
            if self.outcome == "shed":
                raise RoutingShed(text)
            if self.outcome == "fail":
                raise RuntimeError("the partials' batch broke")
        return self.decide(text)


async def word_by_word(spec: Speculation, sentence: str) -> None:
    words = sentence.split()
    for n in range(1, len(words) + 1):
        spec.offer(" ".join(words[:n]))
        await asyncio.sleep(0.001)  # the routing of the previous partial completes


def rules(step: int = 2, settle: int = 2) -> SpeculationRules:
    return SpeculationRules(min_words=3, step_words=step, settle_after=settle)


async def test_word_by_word_partials_are_routed_every_step_words() -> None:
    router = Router()
    spec = Speculation(router, rules(step=2, settle=0), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do your branches open on saturday")
    assert [t for t, _ in router.texts] == ["what time do", "what time do your branches",
                                            "what time do your branches open on"]
    assert spec.take_counts() == {"partials_routed": 3, "partials_skipped": 5,
                                  "partials_shed": 0}


async def test_repeats_and_shrinking_partials_are_never_routed_again() -> None:
    router = Router()
    spec = Speculation(router, rules(step=1, settle=0), on_failure=lambda exc: None)
    for text in ["I lost my card", "I lost my card", "i LOST  my card", "I lost my",
                 "I lost my card today"]:
        spec.offer(text)
        await asyncio.sleep(0.001)
    assert [t for t, _ in router.texts] == ["I lost my card", "I lost my card today"]


async def test_revised_words_are_routed_even_without_new_ones() -> None:
    router = Router()
    spec = Speculation(router, rules(step=3, settle=0), on_failure=lambda exc: None)
    for text in ["what is your routing", "what is your swift"]:
        spec.offer(text)
        await asyncio.sleep(0.001)
    assert [t for t, _ in router.texts] == ["what is your routing", "what is your swift"]


async def test_a_settled_hit_stops_the_partials_but_the_final_is_routed() -> None:
    router = Router(decide=lambda text: hit(text))
    spec = Speculation(router, rules(step=1, settle=2), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do your branches open on saturday")
    assert [t for t, _ in router.texts] == ["what time do", "what time do your"]
    assert spec.settled
    decision, reused = await spec.decide("what time do your branches open on saturday")
    assert decision is not None and decision.text.endswith("saturday") and not reused
    assert router.texts[-1] == ("what time do your branches open on saturday", True)


async def test_a_new_utterance_is_not_settled_by_the_last_ones_partials() -> None:
    # Its turn never routed a final (stopped first), so no reset came: the next
    # utterance starts unsettled, and a routing of the old words still under way (shed
    # its lane, here held) counts for no agreement of the new one.
    router = BusyLaneRouter()
    router.lane.set()
    spec = Speculation(router, rules(step=1, settle=2), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do you open")
    assert spec.settled
    router.lane.clear()
    spec.new_utterance()
    spec.offer("what time do")  # a prefix of the last text chosen: new words all the same
    await asyncio.sleep(0)
    spec.new_utterance()  # that routing is of the utterance before now
    router.lane.set()
    await word_by_word(spec, "what time do")
    assert not spec.settled
    await word_by_word(spec, "what time do we close")
    assert spec.settled
    assert [t for t, _ in router.texts[2:]] == ["what time do", "what time do we",
                                                "what time do we close"]


async def test_a_late_final_leaves_the_next_utterance_its_routing_under_way() -> None:
    # The first turn's final is routed after the caller began the next utterance (its
    # decode was slow). decide() forgot everything: the next utterance's chosen text and
    # its partial's routing under way (cancelled), so its own final, the same words, was
    # routed again, urgent and cold. It forgets its own utterance's partials only.
    router = BusyLaneRouter()
    router.lane.set()
    spec = Speculation(router, rules(step=1, settle=0), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do you open")
    first = spec.utterance  # the turn ends; its final decodes
    spec.new_utterance()
    router.lane.clear()
    spec.offer("and on sunday")  # the next utterance's partial: its routing waits in the lane
    await asyncio.sleep(0)
    decision, reused = await spec.decide("what time do you open", first)
    assert reused and decision is not None and decision.text == "what time do you open"
    router.lane.set()
    for _ in range(3):
        await asyncio.sleep(0)  # that routing, still under way, completes
    decision, reused = await spec.decide("and on sunday", spec.utterance)
    assert reused and decision is not None and decision.text == "and on sunday"
    assert [t for t, urgent in router.texts if urgent] == [], router.texts
    await spec.aclose()


async def test_a_late_final_leaves_the_next_utterance_settled() -> None:
    # Its agreement too: two equal hits of the next utterance keep it settled (its later
    # partials skipped) whatever becomes of the earlier turn's final.
    router = Router(decide=lambda text: hit(text))
    spec = Speculation(router, rules(step=1, settle=2), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do you")
    first = spec.utterance
    spec.new_utterance()
    await word_by_word(spec, "and on sunday please")
    assert spec.settled
    routed = len(router.texts)
    decision, reused = await spec.decide("what time do you open", first)  # words unrouted
    assert not reused and decision is not None and router.texts[-1][1]
    assert spec.settled
    spec.offer("and on sunday please at noon")
    await asyncio.sleep(0.001)
    assert len(router.texts) == routed + 1  # the final only: that partial was skipped


async def test_a_late_final_joined_to_its_early_routing_survives_the_next_pause() -> None:
    # The turn's final joins its early final's routing, still under way; the caller makes
    # a noise (a new utterance) whose pause has no words. That pause dropped the routing
    # the final waited on, and decide() raised CancelledError though nobody stopped the
    # turn: the engine took it for a stopped turn and carried its words into the next.
    release = asyncio.Event()

    class SlowRouter(Router):
        async def __call__(self, text: str, urgent: bool) -> RouteDecision:
            self.texts.append((text, urgent))
            await release.wait()
            return hit(text)

    router = SlowRouter()
    spec = Speculation(router, rules(step=1, settle=0), on_failure=lambda exc: None)
    spec.new_utterance()
    words = "what are your opening hours"
    early = asyncio.create_task(spec.settle(words))  # the pause's early final, routing
    await asyncio.sleep(0)
    final = asyncio.create_task(spec.decide(words, spec.utterance))  # joins it
    await asyncio.sleep(0)
    spec.new_utterance()  # a cough
    assert await spec.settle("") is None  # its pause: no words
    release.set()
    decision, reused = await final
    assert decision is not None and decision.entry_id == "opening_hours" and not reused
    assert router.texts == [(words, True), (words, True)]  # routed again, on its own
    assert await early is None  # the early final itself was superseded
    await spec.aclose()


async def test_different_hits_in_a_row_do_not_settle() -> None:
    entries = iter(["opening_hours", "routing_number", "opening_hours", "routing_number"])
    router = Router(decide=lambda text: hit(text, next(entries)))
    spec = Speculation(router, rules(step=1, settle=2), on_failure=lambda exc: None)
    await word_by_word(spec, "what is the number for my branch")
    assert not spec.settled
    assert len(router.texts) == 5


async def test_the_final_of_a_routed_partial_needs_no_routing() -> None:
    router = Router(decide=lambda text: hit(text))
    spec = Speculation(router, rules(step=2, settle=0), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do you open")
    routed = len(router.texts)
    decision, reused = await spec.decide("What time do you open")
    assert reused and decision is not None and len(router.texts) == routed


async def test_a_shed_partial_is_not_a_failure_and_the_next_one_is_routed() -> None:
    router = Router()
    router.shed.add("where is the nearest atm")
    failures: list[BaseException] = []
    spec = Speculation(router, rules(step=2, settle=0), on_failure=failures.append)
    for text in ["where is the", "where is the nearest atm", "where is the nearest atm now"]:
        spec.offer(text)
        await asyncio.sleep(0.001)
    assert failures == []
    # One new word since the routed text would not be enough, but the shed one was
    # never routed: the next partial is compared with what was routed.
    assert [t for t, _ in router.texts] == ["where is the", "where is the nearest atm",
                                            "where is the nearest atm now"]
    assert spec.take_counts()["partials_shed"] == 1


async def test_the_early_final_is_routed_whatever_the_partial_rules_say() -> None:
    router = Router(decide=lambda text: hit(text))
    spec = Speculation(router, rules(step=1, settle=2), on_failure=lambda exc: None)
    await word_by_word(spec, "what time do your branches open")
    assert spec.settled
    decision = await spec.settle("what time do your branches open today")
    assert decision is not None and decision.text == "what time do your branches open today"
    assert router.texts[-1] == ("what time do your branches open today", True)
    decision, reused = await spec.decide("what time do your branches open today")
    assert reused


@pytest.mark.parametrize("outcome", ["shed", "fail"])
async def test_the_early_final_is_routed_when_the_partial_routed_before_it_is_shed_or_fails(
        outcome: str) -> None:
    router = BusyLaneRouter(outcome)
    spec = Speculation(router, rules(), on_failure=lambda exc: None)
    spec.offer("what time do")  # this call's partial waits in the busy partials' lane
    await asyncio.sleep(0)
    early = "what time do your branches open"
    settling = asyncio.ensure_future(spec.settle(early))
    await asyncio.sleep(0)
    router.lane.set()  # the lane's batch ends: the partial is shed, or its batch broke
    decision = await asyncio.wait_for(settling, 2)
    # The early final is never shed: it is routed (urgent) and its decision returned,
    # so a cached question still ends on the short silence.
    assert (early, True) in router.texts, router.texts
    assert decision is not None and decision.text == early


async def test_the_early_final_does_not_wait_for_the_calls_partial_routing() -> None:
    router = BusyLaneRouter()
    spec = Speculation(router, rules(), on_failure=lambda exc: None)
    spec.offer("what time do")  # this call's partial waits in the busy partials' lane
    await asyncio.sleep(0)
    early = "what time do your branches open"
    # "The early final goes ahead of every call's partials": it is decided in the
    # finals' lane while the partial's batch still runs (the lane is never opened here).
    decision = await asyncio.wait_for(spec.settle(early), 2)
    assert decision is not None and decision.text == early
    assert router.texts == [("what time do", False), (early, True)]
    router.lane.set()  # the partial's routing, older words, must not replace it
    await asyncio.sleep(0)
    final, reused = await spec.decide(early)
    assert reused and final is decision
    await spec.aclose()


class SlowToCancelRouter(BusyLaneRouter):
    """A cancelled routing ends only once ``cleaned`` is set (a batcher dropping its slot)."""

    def __init__(self) -> None:
        super().__init__()
        self.cleaned = asyncio.Event()

    async def __call__(self, text: str, urgent: bool) -> RouteDecision:
        try:
            return await super().__call__(text, urgent)
        except asyncio.CancelledError:
            await self.cleaned.wait()
            raise


async def test_reset_waits_for_the_partial_routing_the_early_final_cancelled() -> None:
    router = SlowToCancelRouter()
    spec = Speculation(router, rules(), on_failure=lambda exc: None)
    spec.offer("what time do")  # this call's partial waits in the busy partials' lane
    await asyncio.sleep(0)
    (partial,) = [t for t in asyncio.all_tasks() if t.get_name() == "vg-speculate"]
    await asyncio.wait_for(spec.settle("what time do your branches open"), 2)
    # settle cancelled that routing without waiting; the turn's reset (or the call's
    # close) must still wait for it, so no task of the call outlives the call.
    reset = asyncio.ensure_future(spec.reset())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not partial.done() and not reset.done()
    router.cleaned.set()
    await asyncio.wait_for(reset, 2)
    assert partial.done()


async def test_the_final_does_not_wait_for_the_calls_partial_routing() -> None:
    router = BusyLaneRouter()
    spec = Speculation(router, rules(step=2, settle=0), on_failure=lambda exc: None)
    spec.offer("what time do")  # routing in the busy partials' lane
    await asyncio.sleep(0)
    spec.offer("what time do your branches")  # chosen next, waits for that routing
    # The turn ends on the newer words: they are routed at once, urgent, not after the
    # call's partial routing returns from its lane.
    decision, reused = await asyncio.wait_for(spec.decide("what time do your branches"), 2)
    assert decision is not None and decision.text == "what time do your branches"
    assert not reused and router.texts[-1] == ("what time do your branches", True)
    assert not router.lane.is_set()
    await spec.aclose()


async def test_a_partial_offered_just_before_a_new_utterance_settles_none_of_the_next():
    # Review: _route_latest read the utterance when its routing *starts*
    # (self._utterance), not the one the partial was chosen in (self._latest_of). A
    # partial chosen in the iteration the caller begins the next utterance (the engine
    # reads a queued partial of the last utterance, then SpeechStarted) is routed after
    # new_utterance(): its hit counts as the next utterance's agreement, which settles
    # on one routing of its own words, and its later partials are skipped.
    router = Router(decide=hit)
    spec = Speculation(router, SpeculationRules(min_words=3, step_words=1, settle_after=2),
                       on_failure=lambda exc: None)
    spec.offer("what time do you open")  # the last utterance's partial, task not started
    spec.new_utterance()  # same loop iteration: the caller begins the next utterance
    await asyncio.sleep(0.001)
    spec.offer("and on sunday")  # the next utterance's first partial (the same entry)
    await asyncio.sleep(0.001)
    assert not spec.settled, "settled on one routing of the new utterance's words"
    spec.offer("and on sunday at noon")
    await asyncio.sleep(0.001)
    assert ("and on sunday at noon", False) in router.texts, router.texts
    # The partial is counted as the earlier utterance's (of), yet agreed as the next one's.
    await spec.aclose()


async def test_a_decision_made_on_a_version_no_longer_served_is_not_reused() -> None:
    """Review (stop 66): a partial's decision was reused at the final whatever cache
    version decided it. The operator publishes a fix while the caller speaks (the question
    "can I pay by cheque" moved from "cheques" to "payments"): the partial was routed on
    the old version, the final's words are the same, so the old version's intent was
    served, an answer the serving version's router would not give. Now a decision of
    another version is routed again (so is the early final's)."""
    serving = {"version": "v1"}

    def decide(text: str) -> RouteDecision:
        entry = "cheques" if serving["version"] == "v1" else "payments"
        return dataclasses.replace(hit(text, entry), version=serving["version"])

    router = Router(decide)
    spec = Speculation(router, rules(step=1, settle=0), on_failure=lambda exc: None,
                       version=lambda: serving["version"])
    spec.offer("can I pay by cheque")
    await asyncio.sleep(0.001)
    serving["version"] = "v2"  # the new version swapped in before the turn ended
    decision, reused = await spec.decide("can I pay by cheque")
    assert decision is not None and not reused, decision
    assert (decision.entry_id, decision.version) == ("payments", "v2")
    # The early final's decision, routed on v2, then v3 swapped in before the final.
    early = await spec.settle("can I pay by cheque please")
    assert early is not None and early.version == "v2"
    serving["version"] = "v3"
    decision, reused = await spec.decide("can I pay by cheque please")
    assert decision is not None and decision.version == "v3" and not reused
    # The same version still serving: reused, as before.
    spec.offer("what time do you open")
    await asyncio.sleep(0.001)
    routings = len(router.texts)
    decision, reused = await spec.decide("what time do you open")
    assert reused and decision is not None and len(router.texts) == routings


async def test_the_early_final_settled_again_after_a_swap_is_not_the_old_versions() -> None:
    """Review (stop 66, second look): a second pause with the same words settled them
    again, and the routing of the first pause, made on the version replaced since, was
    returned as it was: the end of turn took the old version's hit (or miss) for these
    words. Routed again on the serving version."""
    serving = {"version": "v1"}

    def decide(text: str) -> RouteDecision:
        entry = "cheques" if serving["version"] == "v1" else "payments"
        return dataclasses.replace(hit(text, entry), version=serving["version"])

    spec = Speculation(Router(decide), rules(step=1, settle=0), on_failure=lambda exc: None,
                       version=lambda: serving["version"])
    first = await spec.settle("can I pay by cheque")
    assert first is not None and first.version == "v1"
    serving["version"] = "v2"
    again = await spec.settle("can I pay by cheque")
    assert again is not None and (again.entry_id, again.version) == ("payments", "v2"), again
