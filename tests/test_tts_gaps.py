"""A synthesis that stalls mid-stream (responder.tts_audio's gap timeout), and the clock's
``Timeouts`` it runs on, driven by a ManualClock: no test here waits in real time."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from gateway.clock import Expired, ManualClock, Timeouts, deadline
from gateway.providers.base import ProviderError
from gateway.audio_bank import AudioBank
from gateway.responder import tts_audio
from gateway.settings import Settings

RATE = 16000
CHUNK = b"\x01\x00" * 160  # 10 ms


class PausingVoice:
    """A voice whose chunks come ``gaps_s`` apart on the clock (``None``: it stalls for
    good, its connection open); ``closed`` once its stream is closed."""

    name = "pausing"
    sample_rate = RATE
    audio_id = "pausing"

    def __init__(self, clock: ManualClock, gaps_s: list[float | None]) -> None:
        self.clock = clock
        self.gaps_s = gaps_s
        self.sent_at: list[float] = []
        self.closed = False

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        try:
            self.sent_at.append(self.clock.now())
            yield CHUNK
            for gap in self.gaps_s:
                if gap is None:
                    await asyncio.Event().wait()
                await self.clock.sleep(gap)
                self.sent_at.append(self.clock.now())
                yield CHUNK
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


async def drain(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


async def test_a_synthesis_that_stops_sending_fails_at_the_gap_timeout_not_before():
    # The voice sent its first audio, then nothing with its stream open: before, the
    # caller heard silence until the provider's read timeout (30 s for ElevenLabs) or
    # for good. It fails as the gap passes 4 s on the clock, and the stream is closed.
    clock = ManualClock()
    voice = PausingVoice(clock, [0.5, None])
    audio = asyncio.ensure_future(drain(tts_audio(voice, "Our branches open at nine.", RATE,
                                                  clock=clock, gap_timeout_s=4.0)))
    try:
        await clock.advance(0.5)
        assert len(voice.sent_at) == 2  # the second chunk came; then the stall
        await clock.advance(3.99)
        assert not audio.done()
        await clock.advance(0.02)
        assert audio.done(), "no failure past the gap timeout"
        with pytest.raises(ProviderError, match=r"pausing: no audio for 4 s in the middle"):
            audio.result()
        assert voice.closed and clock.sleeping == 0
    finally:
        audio.cancel()


async def test_slow_steady_audio_and_a_slow_listener_are_no_stall():
    # Gaps just under the timeout, 12 s in all, are no stall: only a gap counts. Nor is
    # the time the consumer keeps a chunk (the playout pacing a prompt synthesized
    # on the spot): only the wait for the voice is timed.
    clock = ManualClock()
    voice = PausingVoice(clock, [3.9, 3.9, 3.9])
    got: list[bytes] = []

    async def slow_listener() -> None:
        async for chunk in tts_audio(voice, "Hello.", RATE, clock=clock, gap_timeout_s=4.0):
            got.append(chunk)
            await clock.sleep(10.0)

    listening = asyncio.ensure_future(slow_listener())
    await clock.advance(60.0)
    assert listening.done() and listening.exception() is None
    assert len(got) == 4 and voice.closed and clock.sleeping == 0


async def test_a_barge_in_during_a_gap_stays_a_cancel():
    clock = ManualClock()
    voice = PausingVoice(clock, [None])
    audio = asyncio.ensure_future(drain(tts_audio(voice, "Hello.", RATE, clock=clock,
                                                  gap_timeout_s=4.0)))
    await clock.advance(2.0)
    audio.cancel()  # the caller barged in
    await clock.settle()
    assert audio.cancelled() and voice.closed
    await clock.advance(10.0)
    assert clock.sleeping == 0


class SilentVoice:
    """A voice that never sends its first audio, its stream open (Piper's pool saturated
    by STT decodes, or Piper hung); ``own_deadline``: it times its first audio itself, as
    ElevenLabs does, and sends it ``first_after_s`` after the request."""

    name = "silent"
    sample_rate = RATE
    audio_id = "silent"

    def __init__(self, clock: ManualClock, own_deadline: bool = False,
                 first_after_s: float | None = None) -> None:
        self.clock = clock
        self.times_first_audio = own_deadline
        self.first_after_s = first_after_s
        self.closed = False

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        try:
            if self.first_after_s is None:
                await asyncio.Event().wait()
            await self.clock.sleep(self.first_after_s)
            yield CHUNK
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


async def test_a_voice_that_never_sends_its_first_audio_fails_at_the_gap_timeout():
    """Review (stop 60): responder.tts_audio timed only the gaps after a first chunk; the
    wait for the first was left to the provider (ElevenLabs' first_audio_timeout_s). Piper
    has none: a sentence queued behind STT decodes on the pool they share, or a Piper that
    hung, kept the caller in silence for good. Every voice without a first-audio deadline
    of its own now has tts_gap_timeout_s for it too: tts_failed, the apology."""
    clock = ManualClock()
    voice = SilentVoice(clock)
    audio = asyncio.ensure_future(drain(tts_audio(voice, "Our branches open at nine.", RATE,
                                                  clock=clock, gap_timeout_s=4.0)))
    try:
        await clock.advance(3.99)
        assert not audio.done()
        await clock.advance(0.02)
        assert audio.done(), "a voice with no first audio keeps the line silent for good"
        with pytest.raises(ProviderError, match=r"silent: no first audio within 4 s"):
            audio.result()
        assert voice.closed
        await clock.settle()
        assert clock.sleeping == 0
    finally:
        audio.cancel()


async def test_a_sentence_fetched_ahead_is_timed_once_its_reply_waits_for_it():
    """Review (stop 60): the first-audio bound of a sentence fetched ahead starts when its
    reply reads it (``WANTED``), as ElevenLabs' does: before that, the caller hears the
    sentence before it, and a wait behind the pool is no stall."""
    from gateway.responder import _Prefetched

    clock = ManualClock()
    voice = SilentVoice(clock)
    fetch = _Prefetched(tts_audio(voice, "And on Saturdays at ten.", RATE, clock=clock,
                                  gap_timeout_s=4.0), place=1)
    await clock.advance(30.0)  # the sentence before it plays
    assert not fetch.task.done()
    reader = asyncio.ensure_future(drain(fetch.audio()))
    try:
        await clock.advance(3.99)
        assert not reader.done()
        await clock.advance(0.02)
        assert reader.done()
        with pytest.raises(ProviderError, match=r"no first audio within 4 s"):
            reader.result()
        await clock.settle()
        assert voice.closed and fetch.task.done() and clock.sleeping == 0
    finally:
        reader.cancel()
        fetch.task.cancel()


async def test_a_voice_that_times_its_own_first_audio_keeps_its_budget():
    # ElevenLabs bounds its first audio itself (elevenlabs_first_audio_timeout_s, which an
    # operator may set past tts_gap_timeout_s, and which a slot's wait counts in): not
    # cut short here.
    clock = ManualClock()
    voice = SilentVoice(clock, own_deadline=True, first_after_s=6.0)
    audio = asyncio.ensure_future(drain(tts_audio(voice, "Hello.", RATE, clock=clock,
                                                  gap_timeout_s=4.0)))
    await clock.advance(6.0)
    await clock.settle()
    assert audio.done() and len(audio.result()) >= 1 and voice.closed


async def test_timeouts_time_each_wait_and_nothing_between_them():
    clock = ManualClock()
    timeouts = Timeouts(clock)
    items: asyncio.Queue[int] = asyncio.Queue()
    got: list[int] = []

    async def read() -> None:
        while True:
            got.append(await timeouts.within(2.0, items.get()))
            await clock.sleep(5.0)  # the reader's own time, untimed

    reader = asyncio.ensure_future(read())
    try:
        await clock.advance(1.9)
        items.put_nowait(1)
        await clock.advance(5.0 + 1.9)  # held 5 s, then waited 1.9 s
        items.put_nowait(2)
        await clock.advance(5.0 + 1.99)
        assert got == [1, 2] and not reader.done()
        await clock.advance(0.02)
        assert reader.done() and isinstance(reader.exception(), Expired)
        assert timeouts.expired
    finally:
        reader.cancel()
        timeouts.close()


async def test_timeouts_a_shorter_wait_after_a_longer_one_ends_on_its_own_time():
    # The timer sleeping towards a long wait's end is replaced when a shorter one follows.
    clock = ManualClock()
    timeouts = Timeouts(clock)
    start = clock.now()
    assert await timeouts.within(30.0, asyncio.sleep(0, "quick")) == "quick"
    waiting = asyncio.ensure_future(timeouts.until(start + 1.0, asyncio.Event().wait()))
    await clock.advance(0.99)
    assert not waiting.done()
    await clock.advance(0.01)
    assert waiting.done() and isinstance(waiting.exception(), Expired)
    assert clock.now() == start + 1.0
    timeouts.close()
    await clock.settle()
    assert clock.sleeping == 0


async def test_a_timeout_the_timed_work_raises_is_not_the_clocks():
    # Callers catch ``Expired`` alone: a TimeoutError of the work itself (an HTTP read's)
    # must reach them as it was, from ``Timeouts`` and from ``deadline`` alike.
    clock = ManualClock()

    async def times_out() -> None:
        raise TimeoutError("the work's own")

    timeouts = Timeouts(clock)
    with pytest.raises(TimeoutError, match="the work's own") as raised:
        await timeouts.within(2.0, times_out())
    assert not isinstance(raised.value, Expired) and not timeouts.expired
    timeouts.close()
    with pytest.raises(TimeoutError, match="the work's own") as raised:
        async with deadline(clock, 2.0):
            await times_out()
    assert not isinstance(raised.value, Expired)
    await clock.settle()


class RecordingVoice:
    """A voice that says whatever it is asked (10 ms of audio a word), noting each text."""

    name = "recording"
    sample_rate = RATE
    audio_id = "recording"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        self.asked.append(text)
        for _ in text.split():
            yield CHUNK

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(("sentence", "said"), [
    ("Done \U0001F44D your card is blocked \u2705.", "Done your card is blocked."),
    ("Glad I could help! \U0001F60A\U0001F44B\U0001F3FD", "Glad I could help!"),
    ("Your family \U0001F468\u200d\U0001F469\u200d\U0001F467 and the UK \U0001F1EC\U0001F1E7 "
     "are covered \u2764\ufe0f \u2b50", "Your family and the UK are covered"),
    ("Press 1\ufe0f\u20e3 for cards.", "Press 1 for cards."),
    ("Great\U0001F44Ddone.", "Great done."),  # between two words: a space, not "Greatdone"
    # A run of them between two words, too (a skin tone, two, a flag's two letters, spaced).
    ("Great\U0001F44D\U0001F3FDdone.", "Great done."),
    ("Great\U0001F44D \U0001F44Ddone.", "Great done."),
    ("UK\U0001F1EC\U0001F1E7flag.", "UK flag."),
    # Symbols a voice says as meant, and a joiner inside a word, are said.
    ("It is 25°C, © 2026, item \u2460 (\u0915\u094d\u200d\u0937).",
     "It is 25°C, © 2026, item \u2460 (\u0915\u094d\u200d\u0937)."),
])
async def test_emoji_in_a_reply_are_not_read_aloud(sentence, said):
    """Review (stop 66): a reply's emoji went to the voice as written, and the default
    voice reads them by name: Piper (espeak's English dictionary) says "😊" as "smiling
    face with smiling eyes", "Great 👍 done." as "Great thumbs up done", "I ❤️ you" as
    "I red heart you". The model is told to write none (the agent's system prompt), but
    one that slips through was read out to the caller. Every synthesis of a call now asks
    the voice for the sentence without them (the response event keeps the text)."""
    voice = RecordingVoice()
    audio = await drain(tts_audio(voice, sentence, RATE))
    assert voice.asked == [said]
    assert audio


async def test_a_sentence_of_emoji_alone_asks_the_voice_for_nothing():
    """Review (stop 66): "Glad I could help! 😊" is two pieces, the second an emoji alone:
    read by name as a sentence of its own (Piper), or sent to a cloud voice as a request
    with nothing to say. Nothing is asked of the voice for it now, and no failure."""
    voice = RecordingVoice()
    assert await drain(tts_audio(voice, " \U0001F60A \U0001F44D\U0001F3FD", RATE)) == []
    assert voice.asked == []


@pytest.mark.parametrize("streaming", [False, True], ids=["local-voice", "cloud-voice"])
def test_a_seeded_answers_emoji_are_not_rendered_by_name(streaming):
    """Review (stop 66, second look): a reply's emoji were kept from the voice, but a seeded
    answer ("We're open 9 to 5 😊") was rendered as written, read by name on every cache
    hit. Its audio is rendered without them now; an answer of emoji alone as written (read
    by name beats a silent answer)."""
    from gateway.seeding import blocking_renderer

    asked: list[str] = []

    class LocalVoice:
        name, sample_rate = "local", 16000

        def synthesize_all(self, text: str) -> bytes:
            asked.append(text)
            return b"\x00\x00"

    class CloudVoice:
        name, sample_rate = "cloud", 16000

        async def synthesize(self, text: str):
            asked.append(text)
            yield b"\x00\x00"

    loop = asyncio.new_event_loop()
    try:
        render = blocking_renderer(CloudVoice() if streaming else LocalVoice(), loop)
        render("We're open 9 to 5 \U0001F60A")
        render("\U0001F44D")
    finally:
        loop.close()
    assert asked == ["We're open 9 to 5", "\U0001F44D"]


async def test_a_prompts_emoji_are_not_rendered_by_name():
    """Review (stop 66, second look): a configured greeting ("Hi 👋, thanks for calling")
    was pre-rendered as written ("Hi waving hand"), while a live synthesis of the same
    words left the emoji out: the greeting sounded different by the path that played it."""
    from gateway.runtime import Runtime

    voice = RecordingVoice()
    runtime = Runtime.__new__(Runtime)  # only what render_prompts reads
    runtime.settings = Settings(greeting="Hi \U0001F44B, thanks for calling")
    runtime.tts, runtime.load_times_s = voice, {}
    runtime.prompts = AudioBank()
    await runtime.render_prompts()
    assert "Hi, thanks for calling" in voice.asked
    assert runtime.prompts.clip("greeting").text == "Hi \U0001F44B, thanks for calling"
