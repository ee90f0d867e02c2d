"""A deterministic harness for the call engine: whole calls in milliseconds of real time.

- Caller audio encodes its words: each word is 200 ms of one constant sample value,
  silence is zeros. ``ScriptedVad`` calls a window speech when it holds any non-zero
  sample, so the VAD's verdicts are scripted by the audio itself.
- ``WordSTT`` decodes a word only from its complete 200 ms run of samples: a clipped
  first word, or audio of an earlier utterance leaking into a later one, shows in the
  transcript. Its final decode takes ``decode_s`` of the manual clock; with
  ``early_finals`` it decodes at a pause too, and that decode becomes the final.
- ``ScriptedTurnModel`` answers P(turn complete) from the words heard so far.
- ``WordTTS`` speaks 100 ms of audio per word and fails on a sentence with "FAIL".
- ``ScriptedLLM`` streams a scripted reply through the real ``Agent``.
- Time is a ``ManualClock``: the harness feeds 20 ms frames and advances it 20 ms each.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from gateway.agent import Agent, prompt_texts
from gateway.audio_bank import AudioBank, Clip
from gateway.call import Call, CallDeps
from gateway.clock import ManualClock
from gateway.providers.base import (LLMChunk, ProviderError, ToolCall, ToolSpec, Transcript,
                                    drop_queued_partials)
from gateway.responder import Responder
from gateway.settings import Settings
from gateway.stats import Stats
from gateway.vad import SileroState
from intents.types import Action, RouteDecision, miss

RATE = 16000
WORD_MS = 200
WORD_SAMPLES = RATE * WORD_MS // 1000
TTS_MS_PER_WORD = 100
FRAME_MS = 20


class Vocabulary:
    """Word <-> sample value."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._words: dict[int, str] = {}

    def value(self, word: str) -> int:
        if word not in self._values:
            value = 100 * (len(self._values) + 1)
            self._values[word], self._words[value] = value, word
        return self._values[word]

    def word(self, value: int) -> str | None:
        return self._words.get(value)

    def audio(self, text: str, rate: int = RATE) -> bytes:
        samples = [np.full(rate * WORD_MS // 1000, self.value(w), dtype="<i2")
                   for w in text.split()]
        return np.concatenate(samples).tobytes() if samples else b""


def decode_words(pcm16: bytes, vocabulary: Vocabulary) -> str:
    """Words whose complete 200 ms run of samples is in ``pcm16``."""
    samples = np.frombuffer(pcm16, dtype="<i2")
    words: list[str] = []
    if not len(samples):
        return ""
    edges = np.flatnonzero(np.diff(samples)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(samples)]])
    # Only runs long enough to be a word, picked out at once: a long buffer of changing
    # samples (noise, resampled audio) must not cost a Python step per sample.
    long_enough = (ends - starts) >= WORD_SAMPLES * 0.98
    for start, end in zip(starts[long_enough], ends[long_enough]):
        value = int(samples[start])
        if value:
            word = vocabulary.word(value)
            if word:
                words.extend([word] * int(round((end - start) / WORD_SAMPLES)))
    return " ".join(words)


class ScriptedVad:
    def __init__(self) -> None:
        self.fail_next = 0

    async def score(self, state: SileroState, windows: list[np.ndarray]) -> list[float]:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("VAD batch failed")
        return [0.95 if np.abs(w).max() > 0 else 0.02 for w in windows]


class WordSTTStream:
    def __init__(self, stt: "WordSTT") -> None:
        self._stt = stt
        self._buffer = bytearray()
        self._partials: asyncio.Queue[Transcript] = asyncio.Queue()
        self._last_partial = ""
        self._early: asyncio.Future[Transcript] | None = None
        self.paused_hints = 0
        self.closed = False

    async def send_audio(self, pcm16: bytes) -> None:
        self._buffer += pcm16
        text = decode_words(bytes(self._buffer), self._stt.vocabulary)
        if text and text != self._last_partial:
            self._last_partial = text
            self._partials.put_nowait(Transcript(text=text, final=False))

    def speech_paused(self) -> Awaitable[Transcript] | None:
        self.paused_hints += 1
        if not self._stt.early_finals:
            return None
        self._early = asyncio.ensure_future(self._decode(bytes(self._buffer)))
        # As RedecodingStream's: the early words the engine awaits (and may stop awaiting,
        # cancelled) are not the decode the final takes over.
        early = asyncio.ensure_future(_shielded(self._early))
        early.add_done_callback(lambda f: f.cancelled() or f.exception())
        return early

    def speech_resumed(self) -> None:
        if self._early is not None:
            self._early.cancel()
        self._early = None

    def finalize(self) -> Awaitable[Transcript]:
        snapshot = bytes(self._buffer)
        self._buffer.clear()
        self._last_partial = ""
        drop_queued_partials(self._partials)  # as every stream does (STTStream.partials)
        self._stt.utterances.append(snapshot)
        early, self._early = self._early, None
        return self._final(early, snapshot)

    async def _final(self, early: asyncio.Future[Transcript] | None,
                     snapshot: bytes) -> Transcript:
        text = (await early).text if early is not None else (await self._decode(snapshot)).text
        return Transcript(text=text, final=True)

    async def _decode(self, snapshot: bytes) -> Transcript:
        self._stt.decodes += 1
        try:
            await self._stt.clock.sleep(self._stt.decode_s)
        except asyncio.CancelledError:
            self._stt.decodes_stopped += 1
            raise
        if self._stt.fail_finals:
            self._stt.fail_finals -= 1
            raise ProviderError("word-stt", "decoder crashed")
        return Transcript(text=decode_words(snapshot, self._stt.vocabulary), final=False)

    async def partials(self) -> AsyncIterator[Transcript]:
        while True:
            yield await self._partials.get()

    async def reset(self) -> None:
        self._buffer.clear()
        drop_queued_partials(self._partials)

    async def aclose(self) -> None:
        self.closed = True


async def _shielded(decode: asyncio.Future[Transcript]) -> Transcript:
    return await asyncio.shield(decode)


class WordSTT:
    name = "word-stt"
    sample_rate = RATE

    def __init__(self, vocabulary: Vocabulary, clock: ManualClock, decode_s: float = 0.05,
                 early_finals: bool = False) -> None:
        self.vocabulary = vocabulary
        self.clock = clock
        self.decode_s = decode_s
        self.early_finals = early_finals
        self.decodes = 0
        self.decodes_stopped = 0  # cancelled while decoding
        self.fail_finals = 0
        self.streams: list[WordSTTStream] = []
        self.utterances: list[bytes] = []

    def open_stream(self) -> WordSTTStream:
        stream = WordSTTStream(self)
        self.streams.append(stream)
        return stream

    async def aclose(self) -> None:
        return None


class WordTTS:
    name = "word-tts"
    sample_rate = RATE

    def __init__(self) -> None:
        self.spoken: list[str] = []

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        if "FAIL" in text:
            raise ProviderError(self.name, "voice service refused the sentence")
        self.spoken.append(text)
        for _ in text.split():
            yield np.full(RATE * TTS_MS_PER_WORD // 1000, 1000, dtype="<i2").tobytes()

    async def aclose(self) -> None:
        return None


class ScriptedLLM:
    """A chat model whose reply to any request is ``reply`` (one chunk per word).

    With a ``clock``, the first chunk takes ``first_token_s`` of it and closing a stream
    ``close_s`` (an HTTP stream's teardown). ``fail_next``
    requests fail before their first chunk; ``tool_calls`` are the calls the next
    requests answer with (one each) instead of words. ``first_tokens`` records when
    (clock time) each request's first chunk was yielded."""

    name = "scripted"

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.reply = "Okay."
        self.clock = clock
        self.first_token_s = 0.0
        self.close_s = 0.0
        self.fail_next = 0
        self.tool_calls: list[ToolCall] = []
        self.requests: list[list[dict[str, Any]]] = []
        self.first_tokens: list[float] = []
        self.open_streams = 0
        self.closed_streams = 0

    async def stream(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None = None) -> AsyncIterator[LLMChunk]:
        self.requests.append([dict(m) for m in messages])
        self.open_streams += 1
        try:
            if self.clock is not None and self.first_token_s:
                await self.clock.sleep(self.first_token_s)
            if self.fail_next:
                self.fail_next -= 1
                raise ProviderError(self.name, "model overloaded")
            if self.tool_calls:
                call = self.tool_calls.pop(0)
                if self.clock is not None:
                    self.first_tokens.append(self.clock.now())
                yield LLMChunk(tool_call=call)
                return
            for index, word in enumerate(self.reply.split()):
                await asyncio.sleep(0)
                if index == 0 and self.clock is not None:
                    self.first_tokens.append(self.clock.now())
                yield LLMChunk(text=word + " ")
        finally:
            if self.clock is not None and self.close_s:
                await self.clock.sleep(self.close_s)
            self.open_streams -= 1
            self.closed_streams += 1


@dataclass
class ScriptedRouter:
    """Texts containing a FAQ key hit it; ``fail`` decides which routings raise,
    ``unfinished`` which texts' words read as unfinished (intents.completeness) and
    ``typed_only`` which hits are not sure enough for a transcript."""

    faqs: dict[str, str] = field(default_factory=dict)  # key phrase -> entry id
    fail: Callable[[str, bool], bool] = lambda text, urgent: False
    unfinished: Callable[[str], bool] = lambda text: False
    # Texts the judge is sure enough of as typed text but not as a transcript.
    typed_only: Callable[[str], bool] = lambda text: False
    calls: list[tuple[str, bool]] = field(default_factory=list)

    async def __call__(self, text: str, urgent: bool) -> RouteDecision:
        self.calls.append((text, urgent))
        await asyncio.sleep(0)
        if self.fail(text, urgent):
            raise RuntimeError(f"router broke on {text!r}")
        for phrase, entry in self.faqs.items():
            if phrase in text:
                return RouteDecision(text=text, intent=entry, action=Action.ANSWER, hit=True,
                                     entry_id=entry, answer=f"answer {entry}", score=0.9,
                                     finished=not self.unfinished(text),
                                     spoken_hit=not self.typed_only(text))
        return miss(text, "no entry")


class ScriptedTurnModel:
    """P(turn complete) for the words in the audio: ``incomplete`` endings score low.

    Takes ``delay_s`` of the manual clock; ``fail`` makes it raise."""

    def __init__(self, vocabulary: Vocabulary, clock: ManualClock, delay_s: float = 0.02,
                 incomplete: tuple[str, ...] = ("is", "to", "um", "and")) -> None:
        self.vocabulary = vocabulary
        self.clock = clock
        self.delay_s = delay_s
        self.incomplete = incomplete
        self.fail = False
        self.heard: list[str] = []

    async def __call__(self, pcm16: bytes) -> float:
        text = decode_words(pcm16, self.vocabulary)
        self.heard.append(text)
        await self.clock.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("turn model crashed")
        return 0.01 if text.split()[-1:] and text.split()[-1] in self.incomplete else 0.9


class RecordingOutput:
    encoding = "pcm16"

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock
        self.events: list[dict[str, Any]] = []
        self.frames: list[tuple[float, bytes]] = []
        self.interrupted_at: list[float] = []  # clock time of every interrupt
        self._recorded = asyncio.Event()  # set on everything recorded, for ``until``

    async def send_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._recorded.set()

    async def send_audio(self, frame: bytes) -> None:
        self.frames.append((self._clock.now(), frame))
        self._recorded.set()

    async def interrupt(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.interrupted_at.append(self._clock.now())
        self._recorded.set()

    async def until(self, condition: Callable[[], object], timeout: float = 30.0) -> bool:
        """Wait, the clock standing still, until ``condition()`` holds: checked again each
        time something is recorded (say the audio a real voice's network answer brought),
        no polling. False if it never held within ``timeout`` s, a bound on a wait that
        would otherwise hang, never a pace."""
        async def holds() -> None:
            while not condition():
                self._recorded.clear()
                await self._recorded.wait()

        try:
            await asyncio.wait_for(holds(), timeout)
        except TimeoutError:
            return False
        return True

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind
                and all(e.get(k) == v for k, v in match.items())]


def numbered_frames(ms: int) -> bytes:
    """Reply audio whose every 20 ms frame holds its own number (1, 2, ...)."""
    per_frame = RATE * FRAME_MS // 1000
    return np.repeat(np.arange(1, ms // FRAME_MS + 1, dtype="<i2"), per_frame).tobytes()


def frame_number(frame: bytes) -> int:
    return int(np.frombuffer(frame, dtype="<i2")[0])


def frame_numbers(messages: list[bytes]) -> list[int]:
    """The number of every 20 ms frame of ``numbered_frames`` audio received as
    ``messages`` (a message carries up to ``playout_chunk_ms`` of frames)."""
    size = RATE * FRAME_MS // 1000 * 2
    return [frame_number(m[i:i + size]) for m in messages for i in range(0, len(m), size)]


def tone(ms: int, value: int = 500, rate: int = RATE) -> bytes:
    return np.full(rate * ms // 1000, value, dtype="<i2").tobytes()


def voice_that_fails_on_cue(h: CallHarness, sentence: str) -> asyncio.Event:
    """The harness's voice, except that its synthesis of ``sentence`` (the first time)
    waits for the returned event to be set and then fails: the voice service's error
    response arrives then, not on the manual clock."""
    speak = h.tts.synthesize
    cue = asyncio.Event()
    failed: list[str] = []

    async def synthesize(text: str) -> AsyncIterator[bytes]:
        if text == sentence and not failed:
            failed.append(text)
            await cue.wait()
            raise ProviderError("word-tts", "the voice service refused the sentence")
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    return cue


class CallHarness:
    def __init__(self, *, decode_s: float = 0.05, settings: dict[str, Any] | None = None,
                 faqs: dict[str, str] | None = None, early_finals: bool = False,
                 turn_model: bool = False, answer_ms: int = 1000) -> None:
        self.clock = ManualClock()
        self.vocabulary = Vocabulary()
        self.settings = Settings.load({"min_speech_ms": 120, "barge_in_min_speech_ms": 400,
                                       "end_of_turn_silence_ms": 300, "playout_lead_ms": 60,
                                       # a message per frame: timing asserts read frames
                                       "playout_chunk_ms": 20,
                                       "route_min_words": 2, **(settings or {})}, environ={})
        self.vad = ScriptedVad()
        self.stt = WordSTT(self.vocabulary, self.clock, decode_s, early_finals=early_finals)
        self.turn_model = ScriptedTurnModel(self.vocabulary, self.clock) if turn_model else None
        self.tts = WordTTS()
        self.llm = ScriptedLLM(self.clock)
        self.agent = Agent(self.llm, filler_after_s=None)  # type: ignore[arg-type]
        self.router = ScriptedRouter(faqs=dict(faqs or {}))
        self.stats = Stats()
        prompts = AudioBank(rates=(RATE,), encoded=())
        for key, text in prompt_texts(self.settings.greeting).items():
            prompts.add(Clip(key, text, tone(300, 700), RATE))
        cache = AudioBank(rates=(RATE,), encoded=())
        for entry in self.router.faqs.values():
            cache.add(Clip(entry, f"answer {entry}", numbered_frames(answer_ms), RATE))
        self.responder = Responder(self.agent, self.tts, prompts, cache,  # type: ignore[arg-type]
                                   tts_gap_timeout_s=self.settings.tts_gap_timeout_s)
        self.output = RecordingOutput(self.clock)
        self.deps = CallDeps(settings=self.settings, vad=self.vad, stt=self.stt,
                             responder=self.responder, router=self.router, stats=self.stats,
                             new_conversation=self.agent.new_conversation, clock=self.clock,
                             turn_model=self.turn_model)
        self.call = Call(self.deps, self.output, RATE, call_id="test-call")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> "CallHarness":
        self._task = asyncio.create_task(self.call.run())
        await self.clock.settle()
        return self

    async def stop(self) -> None:
        self.call.stop()
        assert self._task is not None
        await asyncio.wait_for(self._task, 5)

    async def feed(self, pcm16: bytes) -> None:
        """Stream caller audio in real time: a 20 ms frame, then 20 ms pass."""
        step = RATE * FRAME_MS // 1000 * 2
        for i in range(0, len(pcm16), step):
            self.call.feed_audio(pcm16[i:i + step])
            await self.clock.advance(FRAME_MS / 1000)

    async def say(self, text: str, then_silence_ms: int = 600) -> None:
        await self.feed(self.vocabulary.audio(text))
        await self.silence(then_silence_ms)

    async def silence(self, ms: int) -> None:
        await self.feed(bytes(RATE * ms // 1000 * 2))

    async def text(self, text: str, final: bool = True) -> None:
        self.call.feed_text(text, final)
        await self.clock.settle()

    async def wait(self, ms: int) -> None:
        """Let time pass with the caller silent (a real client keeps sending frames)."""
        await self.silence(ms)

    def transcripts(self) -> list[str]:
        return [e["text"] for e in self.output.of("transcript", final=True) if "turn" in e]

    def metrics(self) -> list[dict[str, Any]]:
        return self.output.of("turn_metrics")


async def assert_a_stalled_voice_fails_the_turn(
        h: CallHarness, stalled_at: float, message: str, sources: list[str], *,
        timeout_s: float = 4.0, meanwhile: Callable[[], object] = lambda: True) -> None:
    """The voice of turn 1's reply stalled at ``stalled_at`` (a time of ``h.clock``). The
    call stays silent for ``timeout_s`` of its clock: a frame before that no error yet
    (and ``meanwhile()`` holds); then the turn fails as ``tts_failed`` (counted once,
    ``message`` in the error), the apology's first frame ``timeout_s`` after the stall, and
    the call's responses so far are ``sources``."""
    await h.wait(round((stalled_at + timeout_s - h.clock.now()) * 1000) - FRAME_MS)
    assert h.output.of("error") == [], f"failed before the timeout: {h.output.of('error')}"
    assert meanwhile(), "before the timeout"
    sent = len(h.output.frames)
    await h.wait(2 * FRAME_MS)
    errors = h.output.of("error")
    assert [(e["code"], e["turn"]) for e in errors] == [("tts_failed", 1)], errors
    assert message in errors[0]["message"], errors[0]["message"]
    heard = [e["source"] for e in h.output.of("response")]
    assert heard == sources, heard
    assert len(h.output.frames) > sent, "no apology audio"
    apology_after = h.output.frames[sent][0] - stalled_at
    assert abs(apology_after - timeout_s) <= 0.001, f"the apology {apology_after} s after the stall"
    assert h.stats.errors["tts_failed"] == 1, h.stats.errors
