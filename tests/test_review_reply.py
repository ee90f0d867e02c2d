import asyncio
from gateway.timeline import TurnTimeline
from tests.call_harness import CallHarness


async def test_review_no_more_than_the_prefetch_bound_of_sentences_is_synthesized_ahead():
    # responder.py: "A prefetched sentence may run this far ahead of playback" (2).
    h = CallHarness()
    h.llm.reply = "One is here. Two is here. Three is here. Four is here. Five is here."
    await h.start()
    turn = h.call._turn(TurnTimeline(99, clock=h.clock), "hello", None)
    replies = h.call._responder._agent_reply(turn)
    first = await replies.__anext__()  # the sentence playing; the player stalls on it
    await h.clock.settle(200)
    print(h.tts.spoken)
    assert first.text.startswith("One")
    ahead = [t for t in h.tts.spoken if not t.startswith("One")]
    await replies.aclose()
    await h.stop()
    assert len(ahead) <= 2, ahead


async def test_review_a_sentence_whose_audio_comes_during_a_hold_is_not_announced_after_the_interrupt():
    # The first sentence has played; the second's synthesis is late. A cough holds the
    # reply (interrupt). The second sentence's audio then arrives: held, none of it
    # leaves, yet its `response` (announced "with its first audio": what the bot said)
    # went to the client after the interrupt, and words then stopped the reply for good:
    # the client shows a sentence the caller never heard.
    from tests.call_harness import tone

    h = CallHarness(settings={"turn_continuation_ms": 0})
    h.llm.reply = "Hello there friend. Second sentence comes late."
    speak = h.tts.synthesize
    cue = asyncio.Event()

    async def synthesize(text: str):
        if text.startswith("Second"):
            await cue.wait()
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize
    await h.start()
    await h.text("tell me")
    await h.wait(600)  # the first sentence (300 ms) has played; the second is not there
    assert [e["text"] for e in h.output.of("response")] == ["Hello there friend."]
    await h.feed(tone(450, 77))  # a cough: held
    assert h.call._held is not None and h.output.of("interrupt")
    cue.set()  # the late sentence's audio arrives while held
    await h.clock.settle()
    events = [e["type"] for e in h.output.events]
    after = events[events.index("interrupt"):]
    await h.stop()
    assert "response" not in after, h.output.events[-3:]


async def test_review_a_handoff_decided_during_a_hold_is_not_sent_after_the_interrupt():
    # A slow LLM: the filler has played, a cough holds the reply, and meanwhile every LLM
    # fails: the agent hands off. The handoff segment is announced while held: the
    # `handoff` event (on the native protocol the transfer's contract) goes out after the
    # interrupt. The caller's words then stop the reply for good, yet the client was told
    # to transfer the call.
    from gateway.agent import Agent
    from tests.call_harness import tone

    h = CallHarness(settings={"turn_continuation_ms": 0}, decode_s=1.5)
    h.responder._agent = Agent(h.llm, filler_after_s=0.3)  # type: ignore[arg-type]
    h.llm.first_token_s = 1.6
    h.llm.fail_next = 1
    await h.start()
    await h.text("help me")
    await h.wait(700)  # the filler (300 ms) has played; the LLM is still thinking
    assert [e["source"] for e in h.output.of("response")] == ["filler"]
    await h.feed(tone(450, 77))  # a cough: held
    assert h.call._held is not None and h.output.of("interrupt")
    await h.wait(500)  # the LLM fails meanwhile (t=1.6 s): the agent hands off
    assert h.call._held is not None  # the cough's final is still decoding
    await h.text("no I want to cancel my card")  # words: the interruption is confirmed
    await h.wait(1500)
    events = [e["type"] for e in h.output.events]
    after = events[events.index("interrupt"):]
    await h.stop()
    assert "resume" not in after
    assert "handoff" not in after, after
