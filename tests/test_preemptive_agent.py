"""Preemptive generation: a miss's LLM call starts at the pause, while the end-of-turn
silence runs, and the turn adopts it. Whole calls on the deterministic harness (manual
clock, word-coded audio, a scripted LLM whose first token takes clock time)."""

from __future__ import annotations

import asyncio
import copy

import pytest

from gateway.agent import Agent, Sentence
from gateway.clock import Clock
from gateway.hedge import HedgedChat
from gateway.providers.base import LLMChunk, ToolCall, ToolSpec, Transcript
from gateway.settings import Settings, SettingsError
from tests.call_harness import CallHarness

SILENCE_MS = 900  # the open silence a miss waits (the default)
QUESTION = "where is my parcel"


def harness(first_token_s: float = 0.0, **settings) -> CallHarness:
    h = CallHarness(early_finals=True,
                    settings={"end_of_turn_silence_ms": SILENCE_MS, **settings})
    h.llm.first_token_s = first_token_s
    return h


def user_texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


@pytest.mark.parametrize("first_token_ms", [400, 1500])
async def test_a_miss_first_token_overlaps_the_end_of_turn_silence(first_token_ms):
    runs = {}
    for preemptive in (True, False):
        h = await harness(first_token_ms / 1000, preemptive_agent=preemptive).start()
        await h.say(QUESTION, then_silence_ms=SILENCE_MS + first_token_ms + 1000)
        await h.stop()
        (metrics,) = h.metrics()
        assert metrics["source"] == "llm" and metrics["preempted"] is preemptive
        assert h.tts.spoken == ["Okay."]
        runs[preemptive] = (metrics, h)
    metrics, h = runs[True]
    late = metrics["first_token_ms"] - metrics["end_of_turn_ms"]
    # The call started about 120 ms after the last speech (a 64 ms pause, a 50 ms
    # decode): its first token comes max(0, N - silence) after the turn ends, plus that.
    assert max(0, first_token_ms - SILENCE_MS) <= late <= \
        max(0, first_token_ms - SILENCE_MS + 150) + 25
    assert len(h.llm.requests) == 1  # one call: the preemptive one, adopted
    assert h.stats.preempts == {"started": 1, "used": 1}
    assert h.llm.open_streams == 0
    plain, p = runs[False]
    assert plain["first_token_ms"] - plain["end_of_turn_ms"] >= first_token_ms
    assert metrics["reply_latency_ms"] < plain["reply_latency_ms"] - min(first_token_ms,
                                                                         SILENCE_MS) + 150
    # The same request, and the conversation updated exactly as by a normal turn.
    assert h.llm.requests == p.llm.requests
    assert h.call.conversation.history == p.call.conversation.history
    assert user_texts(h.call.conversation.history) == [QUESTION]
    assert p.stats.preempts == {}


async def test_speech_resuming_cancels_the_preemptive_call_and_the_turn_asks_afresh():
    h = await harness(2.0).start()
    await h.say(QUESTION, then_silence_ms=400)  # a mid-sentence pause: called, not over
    assert h.llm.open_streams == 1 and user_texts(h.llm.requests[0]) == [QUESTION]
    assert h.call.conversation.history == []  # nothing committed
    await h.say("from the shop", then_silence_ms=0)  # the caller goes on
    assert h.llm.open_streams == 0 and h.llm.closed_streams == 1  # closed, not left running
    assert h.stats.preempts["discarded"] == 1
    assert h.call.conversation.history == [] and h.output.of("response") == []
    await h.silence(SILENCE_MS + 3000)
    await h.stop()
    full = f"{QUESTION} from the shop"
    assert h.transcripts() == [full]
    assert [user_texts(r) for r in h.llm.requests] == [[QUESTION], [full]]
    assert user_texts(h.call.conversation.history) == [full]
    assert h.tts.spoken == ["Okay."]  # one answer, to the whole question


def final_differs(h, final: str) -> None:
    """The call's STT stream decodes as usual but its final says ``final``."""
    stream = h.stt.streams[0]
    finalize = stream.finalize

    def finalize_differently():
        decoded = finalize()

        async def final_text() -> Transcript:
            await decoded
            return Transcript(text=final, final=True)
        return final_text()

    stream.finalize = finalize_differently  # type: ignore[method-assign]


@pytest.mark.parametrize("final, adopted", [(f"{QUESTION} please", False),
                                            ("Where is  my Parcel", True)])
async def test_a_final_that_differs_from_the_preempted_words_never_uses_them(final, adopted):
    h = harness(0.3)
    await h.start()
    final_differs(h, final)
    await h.say(QUESTION, then_silence_ms=SILENCE_MS + 1500)
    await h.stop()
    assert h.transcripts() == [final]
    (metrics,) = h.metrics()
    assert metrics["preempted"] is adopted
    # Up to case and spacing (normalize_text) the same words: adopted; other words: a fresh call.
    assert [user_texts(r) for r in h.llm.requests] == \
        [[QUESTION]] + ([] if adopted else [[final]])
    assert user_texts(h.call.conversation.history) == [final]
    assert h.stats.preempts == {"started": 1, ("used" if adopted else "discarded"): 1}
    assert h.llm.open_streams == 0


async def test_a_discarded_preemptive_call_closes_its_stream_once():
    # The final is not the preempted words: the preemptive call is cancelled and closes
    # its stream (an HTTP teardown, slow here); the fresh call answers and the turn ends
    # meanwhile. Cancelled again then, the teardown was cut short and the stream left open.
    h = harness(1.0)  # the preemptive call still waits for its first token at the end
    h.llm.close_s = 2.0
    await h.start()
    final_differs(h, f"{QUESTION} please")
    await h.say(QUESTION, then_silence_ms=SILENCE_MS + 100)  # the turn ended: a fresh call
    assert h.stats.preempts == {"started": 1}
    h.llm.close_s = 0.0  # the fresh call's stream closes at once
    await h.wait(1500)
    assert h.metrics() and h.llm.open_streams == 1  # the turn is over; the preemptive
    await h.wait(2000)  # stream is still closing
    await h.stop()
    assert h.llm.open_streams == 0 and h.llm.closed_streams == 2


class RecordingRunner:
    def __init__(self, clock) -> None:
        self.clock = clock
        self.ran: list[tuple[str, float]] = []

    async def run(self, call: ToolCall, clock: Clock) -> tuple[str, bool]:
        self.ran.append((call.name, self.clock.now()))
        return '{"status": "on its way"}', True

    async def aclose(self) -> None:
        return None


async def test_a_preemptive_tool_call_runs_only_once_the_turn_has_ended():
    h = harness()
    h.agent.tools = [ToolSpec("order_status", "where an order is")]
    h.agent.runner = runner = RecordingRunner(h.clock)  # type: ignore[assignment]
    h.llm.tool_calls = [ToolCall("call-1", "order_status", "{}")]
    h.llm.reply = "It is on its way."
    await h.start()
    await h.say(QUESTION, then_silence_ms=500)  # the model asked for the tool already
    assert len(h.llm.requests) == 1 and h.llm.tool_calls == []
    assert runner.ran == [] and h.output.of("response") == []  # no tool, no filler yet
    assert h.call.conversation.history == []
    await h.silence(SILENCE_MS + 1500)
    await h.stop()
    (metrics,) = h.metrics()
    assert metrics["preempted"] is True
    ((name, at),) = runner.ran  # run once, by the turn, after it ended
    assert name == "order_status"
    turn_end_ms = metrics["end_of_turn_ms"]
    first_token_ms = metrics["first_token_ms"]
    assert first_token_ms >= turn_end_ms
    assert [e["source"] for e in h.output.of("response")] == ["filler", "llm"]
    # The tool round went on from the adopted round, exactly like a normal turn's.
    roles = [m["role"] for m in h.call.conversation.history]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert [m["role"] for m in h.llm.requests[1]] == ["system", "user", "assistant", "tool"]
    assert h.llm.open_streams == 0


async def test_a_failing_preemptive_call_is_not_reported_and_the_turn_calls_afresh():
    h = harness(0.1)
    h.llm.fail_next = 1
    await h.start()
    await h.say(QUESTION, then_silence_ms=SILENCE_MS + 1000)
    await h.stop()
    assert h.output.of("error") == [] and not h.stats.errors
    (metrics,) = h.metrics()
    assert metrics["preempted"] is False and metrics["source"] == "llm"
    assert [user_texts(r) for r in h.llm.requests] == [[QUESTION], [QUESTION]]
    assert h.tts.spoken == ["Okay."]
    assert h.stats.preempts == {"started": 1, "discarded": 1}


async def test_no_preemptive_call_without_an_llm_or_for_a_cached_or_unfinished_question():
    h = CallHarness(early_finals=True, faqs={"opening hours": "hours"},
                    settings={"end_of_turn_silence_ms": SILENCE_MS})
    await h.start()
    await h.say("what are your opening hours", then_silence_ms=1500)  # a hit
    await h.say("my card number is", then_silence_ms=1500)  # unfinished words
    assert h.stats.preempts == {}
    assert [user_texts(r) for r in h.llm.requests] == [["what are your opening hours",
                                                        "my card number is"]]
    h.agent.llm = None  # the embedded default: a miss is a handoff
    await h.say(QUESTION, then_silence_ms=1500)
    await h.stop()
    assert h.stats.preempts == {}
    assert h.output.of("handoff")


async def test_a_text_turn_during_the_pause_cancels_the_preemptive_call():
    h = await harness(5.0).start()
    await h.say(QUESTION, then_silence_ms=300)
    assert h.llm.open_streams == 1
    await h.text("actually never mind")  # a turn of its own: the context changes
    assert h.stats.preempts == {"started": 1, "discarded": 1}
    assert [user_texts(r) for r in h.llm.requests] == [[QUESTION], ["actually never mind"]]
    assert h.llm.closed_streams == 1
    await h.stop()


async def test_the_calls_end_leaves_no_preemptive_task_or_stream():
    before = asyncio.all_tasks()
    h = await harness(5.0).start()
    await h.say(QUESTION, then_silence_ms=300)  # in flight when the call ends
    assert h.llm.open_streams == 1
    await h.stop()
    await h.clock.settle()
    left = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert left == set(), [t.get_name() for t in left]
    assert h.llm.open_streams == 0 and h.llm.closed_streams == 1
    assert h.stats.preempts == {"started": 1, "discarded": 1}


# ---------------------------------------------------------------- the agent alone


class GatedLLM:
    """Streams ``reply`` word by word, once ``gate`` (if any) is set; counts its streams."""

    def __init__(self, name: str, reply: str, gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.reply = reply
        self.gate = gate
        self.opened = self.closed = 0

    async def stream(self, messages, tools=None):
        self.opened += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            for word in self.reply.split():
                await asyncio.sleep(0)
                yield LLMChunk(text=word + " ")
        finally:
            self.closed += 1


def spoken(events) -> str:
    return " ".join(e.text for e in events if isinstance(e, Sentence))


async def test_a_preemptive_start_keeps_the_hedge_and_commits_nothing_until_adopted():
    primary = GatedLLM("primary", "Slow answer.", gate=asyncio.Event())
    secondary = GatedLLM("secondary", "Fast answer. It is on its way.")
    agent = Agent(HedgedChat(primary, secondary, hedge_delay_s=0),  # type: ignore[arg-type]
                  filler_after_s=None)
    conversation = agent.new_conversation()
    conversation.add_user("hello")
    conversation.add_assistant("Hello, how can I help?")
    before = copy.deepcopy(conversation.history)
    preempt = agent.preempt(conversation, QUESTION)
    assert preempt is not None
    while not preempt.task.done():
        await asyncio.sleep(0)  # the whole first round arrives before the turn ends
    assert conversation.history == before  # nothing committed
    assert primary.closed == 1  # the hedge's loser was closed as always
    events = [e async for e in agent.respond(conversation, QUESTION, preempt)]
    assert spoken(events) == "Fast answer. It is on its way."
    assert (primary.opened, secondary.opened) == (1, 1)  # no fresh call
    assert conversation.history == before + [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Fast answer. It is on its way."}]


async def test_a_preemptive_start_for_a_changed_context_is_cancelled_for_a_fresh_call():
    llm = GatedLLM("model", "Fresh answer.", gate=asyncio.Event())
    agent = Agent(llm, filler_after_s=None)  # type: ignore[arg-type]
    conversation = agent.new_conversation()
    preempt = agent.preempt(conversation, QUESTION)
    assert preempt is not None
    await asyncio.sleep(0)
    conversation.add_user("actually never mind")  # another turn answered meanwhile
    conversation.add_assistant("Okay.")
    llm.gate.set()  # type: ignore[union-attr]
    events = [e async for e in agent.respond(conversation, QUESTION, preempt)]
    assert spoken(events) == "Fresh answer."
    assert llm.opened == 2 and llm.closed == 2 and not preempt.adopted
    await preempt.aclose()
    assert preempt.task.done()


def test_the_setting_is_on_by_default_and_read_from_the_environment():
    assert Settings.load({}, environ={}).preemptive_agent is True
    assert Settings.load(environ={"VOICEGATE_PREEMPTIVE_AGENT": "false"}).preemptive_agent is False
    with pytest.raises(SettingsError, match="preemptive_agent"):
        Settings.load(environ={"VOICEGATE_PREEMPTIVE_AGENT": "maybe"})
