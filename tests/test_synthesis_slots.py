"""A cloud voice's capped syntheses: no more than the cap at once, the most urgent first."""

from __future__ import annotations

import asyncio

import pytest

from gateway.providers.synthesis_slots import URGENCY, SynthesisSlots


async def holder(slots: SynthesisSlots, urgency: int, log: list[int],
                 release: asyncio.Event) -> None:
    URGENCY.set(urgency)
    async with slots.slot():
        log.append(urgency)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_more_than_the_cap_at_once_and_a_freed_slot_goes_to_the_most_urgent():
    slots = SynthesisSlots(2)
    log: list[int] = []
    gates = {u: asyncio.Event() for u in (0, 1, 2, 5, 1000)}
    tasks = [asyncio.create_task(holder(slots, 5, log, gates[5])),
             asyncio.create_task(holder(slots, 1, log, gates[1]))]
    await settle()
    assert log == [5, 1] and slots.busy == 2
    # queued in the order a seed's answer, a third sentence, a first sentence
    for urgency in (1000, 2, 0):
        tasks.append(asyncio.create_task(holder(slots, urgency, log, gates[urgency])))
        await settle()
    assert log == [5, 1] and slots.waiting == 3
    gates[5].set()
    await settle()
    assert log == [5, 1, 0] and slots.busy == 2  # the first sentence, though queued last
    gates[1].set()
    gates[0].set()
    await settle()
    assert log == [5, 1, 0, 2, 1000]
    gates[2].set()
    gates[1000].set()
    await asyncio.gather(*tasks)
    assert slots.busy == 0 and slots.waiting == 0


async def test_a_waiter_cancelled_takes_no_slot_and_one_cancelled_as_granted_passes_it_on():
    slots = SynthesisSlots(1)
    log: list[int] = []
    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    holding = asyncio.create_task(holder(slots, 0, log, first))
    await settle()
    gone = asyncio.create_task(holder(slots, 0, log, second))  # a barge-in cancels it ...
    late = asyncio.create_task(holder(slots, 3, log, third))
    await settle()
    gone.cancel()
    await settle()
    first.set()  # ... before a slot was free: the next waiter gets it
    await settle()
    assert log == [0, 3]
    # granted and cancelled in the same step: the slot is handed on, not lost
    again = asyncio.create_task(holder(slots, 0, log, asyncio.Event()))
    await settle()
    third.set()
    await asyncio.sleep(0)
    again.cancel()
    await asyncio.gather(holding, late, again, return_exceptions=True)
    assert slots.busy == 0 and slots.waiting == 0
    async with slots.slot():  # and the slot is there for the next one at once
        assert slots.busy == 1


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        SynthesisSlots(0)


async def test_a_reply_s_sentences_are_synthesized_as_urgent_as_their_place():
    # The first sentence of a reply is what the caller waits for in silence; the next ones
    # are fetched ahead while it plays; a seed's answers can wait behind all of them.
    from tests.call_harness import CallHarness

    h = CallHarness()
    urgencies: dict[str, int] = {}
    speak = h.tts.synthesize

    async def synthesize(text: str):
        urgencies[text] = URGENCY.get()
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    h.llm.reply = "First one. Second one. Third one."
    await h.start()
    await h.text("tell me three things")
    await h.wait(3000)
    await h.stop()
    assert urgencies == {"First one.": 0, "Second one.": 1, "Third one.": 2}
    assert URGENCY.get() == 0  # set in each synthesis's own task, never in the call's


def test_a_seed_s_answers_wait_behind_every_caller():
    from gateway.providers.synthesis_slots import SEEDING
    from gateway.seeding import blocking_renderer

    seen: list[int] = []

    class Voice:
        name, sample_rate = "cloud", 16000

        async def synthesize(self, text: str):
            seen.append(URGENCY.get())
            yield b"\x00\x00"

    loop = asyncio.new_event_loop()
    try:
        assert blocking_renderer(Voice(), loop)("An answer.") == (b"\x00\x00", 16000)
    finally:
        loop.close()
    assert seen == [SEEDING] and URGENCY.get() == 0


async def test_the_slots_are_seen_in_prometheus():
    from gateway.stats import Stats

    stats = Stats()
    registry = stats.prometheus.registry
    assert registry.get_sample_value("voicegate_tts_slots_busy") is None  # no cap: nothing
    slots = SynthesisSlots(1)
    stats.watch_slots(slots)
    release = asyncio.Event()
    log: list[int] = []
    tasks = [asyncio.create_task(holder(slots, 0, log, release)) for _ in range(3)]
    await settle()
    assert registry.get_sample_value("voicegate_tts_slots") == 1
    assert registry.get_sample_value("voicegate_tts_slots_busy") == 1
    assert registry.get_sample_value("voicegate_tts_slots_waiting") == 2
    assert registry.get_sample_value("voicegate_tts_slot_waits_total") == 2
    release.set()
    await asyncio.gather(*tasks)
    assert registry.get_sample_value("voicegate_tts_slots_busy") == 0
    assert registry.get_sample_value("voicegate_tts_slots_waiting") == 0
    assert registry.get_sample_value("voicegate_tts_slot_waits_total") == 2
