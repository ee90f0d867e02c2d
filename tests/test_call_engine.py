"""The call engine driven by the deterministic harness (scripted VAD, fake providers, a
manual clock). One test per defect found in the first call loop, plus the failure paths."""

from __future__ import annotations

import asyncio
import inspect
import json

import numpy as np
import pytest

from gateway.timeline import TurnTimeline
from gateway.vad import SileroState, VADBatcher
from tests.call_harness import FRAME_MS, RATE, TTS_MS_PER_WORD, CallHarness, tone
from tests.test_route_batcher import InlineExecutor

NOISE = 77  # a sample value that is no word (see test_false_interruption)


async def test_later_turns_are_answered_after_the_caller_talks_over_a_slow_final():
    # The final decode takes 500 ms; the caller goes on talking 100 ms after the turn ended.
    h = await CallHarness(decode_s=0.5).start()
    await h.say("what are your opening hours", then_silence_ms=400)
    await h.say("and on sunday", then_silence_ms=1500)
    await h.say("thank you very much", then_silence_ms=1500)
    await h.stop()
    # Nothing was said in between, so the first utterance opens the second turn; the
    # third turn holds its own words only (no stale audio of earlier turns).
    assert h.transcripts() == ["what are your opening hours and on sunday",
                               "thank you very much"]
    assert [m["turn"] for m in h.metrics()] == [2, 3]
    assert all(e["source"] == "llm" for e in h.output.of("response"))
    assert len(h.output.of("response")) == 2


async def test_each_utterance_holds_only_its_own_audio():
    h = await CallHarness().start()
    for text in ("first question here", "second one now", "third and last"):
        await h.say(text, then_silence_ms=1500)
    await h.stop()
    assert h.transcripts() == ["first question here", "second one now", "third and last"]


async def test_the_early_final_decode_is_armed_on_every_turn():
    h = await CallHarness().start()
    for text in ("one two three", "four five six", "seven eight nine"):
        await h.say(text, then_silence_ms=1500)
    await h.stop()
    assert h.stt.streams[0].paused_hints == 3


async def test_no_task_is_left_after_a_call_with_barge_ins_ends():
    before = asyncio.all_tasks()
    h = CallHarness()
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(30))
    await h.start()
    for _ in range(2):
        await h.say("tell me everything please", then_silence_ms=600)
        await h.wait(700)  # the reply is playing
        assert h.call.speaking
        await h.say("stop that now", then_silence_ms=10)  # barge-in
        assert h.output.of("interrupt")
    await h.stop()
    await h.clock.settle()
    left = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert left == set(), [t.get_name() for t in left]
    assert h.llm.open_streams == 0
    assert h.stt.streams[0].closed


async def test_a_reply_cancelled_before_it_started_closes_its_turn():
    # A barge-in or the call's end can cancel a reply still queued behind the previous
    # one's cleanup: its turn never runs, and must not be left as an unawaited coroutine.
    h = await CallHarness().start()
    ran: list[int] = []

    async def turn() -> None:
        ran.append(1)

    queued = turn()
    h.call._start_reply(TurnTimeline(1, clock=h.clock), queued)
    h.call._reply_task.cancel()
    await asyncio.gather(h.call._reply_task, return_exceptions=True)
    await h.stop()
    assert ran == []
    assert inspect.getcoroutinestate(queued) == inspect.CORO_CLOSED


async def test_the_context_keeps_exactly_the_words_the_caller_heard():
    h = CallHarness()
    reply = " ".join(f"Part {i} of the answer is here." for i in range(1, 11))
    h.llm.reply = reply
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    await h.text("wait", final=False)  # a barge-in by text
    interrupt = h.output.of("interrupt")[0]
    await h.wait(100)
    await h.stop()
    heard_words = int(interrupt["heard_ms"] // TTS_MS_PER_WORD)
    assert 0 < heard_words < len(reply.split()) // 2
    assistant = [m for m in h.call.conversation.history if m["role"] == "assistant"]
    assert assistant[-1]["content"] == " ".join(reply.split()[:heard_words])


LONG_REPLY = " ".join(f"Part {i} of the answer is here." for i in range(1, 11))


async def cut_a_long_reply(close_s: float) -> CallHarness:
    """A call whose long LLM answer the caller stops by text 1.5 s in; closing the
    answer's LLM stream (an HTTP teardown) takes ``close_s``."""
    h = CallHarness()
    h.llm.reply = LONG_REPLY
    h.llm.close_s = close_s
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    await h.text("wait", final=False)  # a barge-in by text: the stream starts closing
    return h


def assert_next_request_keeps(h: CallHarness, heard_ms: float, asked: str) -> None:
    """The last request holds the cut answer's heard words, then ``asked``."""
    heard_words = int(heard_ms // TTS_MS_PER_WORD)
    assert 0 < heard_words < len(LONG_REPLY.split()) // 2
    request = h.llm.requests[-1]
    assert [m["role"] for m in request] == ["system", "user", "assistant", "user"]
    assert request[2]["content"] == " ".join(LONG_REPLY.split()[:heard_words])
    assert request[3]["content"] == asked


async def test_the_caller_going_on_while_a_cut_reply_closes_keeps_the_heard_words():
    # Closing the cut reply's LLM stream takes a while (an HTTP teardown); the caller's
    # next words arrive meanwhile. They must not stop the stopped reply again: a second
    # cancellation lands in the agent's cleanup, before it writes what it said, and the
    # next request had no assistant message (test_miss_e2e's barge-in flake).
    h = await cut_a_long_reply(close_s=0.2)
    await h.wait(100)  # the LLM stream is still closing
    assert h.call.replying
    h.llm.reply = "Okay."
    await h.text("what did you just say")
    await h.wait(2000)
    await h.stop()
    interrupts = h.output.of("interrupt")
    assert len(interrupts) == 1  # one barge-in, one interrupt
    assert_next_request_keeps(h, interrupts[0]["heard_ms"], "what did you just say")


async def test_a_tts_failure_is_apologised_for_and_the_next_turn_works():
    h = CallHarness()
    h.llm.reply = "Here is the first part. FAIL this sentence breaks the voice."
    await h.start()
    await h.text("explain my statement")
    await h.wait(3000)
    errors = h.output.of("error")
    assert [e["code"] for e in errors] == ["tts_failed"] and errors[0]["turn"] == 1
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm", "apology"]
    assert h.stats.errors["tts_failed"] == 1
    h.llm.reply = "All good now."
    await h.text("try again")
    await h.wait(2000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=2)] == ["llm"]
    assert [m["turn"] for m in h.metrics()] == [1, 2]


@pytest.mark.parametrize("reply", ["FAIL this sentence breaks the voice.",
                                   "Here is the first part. FAIL this sentence breaks it."])
async def test_the_reply_time_of_a_failed_answer_covers_its_apology(reply):
    # reply_ms is first reply frame -> last reply frame played (docs/protocol.md): after
    # a voice that failed (before any audio, or mid-answer) the apology is the turn's
    # last reply, and its frames count, as a failed final's apology does.
    h = CallHarness()
    h.llm.reply = reply
    await h.start()
    await h.text("explain my statement")
    await h.wait(3000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)][-1] == "apology"
    (metrics,) = h.metrics()
    first_sent, last_sent = h.output.frames[0][0], h.output.frames[-1][0]
    assert metrics["reply_ms"] >= round((last_sent - first_sent) * 1000), metrics


async def test_the_frames_of_a_failed_answer_count_with_its_apologys():
    """Review (stop 69): turn_metrics' frames_sent, frames_late and frame_lag_max_ms are
    the reply's audio frames (docs/protocol.md). A turn whose voice failed mid-answer
    plays two replies, the answer's first sentence and then the apology, and the apology's
    figures replaced the answer's: 15 frames sent of the 40 the caller was sent (and the
    answer's late frames, the ones bench/capacity.py counts, were lost). They add up now,
    the worst lag the worst of both."""
    h = CallHarness()  # 20 ms messages: one frame each
    h.llm.reply = "Here is the first part. FAIL this sentence breaks the voice."
    await h.start()
    await h.text("explain my statement")
    await h.wait(3000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response", turn=1)] == ["llm", "apology"]
    (metrics,) = h.metrics()
    assert metrics["frames_sent"] == len(h.output.frames) == 25 + 15, metrics
    assert metrics["frames_late"] == 0 and metrics["frame_lag_max_ms"] < 1.0, metrics


async def test_a_failed_routing_of_a_partial_is_counted_and_the_call_goes_on():
    h = CallHarness(faqs={"opening hours": "hours"})
    h.router.fail = lambda text, urgent: not urgent
    await h.start()
    await h.text("what are your opening", final=False)
    await h.text("what are your opening hours")
    await h.wait(1500)
    await h.stop()
    assert h.stats.errors["route_failed"] >= 1
    assert [e["source"] for e in h.output.of("response")] == ["cache"]


async def test_a_failed_routing_of_the_final_is_reported_and_the_agent_answers():
    h = CallHarness(faqs={"opening hours": "hours"})
    h.router.fail = lambda text, urgent: urgent
    await h.start()
    await h.text("what are your opening hours")
    await h.wait(1500)
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["route_failed"]
    assert [e["source"] for e in h.output.of("response")] == ["llm"]


async def test_a_failed_final_transcript_gets_an_apology_and_the_call_goes_on():
    h = await CallHarness().start()
    h.stt.fail_finals = 1
    await h.say("something the decoder chokes on", then_silence_ms=1500)
    await h.say("second try works", then_silence_ms=1500)
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["stt_failed"]
    assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
    assert h.transcripts() == ["second try works"]


async def test_a_final_transcript_that_never_comes_gets_an_apology_and_the_call_goes_on():
    """Review (stop 67): a final decode that hangs (a stuck recogniser) was awaited for
    ever: the line stayed silent until the caller spoke again. ``stt_final_timeout_s`` of
    the call's clock after the turn ended, the turn is stt_failed and the caller hears
    the apology; the hung decode is stopped, and the next turn is answered."""
    h = await CallHarness(settings={"stt_final_timeout_s": 5.0}).start()
    h.stt.decode_s = 3600.0  # never, as far as the call can tell
    await h.say("something the decoder hangs on", then_silence_ms=4000)
    assert not h.output.of("error")  # a slow final is still waited for
    await h.wait(2000)  # the turn ended ~0.3 s after the words: 5 s have passed since
    (error,) = h.output.of("error")
    assert error["code"] == "stt_failed"
    assert "did not come within 5 s" in error["message"], error
    assert h.stt.decodes_stopped == 1
    assert [e["source"] for e in h.output.of("response")] == ["apology"]
    h.stt.decode_s = 0.05
    await h.say("second try works", then_silence_ms=1500)
    await h.stop()
    assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
    assert h.transcripts() == ["second try works"]
    assert h.stats.errors["stt_failed"] == 1


async def test_a_stage_failing_over_and_over_is_reported_once_every_few_seconds():
    # Counted every time; told to the client (and logged) at most once every
    # _REPORT_EVERY_S (5 s) of the call's clock: a VAD failing on every frame must not
    # flood the line with errors.
    h = await CallHarness().start()
    h.vad.fail_next = 10_000  # every window for the rest of the call
    await h.silence(4900)
    assert [e["code"] for e in h.output.of("error")] == ["vad_failed"]
    await h.silence(200)
    await h.stop()
    assert [e["code"] for e in h.output.of("error")] == ["vad_failed"] * 2
    assert h.stats.errors["vad_failed"] > 2


async def test_a_vad_failure_on_silence_leaves_the_next_turn_whole():
    h = await CallHarness().start()
    h.vad.fail_next = 1
    await h.silence(100)
    await h.say("still here", then_silence_ms=1500)
    await h.stop()
    assert h.stats.errors["vad_failed"] == 1
    assert h.transcripts() == ["still here"]


class _ModelThatFailsOn:
    """Stands in for ``SileroVAD`` under a real ``VADBatcher``: a window holding any sample
    is speech (as ``ScriptedVad``), and a run holding a window of ``poison`` samples raises,
    as a bad input breaks a real batch. Records how many calls each failed run carried."""

    def __init__(self, poison: int) -> None:
        self._poison = np.float32(poison / 32768.0)
        self.failed_runs: list[int] = []

    def probabilities_batch(self, states: list[SileroState],
                            windows: list[list[np.ndarray]]) -> list[list[float]]:
        if any(np.any(w == self._poison) for call in windows for w in call):
            self.failed_runs.append(len(windows))
            raise RuntimeError("Silero run failed")
        return [[0.95 if np.abs(w).max() > 0 else 0.02 for w in call] for call in windows]


async def test_windows_the_vad_failed_to_score_still_reach_the_recogniser():
    """Review (stop 65): a VAD scoring failure dropped those windows from the recogniser.
    The audio loop skipped a block whose scoring raised (`vad_failed`, "this chunk is
    lost"), so a caller mid-sentence lost the words in it: the transcript missed them.
    Wanted: a failing stage never loses caller audio. Windows the VAD could not score go
    on in order where any window goes (the recogniser mid-utterance, else the pre-roll),
    holding the segmenter still (no turn end, no barge-in on them); the failure is counted
    and reported as before, the call stays up, and another call in the same VAD batch is
    unaffected."""
    caller, other = CallHarness(), CallHarness()
    # One word, one sample value across both calls: only the caller's "book" breaks a run.
    other.vocabulary = other.stt.vocabulary = caller.vocabulary
    model = _ModelThatFailsOn(caller.vocabulary.value("book"))
    batcher = VADBatcher(model, InlineExecutor())  # type: ignore[arg-type]
    caller.deps.vad = other.deps.vad = batcher
    await caller.start()
    await other.start()

    async def both(ours: bytes, theirs: bytes) -> None:
        """Both calls stream in step, a 20 ms frame each per step: their windows are
        scored in the same batches."""
        step = RATE * FRAME_MS // 1000 * 2
        size = max(len(ours), len(theirs))
        ours, theirs = ours.ljust(size, b"\0"), theirs.ljust(size, b"\0")
        for i in range(0, size, step):
            caller.call.feed_audio(ours[i:i + step])
            other.call.feed_audio(theirs[i:i + step])
            await caller.clock.advance(FRAME_MS / 1000)
            await other.clock.advance(FRAME_MS / 1000)

    silence = bytes(RATE * 1500 // 1000 * 2)
    words = caller.vocabulary.audio("please book a table")
    await both(silence[:RATE], silence[:RATE])
    await both(words + silence, caller.vocabulary.audio("what time do you open") + silence)
    assert caller.call.ended is None and other.call.ended is None
    await caller.stop()
    await other.stop()
    assert 2 in model.failed_runs, model.failed_runs  # it broke a batch of both calls
    print("caller heard:", caller.transcripts(), "errors:", dict(caller.stats.errors))
    assert caller.stats.errors["vad_failed"] >= 1
    assert [e["code"] for e in caller.output.of("error")] == ["vad_failed"]
    assert words in caller.stt.utterances[0], "the recogniser missed audio"
    assert caller.transcripts() == ["please book a table"]
    assert [e["source"] for e in caller.output.of("response")] == ["llm"]
    assert other.transcripts() == ["what time do you open"]
    assert other.output.of("error") == [] and "vad_failed" not in other.stats.errors


async def test_words_the_vad_could_not_score_during_a_pause_are_in_the_final():
    """Review (stop 66): with early finals (the embedded recognisers'), words the caller
    said during a pause while the VAD failed were lost. The windows reached the recogniser
    (stop 65), but the pause's early decode, started before them, stood as the final when
    the turn ended with no speech scored since: "please book ... a table" was answered as
    "please book". Wanted: a window the VAD could not score mid-pause may be the caller's
    words, so the pause's early decode and signals are dropped (as when speech resumes),
    and the pause is armed afresh, its early decode of all the audio, once the VAD scores
    a quiet window again."""
    h = await CallHarness(early_finals=True).start()
    await h.say("please book", then_silence_ms=160)  # paused: the early decode is armed
    assert h.stt.streams[0].paused_hints == 1
    h.vad.fail_next = 10_000  # out while the caller goes on
    await h.feed(h.vocabulary.audio("a table"))
    h.vad.fail_next = 0
    await h.silence(1500)
    await h.stop()
    assert h.stats.errors["vad_failed"] >= 1
    assert h.transcripts() == ["please book a table"]
    assert [e["source"] for e in h.output.of("response")] == ["llm"]
    assert h.llm.requests[-1][-1]["content"] == "please book a table"


async def test_a_barge_in_keeps_the_callers_first_word():
    h = CallHarness()
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(30))
    await h.start()
    await h.text("tell me everything")
    await h.wait(800)
    assert h.call.speaking
    await h.say("cancel my card please", then_silence_ms=1500)
    await h.stop()
    assert h.output.of("interrupt")
    assert h.transcripts() == ["cancel my card please"]


async def test_text_sent_before_the_call_runs_is_answered():
    h = CallHarness(faqs={"opening hours": "hours"})
    h.call.feed_text("what are your opening hours", True)  # before run(): queued
    await h.start()
    await h.wait(1500)
    await h.stop()
    assert [e["source"] for e in h.output.of("response")] == ["cache"]


async def test_the_inbound_buffer_is_bounded():
    h = CallHarness(settings={"inbound_buffer_ms": 500})
    h.call.feed_audio(bytes(16000 * 2 * 3))  # 3 s arrive before the audio loop runs
    # 0.5 s of backlog kept, plus room for one message of the largest size (kept whole)
    assert h.call.dropped_audio_bytes == 16000 * 2 * 2.5 - h.settings.max_frame_bytes
    assert h.stats.errors["audio_dropped"] == 1


async def test_a_cache_hit_replays_the_entry_and_the_partials_decided_it():
    # Every new word routed (no step, never settled): the last partial is the final.
    h = await CallHarness(faqs={"opening hours": "hours"},
                          settings={"route_step_words": 1, "route_settle_after": 0}).start()
    await h.say("what are your opening hours", then_silence_ms=1500)
    await h.stop()
    (route,) = h.output.of("route")
    assert route["hit"] and route["entry_id"] == "hours" and route["reused"] is True
    assert [e["source"] for e in h.output.of("response")] == ["cache"]
    assert h.metrics()[0]["first_audio_ms"] is not None


async def test_a_call_answered_from_the_cache_alone_keeps_its_context_within_the_budget():
    """Review (stop 60): a cache hit wrote its exchange to the context untrimmed (only an
    LLM round, building its request, trimmed it): a call the cache answered throughout,
    with no keeper to snapshot it, grew its history for as long as it lasted."""
    h = CallHarness(faqs={"opening hours": "hours"})
    conversation = h.call.conversation
    conversation.budget_chars = len(json.dumps({"role": "system",
                                                "content": conversation.system_prompt})) + 400
    await h.start()
    for n in range(12):
        await h.text(f"what are your opening hours {n}")
        await h.wait(1500)
    await h.stop()
    assert [e["source"] for e in h.output.of("response")] == ["cache"] * 12
    assert h.llm.requests == []
    *earlier, asked, answer = conversation.history
    assert (asked["content"], answer["content"]) == ("what are your opening hours 11",
                                                     "answer hours")
    # What came before the latest exchange is what the budget holds (as an LLM turn's is).
    assert 0 < sum(len(json.dumps(m)) for m in earlier) <= 400, len(earlier)


async def test_partials_routed_only_when_they_can_change_the_decision():
    h = await CallHarness(faqs={"opening hours": "hours"},
                          settings={"route_step_words": 2, "route_settle_after": 0}).start()
    await h.say("what are your opening hours", then_silence_ms=1500)
    await h.stop()
    # Five one-word partials: "what are" and "what are your opening" routed (min 2 words,
    # then two new words), the others skipped; the final is routed on its own words.
    (metrics,) = h.metrics()
    assert (metrics["partials_routed"], metrics["partials_skipped"]) == (2, 3)
    (route,) = h.output.of("route")
    assert route["hit"] and route["reused"] is False
    assert [e["source"] for e in h.output.of("response")] == ["cache"]


def test_every_logger_of_the_package_is_under_voicegate():
    import importlib
    import logging
    import pkgutil

    import cache_seed
    import gateway
    import intents

    for package in (gateway, intents, cache_seed):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    names = [n for n in logging.Logger.manager.loggerDict
             if n.split(".")[0] in ("gateway", "intents", "cache_seed")]
    assert names == []


async def test_every_line_of_a_call_carries_its_id(caplog):
    import logging

    from gateway.logs import JsonFormatter

    caplog.set_level(logging.DEBUG, logger="voicegate")
    h = await CallHarness(faqs={"opening hours": "hours"}).start()
    await h.text("what are your opening hours")
    await h.wait(1500)
    await h.stop()
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "voicegate.call"]
    assert len(lines) >= 3 and all('"call_id": "test-call"' in line for line in lines)


def test_cli_demo_and_server_import_without_a_cycle():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "gateway"
    imports: dict[str, set[str]] = {}
    for name in ("cli", "demo", "server"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imports[name] = {node.module.lstrip(".") for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module and node.level == 1}
    assert "cli" not in imports["demo"] | imports["server"]
    assert "demo" not in imports["server"]


async def test_a_barge_in_on_a_reply_queued_behind_a_closing_one_keeps_the_heard_words():
    # The next turn's reply waits for the cut one's cleanup (its LLM stream closing). A
    # barge-in on that queued reply must not reach the cut one through the wait: a second
    # cancellation lands in the agent's cleanup and the heard words are never written.
    h = await cut_a_long_reply(close_s=1.0)
    heard_ms = h.output.of("interrupt")[0]["heard_ms"]
    h.llm.reply = "Okay."
    await h.text("what did you just say")  # queued behind the closing reply
    await h.wait(100)
    await h.text("no", final=False)  # stops the queued reply
    await h.wait(100)
    await h.text("say it again")
    await h.wait(3000)
    await h.stop()
    assert_next_request_keeps(h, heard_ms, "say it again")
    assert h.llm.open_streams == 0


async def test_words_whose_reply_was_stopped_while_queued_open_the_next_turn():
    # "no wait" stops the answer; its turn's reply queues behind the answer's cleanup
    # (a slow stream close). The caller goes on before it ran: stopped unrun, its words
    # must still open the next turn, as when a reply is stopped before it spoke.
    h = CallHarness()
    reply = " ".join(f"Part {i} of the answer is here." for i in range(1, 11))
    h.llm.reply = reply
    h.llm.close_s = 2.0
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    await h.say("no wait", then_silence_ms=400)  # the answer stopped; the turn ended
    assert h.llm.open_streams == 1  # the answer's stream still closing: the turn queued
    h.llm.reply = "Okay."
    await h.say("tell me about fees", then_silence_ms=4000)
    await h.stop()
    assert h.transcripts() == ["no wait tell me about fees"]
    assert [m["content"] for m in h.llm.requests[-1] if m["role"] == "user"] == \
        ["tell me everything", "no wait tell me about fees"]
    assert [m["role"] for m in h.llm.requests[-1]] == ["system", "user", "assistant", "user"]


async def test_noise_before_the_answer_has_begun_does_not_let_it_play_over_the_caller():
    # The final decode is slow: the caller coughs while the answer waits for its words.
    # Held then, the reply had no audio to hold: it began playing, over the cough, once
    # the words came. It waits for the caller instead, and answers the question after.
    h = CallHarness(decode_s=0.5)
    await h.start()
    await h.say("what are your opening hours", then_silence_ms=400)  # the turn ended
    assert h.call.replying and not h.output.frames
    noise_from = h.clock.now()
    await h.feed(tone(800, NOISE))
    noise_to = h.clock.now()
    await h.silence(3000)
    await h.stop()
    assert not [t for t, _ in h.output.frames if noise_from <= t <= noise_to]
    assert h.output.frames  # answered after the cough
    assert h.transcripts()[-1] == "what are your opening hours"
    assert [e["source"] for e in h.output.of("response")] == ["llm"]


class LoopIterations:
    """Counts event-loop iterations: a callback that schedules itself again runs exactly
    once per iteration, whatever the loop implementation."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_a_cache_hit_plays_in_the_loop_iteration_after_its_turn_ends(monkeypatch):
    """Under load one loop iteration takes milliseconds, so a hit's first frame must not
    wait iterations for anything already over: the second question, asked after the first
    reply has finished, plays as soon as the first did (it once waited two iterations
    more, for the finished reply, at 300 calls a 22-40 ms tail)."""
    iterations = LoopIterations()
    at: dict[tuple[int, str], int] = {}
    mark = TurnTimeline.mark

    def counted_mark(self: TurnTimeline, stage: str, *args: object, **kwargs: object) -> None:
        at.setdefault((self.turn, stage), iterations.count)
        mark(self, stage, *args, **kwargs)

    monkeypatch.setattr(TurnTimeline, "mark", counted_mark)
    try:
        h = await CallHarness(faqs={"opening hours": "hours"}, early_finals=True).start()
        for _ in range(2):
            await h.say("what are your opening hours", then_silence_ms=1500)
            await h.silence(1500)
        await h.stop()
    finally:
        iterations.stop()
    assert [m["source"] for m in h.metrics()] == ["cache", "cache"]
    first, second = (at[(t, "first_audio")] - at[(t, "end_of_turn")] for t in (1, 2))
    assert first <= 2
    assert second == first


async def test_a_hit_sure_enough_only_for_typed_text_is_not_replayed_to_a_speaking_caller():
    """A transcript carries recognition errors the seed's typed questions never had, so
    the router holds it to a stricter threshold (``RouteDecision.spoken_hit``): the same
    words typed are answered from the cache, spoken they go to the agent, and their early
    route does not end the turn on the short silence of a cached question."""
    h = await CallHarness(faqs={"opening hours": "hours"}, early_finals=True).start()
    h.router.typed_only = lambda text: "opening hours" in text
    await h.say("what are your opening hours", then_silence_ms=1500)
    await h.silence(1500)
    await h.text("what are your opening hours")
    await h.silence(1000)
    await h.stop()
    assert [e["source"] for e in h.output.of("response")] == ["llm", "cache"]
    assert [(r["hit"], r["reason"]) for r in h.output.of("route")] == [
        (False, "not sure enough of a transcript"), (True, "")]
    spoken = h.metrics()[0]
    assert (spoken["hit"], spoken["end_of_turn"]) == (False, "unknown")  # not "complete"


def fail_once(h: CallHarness, method: str) -> list[str]:
    """Make the call's ``method`` raise on its first use (a bug no stage catches)."""
    original = getattr(h.call, method)
    raised: list[str] = []

    def failing(*args, **kwargs):
        if not raised:
            raised.append(method)
            raise RuntimeError(f"bug in {method}")
        return original(*args, **kwargs)

    setattr(h.call, method, failing)
    return raised


async def test_a_bug_in_the_audio_handling_loses_that_pause_not_the_callers_voice():
    # An exception that escapes the audio loop (here its pause handler) ended the loop: the
    # call went deaf for good, no `error`, no answer, until the caller hung up.
    h = await CallHarness().start()
    raised = fail_once(h, "_on_pause")
    await h.say("what are your opening hours", then_silence_ms=1500)
    await h.say("are you open on sunday", then_silence_ms=1500)
    await h.stop()
    assert raised == ["_on_pause"]
    assert h.transcripts()[-1:] == ["are you open on sunday"]
    assert h.output.of("response"), "no turn was answered after the bug"
    assert "internal_error" in [e["code"] for e in h.output.of("error")]
    assert h.stats.errors["internal_error"] == 1


async def test_a_bug_in_the_text_handling_loses_that_message_not_the_next():
    h = await CallHarness().start()
    raised = fail_once(h, "_on_text")
    await h.text("hello")
    await h.text("what are your opening hours")
    await h.wait(1500)
    await h.stop()
    assert raised == ["_on_text"]
    texts = [e["text"] for e in h.output.of("transcript", final=True)]
    assert texts == ["what are your opening hours"]
    assert len(h.output.of("response")) == 1
    assert [e["code"] for e in h.output.of("error")] == ["internal_error"]


async def test_a_bug_in_the_idle_prompt_does_not_hang_up_on_the_caller_at_once():
    # The idle loop's prompt step failed (a bug between IdleWatch.next and the prompt's
    # reply): the loop started again, and IdleWatch, prompted and still quiet since the
    # same moment, gave the goodbye at once: the caller, never prompted, was hung up on
    # at the first idle period instead of getting another period of silence first.
    h = CallHarness(settings={"idle_prompt_s": 4})
    h.llm.reply = "Okay."
    await h.start()
    await h.text("hello there")
    await h.wait(1500)
    raised = fail_once(h, "_prompt_turn")
    await h.wait(4000)  # the first idle period: its prompt is lost to the bug
    assert raised == ["_prompt_turn"]
    assert [e["code"] for e in h.output.of("error")] == ["internal_error"]
    assert not h.output.of("hangup"), "hung up at the first idle period"
    assert h.call.ended is None
    await h.wait(5000)  # a second period of silence: now the goodbye
    await h.stop()
    assert [e["source"] for e in h.output.of("response")] == ["llm", "goodbye"]
    assert [e["reason"] for e in h.output.of("hangup")] == ["idle"]


async def test_a_bug_in_handling_a_partial_loses_that_partial_not_the_next():
    # The partials loop caught every exception as the recogniser's own ("partial
    # transcripts stopped", stt_failed) and ended: a bug in handling one partial (here the
    # speculation's offer) stopped partial transcripts, early routes and the barge-in's
    # confirmation by words for the rest of the call, unsupervised.
    h = await CallHarness().start()
    offer = h.call._speculation.offer
    raised: list[str] = []

    def failing(text: str) -> None:
        if not raised:
            raised.append(text)
            raise RuntimeError("bug in offer")
        offer(text)

    h.call._speculation.offer = failing  # type: ignore[method-assign]
    await h.say("what are your opening hours", then_silence_ms=1500)
    await h.say("are you open on sunday", then_silence_ms=1500)
    await h.stop()
    assert len(raised) == 1
    partials = [e["text"] for e in h.output.of("transcript", final=False)]
    assert "are you open on sunday" in partials, partials
    assert [e["code"] for e in h.output.of("error")] == ["internal_error"]
    assert "stt_failed" not in h.stats.errors


@pytest.mark.parametrize("partial", ["", "   ", "\n"])
async def test_an_empty_partial_with_nothing_typed_stops_nothing(partial):
    """Review (stop 64): a `final: false` text with no words and nothing typed before it
    barged in on the reply playing (`interrupt`, cause `text`), though it says nothing: a
    client relaying a streaming STT's interim results (the doc's use of partials; Deepgram
    sends empty ones in silence and noise) or a chat box's content as it changes (cleared)
    cut the bot off and left the caller in silence with nothing to answer. Only an empty
    final was exempt; an empty partial now stops nothing either."""
    h = CallHarness()
    h.llm.reply = LONG_REPLY
    await h.start()
    await h.text("tell me everything")
    await h.wait(1000)
    assert h.call.replying
    await h.text(partial, final=False)
    await h.wait(500)
    assert not h.output.of("interrupt") and h.call.replying
    # Typing words after it is a typed utterance as ever: it interrupts.
    await h.text("what are", final=False)
    await h.wait(100)
    assert [e["cause"] for e in h.output.of("interrupt")] == ["text"]
    await h.stop()


async def test_a_typed_utterance_emptied_before_its_final_ends_as_an_empty_turn():
    """Review (stop 64): partials typed and then an empty final (the caller typed words and
    deleted them before submitting) took a turn number and ended it with no `turn_metrics`:
    a client waiting for that utterance's metrics (Caller.say_text) waited forever, the next
    turn's number skipped one, and the partials' routing counts went to the next turn. It
    ends now as a spoken final with no words does: an empty turn, `empty` true."""
    h = CallHarness()
    await h.start()
    await h.text("where is my", final=False)
    await h.text("where is my parcel", final=False)
    await h.wait(300)
    await h.text("  ", final=True)
    await h.wait(500)
    empty = h.metrics()
    assert [m["turn"] for m in empty] == [1], empty
    assert empty[0]["empty"] is True and empty[0]["input"] == "text"
    assert empty[0]["partials_routed"] == 1  # its own partials, counted in its turn
    assert empty[0].get("source") is None and empty[0].get("route_decided_ms") is None
    await h.text("what are your hours")
    await h.wait(3000)
    assert [m["turn"] for m in h.metrics()] == [1, 2]
    assert not h.output.of("route", turn=1)
    # The emptied utterance's partials were its own: the next turn routed none.
    assert h.metrics()[1].get("partials_routed", 0) == 0, h.metrics()[1]
    await h.stop()


async def test_an_empty_typed_message_stops_nothing():
    # An empty submit (nothing typed before it) says nothing: the reply plays on; it used
    # to barge in, and the caller was left in silence with nothing to answer.
    h = CallHarness()
    h.llm.reply = LONG_REPLY
    await h.start()
    await h.text("tell me everything")
    await h.wait(1000)
    await h.text("   ")
    await h.wait(500)
    assert not h.output.of("interrupt") and h.call.replying
    await h.stop()
