"""The real deepgram-sdk live client against a local fake of /v1/listen."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from typing import Iterator

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from gateway.providers.base import ProviderError, SpeechToText, STTStream, Transcript
from gateway.providers.deepgram_stt import DeepgramSTT
from gateway.call import Call
from gateway.clock import ManualClock
from tests.call_harness import RATE, WORD_MS, CallHarness
from tests.fakes.deepgram_server import FakeDeepgram, SilentDeepgram, StallingProxy
from tests.fakes.server import ServerThread

FRAME = 320  # samples: 20 ms at 16 kHz
VOICE = b"\x10\x00" * FRAME
SILENCE = b"\x00\x00" * FRAME


@pytest.fixture
def deepgram() -> Iterator[tuple[FakeDeepgram, ServerThread]]:
    fake = FakeDeepgram()
    with ServerThread(fake.app) as server:
        yield fake, server


def stt(server: ServerThread, key: str = "test-key", **kwargs) -> DeepgramSTT:
    return DeepgramSTT(key, base_url=server.ws_url, **{"finalize_timeout_s": 5.0, **kwargs})


async def send(stream: STTStream, frame: bytes, count: int) -> None:
    """Frame by frame, each on the wire before the next (the stream would otherwise send
    what queued up as one message, and the fake reveal words per message)."""
    for _ in range(count):
        await stream.send_audio(frame)
        outbox = getattr(stream, "_outbox", None)
        for _ in range(5000):  # 10 s: a bound on a hang, never a pace (a loaded machine)
            if outbox is None or outbox.empty():
                break
            await asyncio.sleep(0.002)


async def until(predicate, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


async def test_interim_results_are_partials_and_finalize_returns_the_final(deepgram):
    fake, server = deepgram
    fake.ms_per_word = 40  # one word every two frames
    recognizer = stt(server)
    assert isinstance(recognizer, SpeechToText)
    stream = recognizer.open_stream()
    assert isinstance(stream, STTStream)
    partials: list[Transcript] = []

    async def read() -> None:
        async for partial in stream.partials():
            partials.append(partial)

    reader = asyncio.create_task(read())
    await send(stream, VOICE, 10)  # 200 ms: all five words revealed, no endpoint yet
    assert await until(lambda: len(partials) == 5)
    assert [p.text for p in partials] == ["what", "what are", "what are your", "what are your opening",
                                          "what are your opening hours"]
    assert not any(p.final for p in partials)

    final = await stream.finalize()
    assert final == Transcript("what are your opening hours", final=True)
    session = fake.sessions[0]
    assert session.controls["Finalize"] == 1
    assert session.query["interim_results"] == "true" and session.query["encoding"] == "linear16"
    assert any(m.get("from_finalize") for m in session.sent)

    await stream.aclose()
    await reader  # partials() ends when the stream closes
    assert session.closed_by_client_message and session.sent[-1]["type"] == "Metadata"
    await recognizer.aclose()


async def test_a_partial_still_unread_at_the_cut_is_not_the_next_utterances(deepgram):
    # Review: interim results queued before a turn's cut were read after it, by a consumer
    # a loop pass behind, as the next utterance's.
    fake, server = deepgram
    fake.ms_per_word = 40
    recognizer = stt(server)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)  # two words revealed, nobody reading yet
    assert await until(lambda: stream._partials.qsize() == 2)
    assert (await stream.finalize()).text == "what are"
    assert stream._partials.empty()
    await stream.aclose()
    await recognizer.aclose()


async def test_speech_final_and_utterance_end_make_finalize_immediate(deepgram):
    fake, server = deepgram
    fake.utterances = ["hello there", "second question please"]
    fake.ms_per_word = 40
    recognizer = stt(server, endpointing_ms=100, utterance_end_ms=200)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)
    await send(stream, SILENCE, 15)  # 300 ms: endpoint at 100 ms, UtteranceEnd after
    assert await until(lambda: stream.endpoint.is_set())
    session = fake.sessions[0]
    assert await until(lambda: any(m["type"] == "UtteranceEnd" for m in session.sent))
    assert any(m["type"] == "Results" and m["speech_final"] for m in session.sent)

    assert await stream.finalize() == Transcript("hello there", final=True)
    assert session.controls["Finalize"] == 0  # Deepgram had already endpointed

    # The next utterance starts clean.
    await send(stream, VOICE, 6)
    assert (await stream.finalize()).text == "second question please"
    assert session.controls["Finalize"] == 1
    await stream.aclose()
    await recognizer.aclose()


async def test_reset_drops_the_utterance_and_late_results(deepgram):
    fake, server = deepgram
    fake.utterances = ["cough", "real words here"]
    fake.ms_per_word = 40
    recognizer = stt(server)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 2)
    session_ready = await until(lambda: fake.sessions and fake.sessions[0].sent)
    assert session_ready
    await stream.reset()  # its Finalize reply (for the old audio) must be ignored
    await send(stream, VOICE, 6)
    assert (await stream.finalize()).text == "real words here"
    await stream.aclose()
    await recognizer.aclose()


async def test_keepalive_is_sent_while_no_audio_flows(deepgram):
    fake, server = deepgram
    recognizer = stt(server, keepalive_s=0.05)
    stream = recognizer.open_stream()
    assert await until(lambda: fake.sessions and fake.sessions[0].controls["KeepAlive"] >= 2)
    await stream.aclose()
    await recognizer.aclose()


async def test_refused_connection_is_a_provider_error_without_the_key(deepgram):
    _, server = deepgram
    recognizer = stt(server, key="wrong-secret-key")
    stream = recognizer.open_stream()
    assert await until(lambda: stream.closed)
    with pytest.raises(ProviderError) as info:
        await stream.send_audio(VOICE)
    assert "wrong-secret-key" not in str(info.value)
    await stream.aclose()
    await recognizer.aclose()


async def test_the_realistic_fake_paces_interims_and_delays_finals() -> None:
    """What bench/capacity.py relies on: one interim per second of audio at most, and a
    final no sooner than 150 ms after the end of speech (the real service's latency)."""
    import json
    import time

    from websockets.asyncio.client import connect

    fake = FakeDeepgram().realistic()
    fake.utterances = [" ".join(f"w{i}" for i in range(40))]
    fake.ms_per_word = 100
    with ServerThread(fake.app) as server:
        url = f"{server.ws_url}/v1/listen?sample_rate=16000&endpointing=300"
        async with connect(url, additional_headers={"Authorization": "Token test-key"}) as ws:
            for _ in range(150):  # 3 s of speech (-18 dBFS), sent at once
                await ws.send(b"\x00\x10" * FRAME)
            spoken_at = time.monotonic()
            for _ in range(20):  # 400 ms of a quiet line (-66 dBFS): the endpoint
                await ws.send(VOICE)
            messages = []
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                messages.append((time.monotonic(), message))
                if message.get("is_final"):
                    break
    interims = [m for _, m in messages if not m["is_final"]]
    finished_at, final = messages[-1]
    assert 1 <= len(interims) <= 3  # 30 words recognised, shown at most once a second
    assert final["speech_final"] and len(final["channel"]["alternatives"][0]["words"]) == 30
    assert finished_at - spoken_at >= 0.15


async def test_audio_queued_while_the_socket_was_busy_goes_out_in_few_messages(deepgram) -> None:
    fake, server = deepgram
    stream = stt(server).open_stream()
    for _ in range(50):  # one second queued at once (a busy loop, a slow socket)
        await stream.send_audio(VOICE)
    assert await until(lambda: fake.sessions and fake.sessions[0].audio_bytes == 50 * len(VOICE))
    await stream.aclose()
    # 100 ms a message at most: ten messages, not fifty; every byte arrived, in order.
    assert fake.sessions[0].messages <= 10


# ---------------------------------------------------------------- a malformed message


def results_json(**fields) -> str:
    """A ``Results`` message as the service sends it (an interim of "noise" over the first
    100 ms), with ``fields`` replaced; a field set to ``...`` is left out."""
    message = {"type": "Results", "channel_index": [0, 1], "start": 0.0, "duration": 0.1,
               "is_final": False, "speech_final": False, "from_finalize": False,
               "channel": {"alternatives": [{"transcript": "noise", "confidence": 0.9,
                                             "words": []}]},
               "metadata": {"request_id": "r", "model_uuid": "m",
                            "model_info": {"name": "n", "version": "v", "arch": "a"}}}
    message.update(fields)
    return json.dumps({key: value for key, value in message.items() if value is not ...})


async def two_words_heard(deepgram):
    """A stream whose caller is two words into "what are your opening hours" (a word every
    40 ms of voice), before the service's next messages: (fake, recognizer, stream)."""
    fake, server = deepgram
    fake.ms_per_word = 40
    recognizer = stt(server)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)
    assert await until(lambda: stream._text() == "what are")
    return fake, recognizer, stream


@pytest.mark.parametrize(("garbage", "kind", "field"), [
    (results_json(channel=None), "Results", "channel"),
    (results_json(channel=...), "Results", "channel"),
    (results_json(channel={"alternatives": "noise"}), "Results", "channel.alternatives"),
    (results_json(channel={"alternatives": [None]}), "Results", "channel.alternatives[0].transcript"),
    (results_json(start=...), "Results", "start"),
    (results_json(duration="0.1 s"), "Results", "duration"),
    (json.dumps({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": "late"}),
     "UtteranceEnd", "last_word_end"),
    (results_json(channel="noise"), None, "type"),  # no message the SDK knows: it gives None
    ("not json {", None, None),  # dropped by the SDK itself (its own warning)
], ids=["channel-null", "channel-missing", "alternatives-not-a-list", "alternative-null",
        "start-missing", "duration-not-a-number",
        "utterance-end-time-not-a-number", "unknown-shape", "not-json"])
async def test_a_malformed_message_is_dropped_and_the_utterance_recognised(
        deepgram, caplog, garbage, kind, field):
    """The service sends a malformed message mid-utterance: that message is dropped (and
    logged), never the socket: the utterance's words come from the good ones."""
    caplog.set_level(logging.INFO, logger="voicegate")
    fake, recognizer, stream = await two_words_heard(deepgram)
    fake.garbage = [garbage] * 3  # one before each of the next three interims
    await send(stream, VOICE, 8)
    final = await stream.finalize()
    kept = stream.connected and len(fake.sessions) == 1
    await stream.aclose()
    await recognizer.aclose()
    assert final == Transcript("what are your opening hours", final=True)
    assert kept and not fake.garbage
    logged = [r.fields for r in caplog.records  # type: ignore[attr-defined]
              if r.getMessage() == "deepgram_malformed_message"]
    if field is None:  # the SDK's own warning; nothing reached the stream
        assert not logged and "Skipping unknown WebSocket message" in caplog.text
    else:
        assert logged and logged[0]["message_type"] == kind and logged[0]["field"] == field
    assert "test-key" not in caplog.text


@pytest.mark.parametrize("garbage", [
    results_json(is_final=True, channel=None),
    results_json(is_final=True, start="0.1 s"),
], ids=["final-without-channel", "final-start-not-a-number"])
async def test_a_malformed_final_result_loses_its_words_and_the_turn_says_so(deepgram, garbage):
    """A final result commits its words once: one that cannot be read leaves the utterance
    without them. Answered as if whole, the rest of the question could get a wrong cached
    answer; the turn fails instead (the engine apologises and asks again), and the socket
    carries on for the next one."""
    fake, recognizer, stream = await two_words_heard(deepgram)
    fake.garbage = [garbage]
    await send(stream, VOICE, 8)
    assert await until(lambda: not fake.garbage)
    with pytest.raises(ProviderError, match="malformed"):
        await stream.finalize()
    kept = stream.connected and len(fake.sessions) == 1
    await stream.aclose()
    await recognizer.aclose()
    assert kept


# ---------------------------------------------------------------- the early transcript


def early_stream(deepgram, utterance: str, **fake_settings):
    """A stream whose caller says ``utterance`` (a word every 40 ms of voice); Deepgram
    endpoints after 100 ms of silence."""
    fake, server = deepgram
    fake.utterances = [utterance]
    fake.ms_per_word = 40
    for name, value in fake_settings.items():
        setattr(fake, name, value)
    recognizer = stt(server, endpointing_ms=100, early_timeout_s=5.0)
    return fake, recognizer, recognizer.open_stream()


async def test_a_pause_gives_the_words_so_far_once_deepgram_endpoints(deepgram):
    fake, recognizer, stream = early_stream(deepgram, "hello there")
    await send(stream, VOICE, 4)
    early = asyncio.ensure_future(stream.speech_paused())
    await send(stream, SILENCE, 2)  # 40 ms: short of the endpoint, nothing is sure yet
    assert not early.done()
    await send(stream, SILENCE, 6)
    assert await asyncio.wait_for(early, 5) == Transcript("hello there", final=False)
    assert await stream.finalize() == Transcript("hello there", final=True)
    assert fake.sessions[0].controls["Finalize"] == 0  # the early words were the final
    await stream.aclose()
    await recognizer.aclose()


async def test_after_the_caller_resumes_a_pause_waits_for_the_next_endpoint(deepgram):
    fake, recognizer, stream = early_stream(deepgram, "hello there how are you")
    await send(stream, VOICE, 4)  # "hello there"
    await send(stream, SILENCE, 6)
    assert await until(lambda: stream.endpoint.is_set())
    stale = stream.speech_paused()
    stream.speech_resumed()  # the caller goes on: that endpoint is not the end
    await asyncio.sleep(0)
    assert stale.cancelled()  # the pause it was for is over
    early = asyncio.ensure_future(stream.speech_paused())
    await send(stream, VOICE, 6)  # "how are you"
    assert not early.done()
    await send(stream, SILENCE, 6)
    assert (await asyncio.wait_for(early, 5)).text == "hello there how are you"
    await stream.aclose()
    await recognizer.aclose()


async def test_an_endpoint_that_arrives_after_the_caller_resumed_is_stale(deepgram):
    # The endpoint's result comes late.
    fake, recognizer, stream = early_stream(deepgram, "hello there how are you",
                                            final_delay_ms=(400.0, 400.0))
    await send(stream, VOICE, 4)
    await send(stream, SILENCE, 6)  # Deepgram endpoints; its result is on its way
    stream.speech_resumed()  # the caller speaks again before it arrives
    session = fake.sessions[0]
    assert await until(lambda: any(m.get("speech_final") for m in session.sent))
    # Sent is not yet received (a real socket): waited for, not slept on.
    assert await until(lambda: stream._committed == ["hello there"])  # its words count...
    assert not stream.endpoint.is_set()  # ...but not as the end of the words that follow
    await stream.aclose()
    await recognizer.aclose()


async def test_no_endpoint_in_time_means_no_early_words(deepgram):
    fake, server = deepgram
    clock = ManualClock()
    recognizer = stt(server, early_timeout_s=0.8, clock=clock)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)  # speech, never a silence: Deepgram cannot endpoint
    early = asyncio.ensure_future(stream.speech_paused())
    await clock.advance(0.7)
    assert not early.done()  # the wait runs on the stream's clock, not the wall's
    await clock.advance(0.2)
    assert early.done()  # ...past its early_timeout_s: no early words
    with pytest.raises(TimeoutError):
        await early
    await stream.aclose()
    await recognizer.aclose()


async def test_the_wait_for_early_words_follows_the_endpointing_setting(deepgram):
    """Review (stop 68): a pause waited a fixed 0.8 s for Deepgram's endpoint (the default
    300 ms of endpointing plus the service's delay), whatever ``deepgram_endpointing_ms``
    said: an operator who set it to 700 ms or more got no early words on any turn (the
    endpoint cannot come before its silence), each turn waiting out its whole silence.
    Now the wait is the endpointing setting plus the service's usual delay (0.5 s)."""
    from gateway.settings import Settings

    fake, server = deepgram
    clock = ManualClock()
    settings = Settings(deepgram_api_key="test-key", deepgram_url=server.ws_url,
                        deepgram_endpointing_ms=1000)
    recognizer = DeepgramSTT.from_settings(settings, clock=clock)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)  # speech, never a silence: Deepgram cannot endpoint
    early = asyncio.ensure_future(stream.speech_paused())
    await clock.advance(1.4)
    assert not early.done()  # a 1 s endpoint, and its delay, can still come
    await clock.advance(0.2)
    assert early.done()  # past endpointing + delay: no early words
    with pytest.raises(TimeoutError):
        await early
    await stream.aclose()
    await recognizer.aclose()


async def test_a_call_on_deepgram_ends_a_cached_question_at_its_endpoint(deepgram):
    """The engine with the real Deepgram stream: the endpoint's words are routed at the
    pause, so a cached question ends at the short silence, not the open one."""
    fake, server = deepgram
    fake.utterances = ["what are your opening hours"]
    fake.ms_per_word = WORD_MS  # the harness speaks a word every 200 ms
    recognizer = stt(server, endpointing_ms=100, early_timeout_s=5.0)
    h = CallHarness(faqs={"opening hours": "hours"}, settings={"end_of_turn_silence_ms": 900})
    h.call = Call(dataclasses.replace(h.deps, stt=recognizer), h.output, RATE, call_id="dg")
    await h.start()
    stream = h.call._turns.stt
    await h.say("what are your opening hours", then_silence_ms=200)  # Deepgram endpoints
    # The manual clock stands still until the endpoint's words are in (no wall-clock race):
    # the turn waits for them (capped at 1200 ms of silence), then ends.
    assert await until(lambda: stream.endpoint.is_set() or h.output.of("route"))
    await h.clock.settle()
    await h.silence(1500)
    await h.stop()
    await recognizer.aclose()
    (metrics,) = h.metrics()
    assert metrics["end_of_turn"] == "complete" and metrics["entry_id"] == "hours"
    assert metrics["end_of_turn_ms"] < 600  # the open silence would be 900
    assert metrics["route_reused"] is True  # decided on the endpoint's words
    assert h.transcripts() == ["what are your opening hours"]
    assert fake.sessions[0].controls["Finalize"] == 0  # the endpoint's words were the final


class RouteDeepgram:
    """The fake behind a route whose first connections misbehave as a subclass says
    (``_misbehave``: True when it answered the connection itself); the rest are the fake's."""

    def __init__(self) -> None:
        self.fake = FakeDeepgram()
        self.fake.ms_per_word = 40
        self.connections = 0
        self.release = threading.Event()  # what a held handshake waits for
        self.app = Starlette(routes=[WebSocketRoute("/v1/listen", self._listen)])

    async def _listen(self, websocket: WebSocket) -> None:
        self.connections += 1
        if not await self._misbehave(websocket, self.connections):
            await self.fake._listen(websocket)

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        return False

    @staticmethod
    async def _drop(websocket: WebSocket) -> None:
        """Accepted, then closed with 1011 after the first audio."""
        await websocket.accept()
        await websocket.receive()
        await websocket.close(code=1011)

    async def _hold(self) -> None:
        """The handshake is not answered until ``release``."""
        while not self.release.is_set():
            await asyncio.sleep(0.01)


class DroppingDeepgram(RouteDeepgram):
    """The fake behind a route that drops the first connection after its first audio (the
    service or the network failing mid-call); later connections are the fake's."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection == 1:
            await self._drop(websocket)
            return True
        return False


async def test_a_dropped_socket_fails_its_utterance_and_the_next_one_is_recognised():
    dropping = DroppingDeepgram()
    with ServerThread(dropping.app) as server:
        recognizer = stt(server, reconnect_s=0.05)
        stream = recognizer.open_stream()
        for _ in range(3):  # the caller's first question: the socket drops
            await stream.send_audio(VOICE)
        assert await until(lambda: dropping.connections == 2 and stream.connected)
        with pytest.raises(ProviderError, match="1011"):
            await stream.finalize()  # its words went with the socket: this turn apologises
        await send(stream, VOICE, 12)  # the caller's next question, on the new socket
        final = await stream.finalize()
        closed_early = stream.closed
        await stream.aclose()
        await recognizer.aclose()
    assert final.text == "what are your opening hours"
    assert not closed_early


async def test_a_socket_dropped_between_utterances_fails_nothing():
    dropping = DroppingDeepgram()
    with ServerThread(dropping.app) as server:
        recognizer = stt(server, reconnect_s=0.05)
        stream = recognizer.open_stream()
        await stream.send_audio(SILENCE)
        await stream.finalize()  # an utterance ends before the socket drops
        assert await until(lambda: dropping.connections == 2 and stream.connected)
        await send(stream, VOICE, 12)
        final = await stream.finalize()
        await stream.aclose()
        await recognizer.aclose()
    assert final.text == "what are your opening hours"


# ---------------------------------------------------------------- a line that goes silent


async def unanswered_final(stream, session, clock: ManualClock):
    """``stream.finalize()`` once its Finalize has reached a server that never answers it
    and the stream's clock has passed its finalize_timeout_s (1 s): a Transcript or the
    error it raised."""
    final = asyncio.ensure_future(stream.finalize())
    assert await until(lambda: session.controls["Finalize"] == 1)
    await clock.advance(0.9)
    assert not final.done()  # the timeout runs on the stream's clock, not the wall's
    await clock.advance(0.2)
    return (await asyncio.gather(final, return_exceptions=True))[0]


NO_WORD = "ProviderError('deepgram: no final transcript within 1 s of Finalize; the live socket is not answering')"


async def stalled_final(stream, clock: ManualClock):
    """``stream.finalize()`` on a socket whose peer has stalled (nothing reaches it, nothing
    comes back), once the stream's clock has passed its finalize_timeout_s (1 s) and then
    its ping_timeout_s (0.5 s) with no pong: a Transcript or the error it raised."""
    final = asyncio.ensure_future(stream.finalize())
    assert await until(lambda: stream._outbox.empty())  # the Finalize went out
    await clock.advance(1.0)
    assert await until(lambda: clock.sleeping == 1)  # then a ping waits for its pong
    await clock.advance(0.4)
    assert not final.done()  # the pong's wait runs on the stream's clock, not the wall's
    await clock.advance(0.2)
    return (await asyncio.gather(final, return_exceptions=True))[0]


@pytest.mark.parametrize(("ms_per_word", "frames", "heard"), [
    (10_000, 10, ""),  # audio, but not a word of it recognised
    (40, 4, "what are"),  # interims, never committed
], ids=["no-word-fails", "words-heard-fail-too"])
async def test_an_unanswered_finalize_ends_the_turn_and_the_silent_socket_is_reopened(
        deepgram, ms_per_word, frames, heard):
    """Review (stop 66): Deepgram stalls mid-stream: the socket stays open, the caller's
    audio goes out, and nothing comes back, neither a reply to Finalize nor the pong to a
    ping (a network path gone dead between the gateway and the fake). The turn fails (the
    call apologises): the audio after the stall never reached the service, so the words
    heard before it ("what are", of "what are your opening hours") were the final, a part
    of the question answered as if it were whole; with no word at all it was already a
    failure, never an empty final. Either way the socket, silent since that Finalize and
    deaf to a ping, is reopened and the next utterance recognised on the new one."""
    fake, server = deepgram
    fake.ms_per_word = ms_per_word
    with StallingProxy(server.port) as proxy:
        clock = ManualClock()
        recognizer = stt(proxy, finalize_timeout_s=1.0, reconnect_s=0.01, clock=clock)
        stream = recognizer.open_stream()
        await send(stream, VOICE, frames)
        assert await until(lambda: len(fake.sessions) == 1 and stream._text() == heard)
        proxy.stall()
        assert repr(await stalled_final(stream, clock)) == NO_WORD
        assert fake.sessions[0].controls["Finalize"] == 0  # it never reached the service

        fake.ms_per_word = 40  # the service is back
        assert await until(lambda: len(fake.sessions) == 2 and stream.connected)
        await send(stream, VOICE, 12)
        final = await stream.finalize()
        await stream.aclose()
        await recognizer.aclose()
    assert final == Transcript("what are your opening hours", final=True)


@pytest.mark.parametrize(("ms_per_word", "frames", "heard"), [
    (10_000, 10, ""),  # the caller's noise: not a word of it recognised
    (40, 4, "what are"),  # interims, never committed
], ids=["no-word-is-an-empty-final", "words-heard-are-the-final"])
async def test_a_finalize_a_live_socket_leaves_unanswered_ends_the_turn_and_keeps_the_socket(
        deepgram, ms_per_word, frames, heard):
    """Review (stop 64): Deepgram does not promise a reply to Finalize ("not guaranteed if
    there is no significant amount of audio data to process": a turn cut after every word
    was final but before its speech_final, a noise-only utterance). A socket that sent
    nothing since an unanswered Finalize was taken for a stalled one: dropped and
    reopened, audio refused meanwhile (an utterance begun then failed: the apology), and
    a noise-only turn failed (the apology) instead of being an empty final. A socket that
    answers a ping is alive: it is kept, the words so far are the final, none at all an
    empty final, and the next utterance goes out on it at once."""
    fake, server = deepgram
    fake.answer_finalize = False  # alive (the server library answers pings), no reply
    fake.ms_per_word = ms_per_word
    clock = ManualClock()
    recognizer = stt(server, finalize_timeout_s=1.0, reconnect_s=0.01, clock=clock)
    stream = recognizer.open_stream()
    await send(stream, VOICE, frames)
    assert await until(lambda: len(fake.sessions) == 1 and stream._text() == heard)
    assert await unanswered_final(stream, fake.sessions[0], clock) == \
        Transcript(heard, final=True)
    assert stream.connected and stream._error is None

    fake.answer_finalize, fake.ms_per_word = True, 40
    await send(stream, VOICE, 12)  # the next utterance: not refused, on the same socket
    final = await stream.finalize()
    await clock.advance(5.0)
    kept = stream.connected and len(fake.sessions) == 1
    await stream.aclose()
    await recognizer.aclose()
    assert final == Transcript("what are your opening hours", final=True)
    assert kept


async def test_finalize_answered_with_no_words_is_an_empty_final(deepgram):
    """The caller made only noise: Deepgram answers Finalize with no words. An empty final,
    no error; the socket is kept."""
    fake, server = deepgram
    fake.ms_per_word = 10_000
    clock = ManualClock()
    recognizer = stt(server, finalize_timeout_s=1.0, clock=clock)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 10)
    assert await stream.finalize() == Transcript("", final=True)
    assert fake.sessions[0].controls["Finalize"] == 1
    await send(stream, VOICE, 2)
    await clock.advance(5.0)
    assert stream.connected and len(fake.sessions) == 1
    await stream.aclose()
    await recognizer.aclose()


async def test_a_second_finalize_before_the_first_ones_reply_leaves_each_its_own(
        deepgram, caplog):
    """Review (stop 62): a second ``finalize()`` before the first one's Finalize reply
    arrived took the stream's one slot for a reply under way: the first reply, no longer
    the newest utterance's audio, was dropped, and the first turn waited the whole finalize
    timeout (1 s) to end with the words heard before its cut. (A caller whose next
    utterance ends quickly after the last one.) Each finalize now gets its own reply."""
    fake, server = deepgram
    fake.utterances = ["hello there", "second question please"]
    fake.ms_per_word = 40
    clock = ManualClock()
    recognizer = stt(server, finalize_timeout_s=1.0, clock=clock)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)  # "hello there" (two words revealed)
    first = asyncio.ensure_future(stream.finalize())
    # The next utterance, and its cut, before the event loop has read anything: the first
    # reply cannot have arrived yet (send_audio never yields).
    for _ in range(6):
        await stream.send_audio(VOICE)
    second = asyncio.ensure_future(stream.finalize())
    assert stream._outbox.qsize() > 2  # both Finalize messages still queued
    with caplog.at_level(logging.WARNING, logger="voicegate.deepgram"):
        assert await asyncio.wait_for(second, 5) == Transcript("second question please",
                                                               final=True)
        # Replies come in order: the first one's is in, and the clock has not moved.
        await clock.settle()
        assert first.done()
        assert await first == Transcript("hello there", final=True)
    session = fake.sessions[0]
    assert session.controls["Finalize"] == 2
    assert [m["channel"]["alternatives"][0]["transcript"] for m in session.sent
            if m.get("from_finalize")] == ["hello there", "second question please"]
    assert "deepgram_finalize_late" not in caplog.text
    await stream.aclose()
    await recognizer.aclose()


class HangingDeepgram(RouteDeepgram):
    """The fake behind a route whose first handshake never completes (no accept); later
    connections are the fake's."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection == 1:
            await self._hold()
            return True
        return False


async def test_a_handshake_that_hangs_fails_the_final_and_the_socket_is_reopened():
    hanging = HangingDeepgram()
    with ServerThread(hanging.app) as server:
        clock = ManualClock()
        recognizer = stt(server, finalize_timeout_s=1.0, reconnect_s=0.01, clock=clock)
        stream = recognizer.open_stream()
        for _ in range(10):  # queued: the socket never opens
            await stream.send_audio(VOICE)
        assert await until(lambda: hanging.connections == 1)
        final = asyncio.ensure_future(stream.finalize())
        await clock.advance(1.1)
        outcome = (await asyncio.gather(final, return_exceptions=True))[0]
        assert await until(lambda: hanging.connections == 2 and stream.connected)
        hanging.release.set()
        await send(stream, VOICE, 12)
        second = await stream.finalize()
        await stream.aclose()
        await recognizer.aclose()
    assert isinstance(outcome, ProviderError) and "no final transcript within 1 s" in str(outcome)
    assert second.text == "what are your opening hours"


async def test_a_call_whose_deepgram_goes_silent_apologises_and_answers_the_next_turn(deepgram):
    """The engine with the real Deepgram stream on the call's clock: a turn whose words
    never come back (the service stalled) is apologised for and counted as ``stt_failed``,
    never a silent line; the stream reopens its socket and the next question is answered."""
    fake, server = deepgram
    fake.utterances = ["what are your opening hours"]
    fake.ms_per_word = WORD_MS
    with StallingProxy(server.port) as proxy:
        h = CallHarness(faqs={"opening hours": "hours"}, settings={"end_of_turn_silence_ms": 900})
        recognizer = stt(proxy, endpointing_ms=100, early_timeout_s=5.0, finalize_timeout_s=1.0,
                         reconnect_s=0.01, clock=h.clock)
        h.call = Call(dataclasses.replace(h.deps, stt=recognizer), h.output, RATE, call_id="dg")
        await h.start()
        stream = h.call._turns.stt
        assert await until(lambda: stream.connected and len(fake.sessions) == 1)
        proxy.stall()  # stalled: the audio reaches nothing, no word, no reply, no pong
        await h.say("what are your opening hours", then_silence_ms=3000)
        assert [e["source"] for e in h.output.of("response")] == ["apology"]
        assert h.stats.errors["stt_failed"] == 1
        (error,) = h.output.of("error")
        assert error["code"] == "stt_failed"
        assert "no final transcript within 1 s" in error["message"]

        # The service is back: the stalled socket was dropped, a new one relayed.
        assert await until(lambda: len(fake.sessions) == 2 and stream.connected)
        await h.say("what are your opening hours", then_silence_ms=200)  # Deepgram endpoints
        assert await until(lambda: stream.endpoint.is_set() or h.output.of("route"))
        await h.clock.settle()
        await h.silence(3000)
        await h.stop()
        await recognizer.aclose()
    assert [e["source"] for e in h.output.of("response")] == ["apology", "cache"]
    assert h.stats.errors["stt_failed"] == 1
    assert h.transcripts()[-1] == "what are your opening hours"


async def test_a_call_whose_noise_deepgram_leaves_unanswered_keeps_its_socket(deepgram):
    """Review (stop 64): the engine with the real Deepgram stream. The caller makes only
    noise; Deepgram, alive, sends nothing for it, not even a reply to Finalize (none is
    promised with no speech to process). That turn was apologised for (``stt_failed``)
    and the socket reopened as stalled; now it is an empty final (no response, no error),
    the socket is kept and the next question is answered on it."""
    fake, server = deepgram
    fake.utterances = ["what are your opening hours"]
    fake.answer_finalize, fake.ms_per_word = False, 1_000_000  # noise: no word, no reply
    h = CallHarness(faqs={"opening hours": "hours"}, settings={"end_of_turn_silence_ms": 900})
    # The ping that tells a live socket from a dead one waits on the call's clock, which
    # the harness moves by the frame: at 0.5 s it expired before a real pong came back on
    # a loaded machine (the CI run of stop 68), and the turn failed as a dead socket's.
    recognizer = stt(server, endpointing_ms=100, early_timeout_s=5.0, finalize_timeout_s=1.0,
                     reconnect_s=0.01, clock=h.clock, ping_timeout_s=30.0)
    h.call = Call(dataclasses.replace(h.deps, stt=recognizer), h.output, RATE, call_id="dg")
    await h.start()
    stream = h.call._turns.stt
    await h.say("what are your opening hours", then_silence_ms=3000)
    assert await until(lambda: fake.sessions[0].controls["Finalize"] == 1)
    await h.silence(1000)
    assert h.output.of("response") == [] and not h.output.of("error")
    assert stream.connected and len(fake.sessions) == 1

    fake.answer_finalize, fake.ms_per_word = True, WORD_MS  # the caller speaks
    await h.say("what are your opening hours", then_silence_ms=200)  # Deepgram endpoints
    assert await until(lambda: stream.endpoint.is_set() or h.output.of("route"))
    await h.clock.settle()
    await h.silence(3000)
    await h.stop()
    await recognizer.aclose()
    assert [e["source"] for e in h.output.of("response")] == ["cache"]
    assert not h.stats.errors["stt_failed"]
    assert len(fake.sessions) == 1
    assert h.transcripts()[-1] == "what are your opening hours"


async def test_closing_a_socket_whose_peer_went_silent_takes_at_most_two_seconds():
    """The call ends (or the gateway stops) while Deepgram is dead: CloseStream gets no
    reply and no close frame ever comes. The close waits 2 s of the stream's clock for the
    server's last results, then cuts the socket: the call's teardown does not wait out
    websockets' close handshake (10 s per step)."""
    with SilentDeepgram() as peer:
        clock = ManualClock()
        recognizer = stt(peer, clock=clock)
        stream = recognizer.open_stream()
        await stream.send_audio(VOICE)
        assert await until(lambda: stream.connected)
        closing = asyncio.ensure_future(stream.aclose())
        await clock.advance(1.9)
        assert not closing.done()  # a live server's last results get their time
        await clock.advance(0.2)
        await asyncio.wait_for(closing, 3)  # 3 s of wall time only bounds a hang
        assert stream.closed and not stream.connected
        await recognizer.aclose()


async def test_a_stalled_socket_to_a_dead_peer_is_reopened_at_once():
    """A Finalize unanswered by a peer that has gone dead (and so is a ping): the socket is
    dropped and a new one opened without waiting for the dead one's close handshake."""
    with SilentDeepgram() as peer:
        clock = ManualClock()
        recognizer = stt(peer, finalize_timeout_s=1.0, reconnect_s=0.01, clock=clock)
        stream = recognizer.open_stream()
        await send(stream, VOICE, 3)
        assert await until(lambda: stream.connected)
        outcome = await stalled_final(stream, clock)
        assert isinstance(outcome, ProviderError)
        assert await peer.connections.reach(2, timeout=3)  # reopened (3 s bounds a hang)
        closing = asyncio.ensure_future(stream.aclose())
        await clock.advance(2.1)
        await asyncio.wait_for(closing, 3)
        await recognizer.aclose()


@pytest.mark.parametrize("reopening", ["in-backoff", "in-handshake"])
async def test_a_stream_closed_while_its_socket_reopens_ends_at_once(reopening):
    """The call hangs up while no live socket is open: the stream waits out its reconnect
    backoff (here 60 s) or a handshake that does not come. There is nothing to flush
    (no CloseStream can go out): the close ends the stream at once, not after its 2 s
    wait for a server's last results."""
    route = DroppingDeepgram() if reopening == "in-backoff" else HangingDeepgram()
    with ServerThread(route.app) as server:
        clock = ManualClock()
        recognizer = stt(server, reconnect_s=60.0, clock=clock)
        stream = recognizer.open_stream()
        await stream.send_audio(VOICE)  # the dropping route drops the socket at it
        assert await until(lambda: route.connections == 1 and not stream.connected and
                           (reopening == "in-handshake" or stream._error is not None))
        started = clock.now()
        # The clock never moves: the close must not wait on it. (1 s of wall time only
        # bounds a hang.)
        await asyncio.wait_for(stream.aclose(), 1)
        ended = stream._runner.done() and stream.closed and not stream.connected
        route.release.set()
        await recognizer.aclose()
    assert ended and clock.now() == started
    assert route.connections == 1  # no socket opened for a closed stream


class ReopeningDeepgram(RouteDeepgram):
    """The fake behind a route that drops its first connection after its first audio, then
    holds the second handshake (no accept) until ``release``: the stream is reopening for as
    long as the test needs. Later connections are the fake's."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection == 1:
            await self._drop(websocket)
            return True
        if connection == 2:
            await self._hold()  # then the fake's
        return False


async def test_an_utterance_whose_first_audio_was_refused_while_reopening_fails():
    """The socket dropped between utterances; the caller starts speaking while it reopens.
    The start of the question is refused (never sent), so what Deepgram hears of it is its
    tail ("... your opening hours"): answering that is answering another question. Its
    final fails (the apology), as for an utterance that lost audio to the dropped socket,
    and the next one is recognised whole."""
    reopening = ReopeningDeepgram()
    with ServerThread(reopening.app) as server:
        recognizer = stt(server, reconnect_s=0.01)
        stream = recognizer.open_stream()
        await stream.send_audio(SILENCE)
        await stream.finalize()  # an utterance ends before the socket drops
        assert await until(lambda: reopening.connections == 2)  # its handshake is held
        refused = 0
        for _ in range(4):  # the caller's question begins: refused, the socket is not back
            try:
                await stream.send_audio(VOICE)
            except ProviderError:
                refused += 1
        reopening.release.set()
        assert await until(lambda: stream.connected)
        await send(stream, VOICE, 8)  # the rest of the question, on the new socket
        with pytest.raises(ProviderError, match="1011"):
            await stream.finalize()  # its start went nowhere: this turn apologises
        await send(stream, VOICE, 12)  # the next question
        second = await stream.finalize()
        await stream.aclose()
        await recognizer.aclose()
    assert refused == 4
    assert second.text == "what are your opening hours"


class SlowDeepgram(RouteDeepgram):
    """The fake behind a route whose first handshake is answered only at ``release`` (a
    service or a network path slow for a while); then the fake serves it."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection == 1:
            await self._hold()
        return False


async def test_an_utterance_whose_audio_was_refused_for_a_full_outbox_fails():
    """Review (stop 66): audio that cannot go out piles up in the stream's outbox (a
    handshake slow to answer); once it is full, the caller's next audio is refused ("audio
    is not draining"), but the utterance was not marked as having lost audio (as one
    refused while a socket reopens is). The socket then opened, the audio queued before
    the refusal went out, and the final was Deepgram's words for it: a question with a
    piece cut out, answered as if whole. Now that final fails (the apology) and the next
    utterance is recognised whole."""
    from gateway.providers import deepgram_stt

    slow = SlowDeepgram()
    with ServerThread(slow.app) as server:
        recognizer = stt(server)
        stream = recognizer.open_stream()
        assert await until(lambda: slow.connections == 1)  # its handshake is held
        for _ in range(deepgram_stt._OUTBOX_LIMIT):
            await stream.send_audio(VOICE)
        with pytest.raises(ProviderError, match="not draining"):
            await stream.send_audio(VOICE)  # this piece of the question is lost
        slow.release.set()
        assert await until(lambda: stream.connected and stream._outbox.empty())
        with pytest.raises(ProviderError, match="not draining"):
            await stream.finalize()  # words of it went nowhere: this turn apologises
        await send(stream, VOICE, 12)  # the next question
        second = await stream.finalize()
        await stream.aclose()
        await recognizer.aclose()
    assert second.text == "what are your opening hours"


class BusyDeepgram(RouteDeepgram):
    """The fake behind a route that refuses the first handshake with ``status`` (429: the
    account's concurrent streams are all in use, a burst of calls), then takes the rest."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection == 1:
            await websocket.send_denial_response(JSONResponse(
                {"err_code": "TOO_MANY_REQUESTS", "err_msg": "Too many requests."},
                status_code=self.status, headers={"Retry-After": "1"}))
            return True
        return False


@pytest.mark.parametrize("status", [429, 408])
async def test_a_handshake_refused_for_now_is_retried(status):
    """A 429 (or 408) at the handshake says "not now", not "never" (as a wrong key's 401
    does): the stream reopens, so a call that began in a burst is recognised once the
    service takes it, not failed turn after turn for the rest of the call."""
    busy = BusyDeepgram(status)
    # uvicorn's legacy websockets protocol: its sans-I/O one logs a denial as an error.
    with ServerThread(busy.app, ws="websockets") as server:
        recognizer = stt(server, reconnect_s=0.01)
        stream = recognizer.open_stream()
        assert await until(lambda: busy.connections == 2 and stream.connected)
        await send(stream, VOICE, 12)
        final = await stream.finalize()
        await stream.aclose()
        await recognizer.aclose()
    assert final.text == "what are your opening hours"


class FlakyDeepgram(RouteDeepgram):
    """The fake behind a route that drops each of its first three connections (1011) at its
    first audio, whenever that comes; later connections are the fake's."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection > 3:
            return False
        await websocket.accept()
        while True:  # a KeepAlive (text) is no audio
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect" or message.get("bytes"):
                break
        await websocket.close(code=1011)
        return True


async def test_a_socket_that_worked_a_while_is_reopened_after_the_shortest_wait(caplog):
    """Review (stop 62): the reopen's backoff (0.5 s doubling to 5 s) doubled with every
    failure of the call, never starting over: a long call whose socket the network dropped
    now and then waited 1 s, 2 s, 4 s, then 5 s at every later drop, however long the
    socket had worked in between, and every word the caller said meanwhile was refused
    (their turn apologised for, "say that again"). A socket that stayed open as long as
    the longest wait (5 s of the stream's clock) was working: its failure is a new one,
    and the wait starts over. One that fails sooner still doubles it (no tight loop of
    handshakes against a service that drops every socket at once)."""
    caplog.set_level(logging.INFO, logger="voicegate")
    flaky = FlakyDeepgram()

    def waits() -> list[float]:
        return [r.fields["reconnect_s"] for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "deepgram_stream_ended"]

    with ServerThread(flaky.app) as server:
        clock = ManualClock()
        recognizer = stt(server, reconnect_s=0.01, clock=clock)
        stream = recognizer.open_stream()
        for drop, lived_s in enumerate((6.0, 6.0, 0.0), start=1):
            assert await until(lambda: flaky.connections == drop and stream.connected)
            await clock.advance(lived_s)  # the socket works this long, then drops
            await stream.send_audio(VOICE)
            assert await until(lambda: len(waits()) == drop)
        assert await until(lambda: flaky.connections == 4 and stream.connected)
        await stream.aclose()
        await recognizer.aclose()
    # Each socket that lived 6 s failed anew; the one that failed at once doubled the wait.
    assert waits() == [0.01, 0.01, 0.02]


# ---------------------------------------------------------------- an Error message (review)


def _error_json(variant: str = "SchemaError") -> str:
    return json.dumps({"type": "Error", "variant": variant,
                       "description": "could not parse the client message",
                       "message": "{}"})


class ErrorThenOpenDeepgram(RouteDeepgram):
    """The first connection answers its first audio with an ``Error`` message and then
    stays open (reading, answering nothing more, never closing): an Error that is not the
    end of the socket (a SchemaError about one client message). Later connections are the
    fake's."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection != 1:
            return False
        await websocket.accept()
        await websocket.receive()
        await websocket.send_text(_error_json())
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return True


async def test_an_error_message_on_a_socket_left_open_does_not_deafen_the_call_for_good():
    """Deepgram sends an ``Error`` message and leaves the socket open. The stream latches
    it as ``_error``: every later window is refused and every turn fails, for the rest of
    the call, because ``_error`` is only cleared by a reopen and a reopen only follows the
    socket's end, which never comes (the stream's own KeepAlives even keep it open)."""
    route = ErrorThenOpenDeepgram()
    with ServerThread(route.app) as server:
        recognizer = stt(server, reconnect_s=0.01, keepalive_s=0.05)
        stream = recognizer.open_stream()
        await stream.send_audio(VOICE)
        assert await until(lambda: stream._error is not None)  # the Error arrived
        try:  # the utterance under way may fail: that turn apologises
            await stream.finalize()
        except ProviderError:
            pass
        # The caller asks again, a while later (30 s bounds any reopen: a loaded machine's
        # handshake may take seconds; the defect never reopened at all).
        await until(lambda: route.connections >= 2 and stream.connected, timeout=30.0)
        outcome: object
        try:
            await send(stream, VOICE, 12)
            outcome = await stream.finalize()
        except ProviderError as exc:
            outcome = exc
        connections, error = route.connections, stream._error
        await stream.aclose()
        await recognizer.aclose()
    assert outcome == Transcript("what are your opening hours", final=True), \
        f"the next question after the Error: {outcome!r} (connections={connections}, " \
        f"stream._error={error!r})"


class ErrorThenCloseDeepgram(RouteDeepgram):
    """The first connection answers its first audio with an ``Error`` message, then closes
    (1011) once ``release`` is set; later connections are the fake's."""

    async def _misbehave(self, websocket: WebSocket, connection: int) -> bool:
        if connection != 1:
            return False
        await websocket.accept()
        await websocket.receive()
        await websocket.send_text(_error_json("InternalError"))
        await self._hold()
        await websocket.close(code=1011)
        return True


async def test_a_final_refused_by_the_error_check_cuts_its_utterance_and_spares_the_next_turn():
    """An ``Error`` arrives during the caller's pause, before the socket closes; the turn
    then ends from the pause's route (``end_turn_if_due``: no window sent in between), so
    ``finalize()`` raises from ``_check()`` before ``_start_utterance()``: the utterance is
    not cut. When the socket then closes, ``_run`` finds that uncut utterance "has audio"
    and sets ``_lost``; the stream reopens, and the caller's next question, recognised
    whole on the new socket, fails at its final with the old socket's error."""
    route = ErrorThenCloseDeepgram()
    with ServerThread(route.app) as server:
        recognizer = stt(server, reconnect_s=0.01)
        stream = recognizer.open_stream()
        for _ in range(3):  # the utterance's audio (queued at once: one message on the wire)
            await stream.send_audio(VOICE)
        assert await until(lambda: stream._error is not None)  # the Error, socket still open
        with pytest.raises(ProviderError):
            stream.finalize()  # the first turn fails: fine
        route.release.set()  # the socket closes
        assert await until(lambda: route.connections == 2 and stream.connected)
        await send(stream, VOICE, 12)  # the next question, on the new socket
        outcome: object
        try:
            outcome = await stream.finalize()
        except ProviderError as exc:
            outcome = exc
        await stream.aclose()
        await recognizer.aclose()
    assert outcome == Transcript("what are your opening hours", final=True), \
        f"the next question, recognised on the new socket: {outcome!r}"


async def test_an_utterance_end_of_the_cut_utterance_does_not_commit_the_next_ones_interim(
        deepgram):
    """Review (stop 64): Deepgram's UtteranceEnd for an utterance already cut (sent once
    ``utterance_end_ms`` of audio followed its last word: audio that is now the next
    utterance's) arrived after that next utterance's first interim. It committed that
    interim as if final, and the interim's words came again in their own final: the
    caller's next question reached the agent (and the transcript) with its first words
    twice ("what what are your opening hours")."""
    fake, server = deepgram
    fake.utterances = ["hello there", "what are your opening hours"]
    fake.ms_per_word = 40
    recognizer = stt(server)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 4)  # "hello there", audio 0-80 ms
    assert (await stream.finalize()).text == "hello there"
    await send(stream, VOICE, 2)  # the next utterance's first word
    assert await until(lambda: stream._text() == "what")
    # The first utterance's UtteranceEnd, late: before the next utterance's next interim.
    fake.garbage = [json.dumps({"type": "UtteranceEnd", "channel": [0, 1],
                                "last_word_end": 0.08})]
    await send(stream, VOICE, 8)
    assert await until(lambda: not fake.garbage)
    final = await stream.finalize()
    await stream.aclose()
    await recognizer.aclose()
    assert final == Transcript("what are your opening hours", final=True)


async def test_an_utterance_end_with_an_interim_pending_does_not_make_the_interim_final(
        deepgram):
    """Review (stop 68): Deepgram's UtteranceEnd marks a gap after the last *finalized*
    word; an interim still pending then is of later words (the caller went on: "what are
    your opening hours, umm, on sunday", the filler untranscribed, so the turn detector
    heard no pause), which Deepgram finalizes itself. The UtteranceEnd committed that
    interim as if final, and its words came again in their own final: "on on sunday"
    reached the agent (a guess of Deepgram's kept as said, a cache miss); with the turn
    cut then, no Finalize went out and the words after the interim were never asked for."""
    fake, server = deepgram
    fake.utterances = ["what are your opening hours", "on sunday"]
    fake.ms_per_word = 40
    recognizer = stt(server, endpointing_ms=100, utterance_end_ms=5000)
    stream = recognizer.open_stream()
    await send(stream, VOICE, 10)  # "what are your opening hours", audio 0-200 ms
    await send(stream, SILENCE, 5)  # finalized by Deepgram
    assert await until(lambda: stream._committed == ["what are your opening hours"])
    await send(stream, VOICE, 2)  # the caller goes on: interim "on"
    assert await until(lambda: stream._interim == "on")
    # UtteranceEnd of the finalized words, after the later words' first interim.
    fake.garbage = [json.dumps({"type": "UtteranceEnd", "channel": [0, 1],
                                "last_word_end": 0.2})]
    await send(stream, VOICE, 2)
    assert await until(lambda: not fake.garbage and stream._interim == "on sunday")
    assert stream._text() == "what are your opening hours on sunday"
    final = await stream.finalize()
    await stream.aclose()
    await recognizer.aclose()
    assert final == Transcript("what are your opening hours on sunday", final=True)


async def test_a_recogniser_that_takes_another_rate_than_the_calls_16_khz_is_refused():
    """Review (stop 69): a call feeds its recogniser the VAD's 16 kHz windows whatever the
    recogniser's ``sample_rate`` says (STTStream: audio "at SpeechToText.sample_rate"), so
    a DeepgramSTT built with ``sample_rate=8000`` (a phone line's rate) was sent 16 kHz audio
    declared as 8 kHz: Deepgram heard every caller slowed down an octave low, and the turns
    came back garbled or empty, with no error anywhere. Such a recogniser is now refused
    where a call's dependencies are put together, naming the rate."""
    harness = CallHarness()
    recognizer = DeepgramSTT("test-key", sample_rate=8000)
    try:
        with pytest.raises(ValueError, match="16000 Hz.*8000 Hz"):
            dataclasses.replace(harness.deps, stt=recognizer)
        assert dataclasses.replace(harness.deps, stt=DeepgramSTT("test-key")).stt.sample_rate \
            == RATE
    finally:
        await recognizer.aclose()


async def test_an_utterance_reset_after_its_socket_dropped_does_not_fail_the_next_one():
    """Review (stop 69): ``reset()`` drops the utterance under way without a final, but kept
    the record that its audio went down with a failed socket: the next utterance, recognised
    whole on the new socket, failed at its ``finalize()`` for the dropped one's loss (its
    turn apologised). The record now goes with the utterance it was about."""
    dropping = DroppingDeepgram()
    with ServerThread(dropping.app) as server:
        recognizer = stt(server, reconnect_s=0.05)
        stream = recognizer.open_stream()
        for _ in range(3):  # a noise, not speech after all: the socket drops meanwhile
            await stream.send_audio(VOICE)
        assert await until(lambda: dropping.connections == 2 and stream.connected)
        await stream.reset()
        await send(stream, VOICE, 12)  # the caller's question, on the new socket
        final = await asyncio.gather(stream.finalize(), return_exceptions=True)
        await stream.aclose()
        await recognizer.aclose()
    assert final == [Transcript("what are your opening hours", final=True)]
