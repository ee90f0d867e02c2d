"""The real elevenlabs SDK against a local fake of the streaming-synthesis endpoint."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import re
import socket
from typing import AsyncIterator

import pytest

from cache_seed import parse_seed_csv, render_answers
from gateway.audio_bank import AudioBank
from gateway.clock import ManualClock, deadline
from gateway.providers.base import ProviderError, TextToSpeech
from gateway.providers.elevenlabs_tts import ElevenLabsTTS
from gateway.providers.synthesis_slots import SEEDING, URGENCY, WANTED
from gateway.providers.registry import create_tts
from gateway.seeding import blocking_renderer, voice_id
from gateway.services import Services
from gateway.settings import Settings
from intents.store import LocalStore, audio_key
from tests.admin_support import small_faq_csv
from tests.call_harness import CallHarness, assert_a_stalled_voice_fails_the_turn
from tests.fakes.elevenlabs_server import MS_PER_CHAR, FakeElevenLabs, tone
from tests.fakes.server import ServerThread
from tests.fakes.tcp_drops import DroppingDoor


@pytest.mark.parametrize("rate", [16000, 24000])
async def test_streaming_audio_arrives_in_sample_aligned_chunks(eleven, rate):
    fake, server = eleven
    tts = ElevenLabsTTS("test-key", voice_id="voice-1", sample_rate=rate, base_url=server.url)
    assert isinstance(tts, TextToSpeech)
    text = "Your order shipped on Monday."
    chunks = [chunk async for chunk in tts.synthesize(text)]
    assert len(chunks) > 3
    assert all(len(chunk) % 2 == 0 for chunk in chunks)
    assert sum(map(len, chunks)) == rate * len(text) * MS_PER_CHAR // 1000 * 2
    assert fake.requests[0]["output_format"] == f"pcm_{rate}"
    assert fake.requests[0]["voice_id"] == "voice-1" and fake.requests[0]["text"] == text
    await tts.aclose()


async def test_first_chunk_arrives_before_synthesis_finishes(eleven):
    fake, server = eleven
    fake.hold_after_first.set()
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    stream = tts.synthesize("A long answer that takes a while to synthesize.")
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert first and not fake.release.is_set()
    fake.release.set()
    rest = [chunk async for chunk in stream]
    assert rest
    await tts.aclose()


async def test_errors_become_provider_errors_without_the_key(eleven):
    fake, server = eleven
    tts = ElevenLabsTTS("wrong-key", voice_id="v", base_url=server.url)
    with pytest.raises(ProviderError, match="HTTP 401: Invalid API key") as info:
        [chunk async for chunk in tts.synthesize("hi")]
    assert "wrong-key" not in str(info.value)
    await tts.aclose()
    fake.status = 500
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    with pytest.raises(ProviderError, match="HTTP 500"):
        [chunk async for chunk in tts.synthesize("hi")]
    await tts.aclose()


@pytest.mark.parametrize(("media_type", "body", "said"), [
    ("application/json", b'{"detail": {"status": "quota_exceeded", "message": "Quota exceeded"}}',
     "application/json instead of audio: Quota exceeded"),
    ("text/html", b"<html><body>Please sign in to continue</body></html>",
     "text/html instead of audio: <html><body>Please sign in"),
    # Labelled as the OpenAPI labels audio, or as audio, the body still says what it is.
    ("text/event-stream", b'{"detail": {"status": "busy", "message": "Try later"}}',
     "text/event-stream instead of audio: Try later"),
    ("application/octet-stream", b"<!DOCTYPE html><title>Captive portal: log in</title>",
     "application/octet-stream instead of audio: <!DOCTYPE html><title>Captive"),
], ids=["json", "html", "json-as-event-stream", "page-as-bytes"])
async def test_a_body_that_is_no_audio_is_an_error_not_noise(eleven, media_type, body, said):
    """Something answers 200 for the voice with a body that is not audio (a gateway's JSON
    error, a proxy's or a captive portal's page, a wrong base URL): read as PCM it is loud
    noise on the line, and in the cache when a seed renders it. It fails instead, saying
    what came (the call's tts_failed and the apology; the seed stops)."""
    fake, server = eleven
    fake.not_audio = (media_type, body)
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    with pytest.raises(ProviderError) as info:
        [chunk async for chunk in tts.synthesize("Your order shipped on Monday.")]
    await tts.aclose()
    assert said in str(info.value), str(info.value)


@pytest.mark.parametrize("media_type", ["text/event-stream", "application/octet-stream", ""])
async def test_audio_is_played_whatever_its_content_type_says(eleven, media_type):
    """ElevenLabs documents no content type for PCM (its OpenAPI names text/event-stream
    for every output format): audio under any label that could be audio plays, whole."""
    fake, server = eleven
    fake.audio_media_type = media_type
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    text = "Your order shipped on Monday."
    chunks = [chunk async for chunk in tts.synthesize(text)]
    await tts.aclose()
    assert b"".join(chunks) == tone(len(text) * MS_PER_CHAR, 16000)


def _mp3_frames(count: int = 6) -> bytes:
    """MP3 as a stream of it starts, with no ID3 tag: MPEG-1 Layer III frames, 128 kb/s at
    44.1 kHz (ElevenLabs' default mp3_44100_128), each a 4-byte header and 413 bytes."""
    return b"".join(b"\xff\xfb\x90\x64" + bytes((n * 7 + i) % 256 for i in range(413))
                    for n in range(count))


_BINARY = bytes(range(256)) * 12  # what follows a header: no text, no signature
OTHER_AUDIO = {
    # By their label: an audio type that is surely not PCM, whatever the bytes.
    "mp3-labelled": ("audio/mpeg", _mp3_frames(), "audio/mpeg (MP3)"),
    "mp3-labelled-mp3": ("audio/mp3", _mp3_frames(), "audio/mp3 (MP3)"),
    "ogg-labelled": ("audio/ogg", b"OggS\x00\x02" + _BINARY, "audio/ogg (Ogg)"),
    "wav-labelled": ("audio/wav", b"RIFF\x24\x08\x00\x00WAVEfmt " + _BINARY, "audio/wav (WAV)"),
    "flac-labelled": ("audio/flac", b"fLaC\x00\x00\x00\x22" + _BINARY, "audio/flac (FLAC)"),
    "ulaw-labelled": ("audio/basic", b"\xff\x7f" * 1000, "audio/basic (mu-law)"),
    "webm-labelled": ("audio/webm", b"\x1a\x45\xdf\xa3" + _BINARY, "audio/webm (WebM)"),
    # By their first bytes: under a label that could be PCM, or none.
    "mp3-id3-as-bytes": ("application/octet-stream",
                         b"ID3\x04\x00\x00\x00\x00\x00\x23" + _BINARY + _mp3_frames(),
                         "MP3 (by its first bytes; labelled application/octet-stream)"),
    "mp3-frames-as-event-stream": ("text/event-stream", _mp3_frames(),
                                   "MP3 (by its first bytes; labelled text/event-stream)"),
    "ogg-as-bytes": ("application/octet-stream", b"OggS\x00\x02" + _BINARY,
                     "Ogg (by its first bytes; labelled application/octet-stream)"),
    "wav-unlabelled": ("", b"RIFF\x24\x08\x00\x00WAVEfmt " + _BINARY,
                       "WAV (by its first bytes; labelled no content type)"),
    "flac-as-pcm": ("audio/pcm", b"fLaC\x80\x00\x00\x22" + _BINARY,
                    "FLAC (by its first bytes; labelled audio/pcm)"),
    "webm-as-bytes": ("application/octet-stream", b"\x1a\x45\xdf\xa3" + _BINARY,
                      "WebM (by its first bytes; labelled application/octet-stream)"),
}


@pytest.mark.parametrize(("media_type", "body", "said"), OTHER_AUDIO.values(),
                         ids=OTHER_AUDIO.keys())
async def test_audio_in_another_encoding_than_the_pcm_asked_for_is_an_error_not_noise(
        eleven, media_type, body, said):
    """Review (stop 63): a 200 whose body was audio, but not the raw PCM asked for (MP3, as
    ElevenLabs' default mp3_44100_128 comes back when the output format never reaches it:
    a proxy, a misconfigured base URL or account; Ogg/Opus, WAV with its header, FLAC,
    mu-law, WebM), was neither text nor labelled as such, so it was played as PCM: loud
    noise on the line, and seeded into the cache as an answer's audio for every caller. It
    fails now as a body that is no audio does, naming what came: by its label where that
    is an audio type surely not PCM, else by its first bytes' signature."""
    fake, server = eleven
    fake.other_audio = (media_type, body)
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    played: list[bytes] = []
    with pytest.raises(ProviderError) as info:
        async for chunk in tts.synthesize("Your order shipped on Monday."):
            played.append(chunk)
    await tts.aclose()
    assert played == []
    assert f"answered {said} instead of the pcm_16000 asked for" in str(info.value), str(info.value)


@pytest.mark.parametrize("start", [
    b"\xff\xfb",  # a first sample of -1025: an MP3 frame's sync and Layer III bits
    b"\xff\xfb\x90\x64",  # and a whole valid MP3 frame header, with no frame after it
    b"\xff\xff\xff\xff",  # silence just under zero: sync bits, no valid header
    b"ID3\x00",  # two loud samples spelling ID3, but no ID3 tag header
], ids=["ff-fb", "mp3-header", "minus-one", "id3-letters"])
@pytest.mark.parametrize("media_type",
                         ["audio/pcm", "application/octet-stream", "text/event-stream"])
async def test_pcm_that_starts_like_another_encoding_is_still_played(eleven, start, media_type):
    """PCM is any bytes: only a signature long and specific enough (or a second MP3 frame
    header where the first one says it is) is taken for another encoding."""
    fake, server = eleven
    pcm = start + tone(len("Your order shipped on Monday.") * MS_PER_CHAR, 16000)
    fake.other_audio = (media_type, pcm)
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    chunks = [chunk async for chunk in tts.synthesize("Your order shipped on Monday.")]
    await tts.aclose()
    assert b"".join(chunks) == pcm


def test_a_seed_whose_voice_answers_mp3_fails_and_stores_no_audio(eleven, tmp_path):
    """Review (stop 63): the seed's side: the MP3 body was stored as an answer's audio and
    published, replayed as noise to every caller asking. Now the seed fails, nothing is
    stored for the answers."""
    fake, server = eleven
    fake.other_audio = ("audio/mpeg", _mp3_frames())
    store = LocalStore(tmp_path / "store")
    plan = parse_seed_csv(small_faq_csv().encode("utf-8"), "faq.csv")
    loop = asyncio.new_event_loop()
    tts = ElevenLabsTTS("test-key", voice_id="voice-1", base_url=server.url)
    try:
        with pytest.raises(Exception, match="audio/mpeg \\(MP3\\) instead of the pcm_16000"):
            render_answers(plan, store, blocking_renderer(tts, loop), voice_id(tts),
                           progress=False)
    finally:
        loop.run_until_complete(tts.aclose())
        loop.close()
    keys = {audio_key(e.answer, voice_id(tts)) for e in plan.entries.values() if e.answer}
    assert fake.requests and keys and not [key for key in keys if store.has_audio(key)]


def test_a_reseed_after_a_model_or_rate_change_renders_the_answers_again(eleven, tmp_path):
    """The seed keys an answer's audio by its text and voice. ElevenLabs' voice id alone named
    the voice, so a re-seed after changing elevenlabs_model_id or elevenlabs_sample_rate found
    every answer already rendered and kept serving the old model's (or rate's) audio."""
    fake, server = eleven
    store = LocalStore(tmp_path / "store")
    plan = parse_seed_csv(small_faq_csv().encode("utf-8"), "faq.csv")
    answers = sum(1 for e in plan.entries.values() if e.answer)
    loop = asyncio.new_event_loop()  # the CLI's way: a private loop drives the cloud voice

    def seed_audio(**voice: object) -> tuple[int, int, set[int]]:
        """(rendered, reused, sample rates stored) of the seed's rendering step."""
        tts = ElevenLabsTTS("test-key", voice_id="voice-1", base_url=server.url, **voice)
        try:
            entries, rendered, reused = render_answers(plan, store, blocking_renderer(tts, loop),
                                                       voice_id(tts), progress=False)
        finally:
            loop.run_until_complete(tts.aclose())
        rates = {store.get_audio(e.audio_key).sample_rate for e in entries.values()
                 if e.audio_key}
        return rendered, reused, rates

    try:
        assert seed_audio() == (answers, 0, {16000})
        assert seed_audio() == (0, answers, {16000})  # nothing changed: all reused
        asked = len(fake.requests)
        assert seed_audio(model_id="eleven_multilingual_v2") == (answers, 0, {16000})
        assert {r["model_id"] for r in fake.requests[asked:]} == {"eleven_multilingual_v2"}
        assert seed_audio(sample_rate=24000) == (answers, 0, {24000})
        assert seed_audio(model_id="eleven_multilingual_v2") == (0, answers, {16000})
    finally:
        loop.close()


@pytest.mark.slow
async def test_a_replica_whose_voice_was_down_at_start_becomes_ready_once_it_is_back(
        settings, runtime, monkeypatch) -> None:
    """Start-up renders the fillers, hand-off and idle prompts with the configured voice
    (Runtime.render_prompts, in Services._load). With a cloud voice (ElevenLabs) that is
    briefly unavailable when the replica starts (an outage, a 503, a DNS blip during a
    rollout), _load records load_error and returns: nothing ever tries again, /readyz answers
    503 for the life of the process while /healthz stays 200 (so nothing restarts it either).
    Every replica rolled out during the blip is out of rotation for good; a whole cluster
    restarted then takes no calls at all, though cached answers need no voice. A transient
    provider failure at start-up should be retried: once the voice answers again the
    replica should become ready (here within 30 s; the retry's backoff is
    shortened to 50-100 ms)."""
    monkeypatch.setattr("gateway.services.LOAD_RETRY_S", (0.05, 0.1))
    voice = FakeElevenLabs()
    voice.status = 503
    with ServerThread(voice.app) as fake:
        cloud = settings.replace(tts_provider="elevenlabs", elevenlabs_api_key=voice.api_key,
                                 elevenlabs_base_url=fake.url)
        tts = create_tts(cloud, runtime.model_executor)
        # The warm models, with the cloud voice and no prompts rendered yet.
        booting = dataclasses.replace(runtime, tts=tts, prompts=AudioBank())
        services = Services(cloud, booting)
        try:
            await services.start()
            # The start-up asked the voice, was refused, and asks again (the voice is asked
            # one prompt at a time, and the adapter asks a 503 four times in all: a fifth
            # request is the start-up's retry).
            assert await voice.requests.reach(1), "the start-up never asked the voice"
            assert await voice.requests.reach(5), (
                f"the start-up never asked the voice again: {services.readiness()}")
            assert not services.ready and services.load_error is not None
            voice.status = 200  # the voice is back
            assert services._load_task is not None
            # The start-up ends (ready, or given up) when its task does: awaited, not polled
            # (30 s only bounds a start-up that would go on for good).
            await asyncio.wait([services._load_task], timeout=30)
            assert services.ready, ("the voice answers again, but the replica stays not ready "
                                    f"for good: {services.readiness()}")
        finally:
            await services.aclose()
            await tts.aclose()


@pytest.mark.slow
async def test_a_voice_that_renders_the_prompts_as_no_audio_keeps_the_replica_unready(
        settings, runtime, monkeypatch) -> None:
    """Review (stop 66): start-up kept whatever the voice rendered for each prompt, no audio
    included. A voice answering 200 and an empty body at start-up (what a reply's
    sentence fails as tts_failed: responder.tts_audio) left the replica ready with silent
    clips for the life of the process: every failed turn's apology, every filler and hold
    phrase and the handoff message were silence, even once the voice answered again. A
    phrase rendered as no audio now fails the render: /readyz says why, the start-up asks
    again, and the replica is ready once the voice answers with audio."""
    monkeypatch.setattr("gateway.services.LOAD_RETRY_S", (0.05, 0.1))
    voice = FakeElevenLabs()
    voice.silent = True
    with ServerThread(voice.app) as fake:
        cloud = settings.replace(tts_provider="elevenlabs", elevenlabs_api_key=voice.api_key,
                                 elevenlabs_base_url=fake.url)
        tts = create_tts(cloud, runtime.model_executor)
        booting = dataclasses.replace(runtime, tts=tts, prompts=AudioBank())
        services = Services(cloud, booting)
        try:
            await services.start()
            # Asked once, then again by the start-up's retry: never ready meanwhile.
            assert await voice.requests.reach(2), f"never asked again: {services.readiness()}"
            assert not services.ready
            assert "returned no audio" in (services.load_error or ""), services.readiness()
            assert len(booting.prompts) == 0
            voice.silent = False  # the voice answers with audio again
            assert services._load_task is not None
            await asyncio.wait([services._load_task], timeout=30)
            assert services.ready, services.readiness()
            assert booting.prompts.audio("apology", 16000, "pcm16"), "a silent apology"
        finally:
            await services.aclose()
            await tts.aclose()


@pytest.mark.parametrize("stall", ["stall_before_response", "stall_before_audio"])
async def test_a_stream_with_no_audio_fails_at_its_first_audio_deadline(eleven, stall):
    # A stalled synthesis (no answer, or headers and then nothing) used to wait for httpx's
    # read timeout, 30 s of silence on the line. It fails once the deadline passes on the
    # clock (here a manual one), never before.
    fake, server = eleven
    getattr(fake, stall).set()
    clock = ManualClock()
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url,
                        first_audio_timeout_s=4.0, clock=clock)
    synthesis = asyncio.ensure_future(_all(tts.synthesize("Our branches open at nine.")))
    try:
        assert await fake.requests.reach(1), "never asked"
        await clock.advance(3.9)
        assert not synthesis.done()
        await clock.advance(0.2)
        fake.release.set()  # the audio, now too late: the synthesis failed at the deadline
        with pytest.raises(ProviderError, match=r"no audio within 4 s of the request"):
            await synthesis
    finally:
        synthesis.cancel()
        await tts.aclose()
    # The next sentence, once the voice answers again, is spoken as ever.
    getattr(fake, stall).clear()
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url,
                        first_audio_timeout_s=4.0, clock=clock)
    assert sum(map(len, await _all(tts.synthesize("Hello.")))) > 0
    await tts.aclose()


async def _all(chunks) -> list[bytes]:
    return [chunk async for chunk in chunks]


async def _call_on_the_fake_voice(fake: FakeElevenLabs, server: ServerThread
                                  ) -> tuple[CallHarness, ElevenLabsTTS]:
    """A started call whose voice is the real SDK on the fake (default settings, on the
    call's clock), its agent answering "Our branches open at nine."."""
    h = CallHarness()
    cloud = Settings.load({"tts_provider": "elevenlabs", "elevenlabs_api_key": fake.api_key,
                           "elevenlabs_base_url": server.url}, environ={})
    tts = ElevenLabsTTS.from_settings(cloud, clock=h.clock)
    h.responder._tts = tts  # the harness's voice, replaced by the real SDK on the fake
    h.llm.reply = "Our branches open at nine."
    await h.start()
    return h, tts


def _an_error(h: CallHarness) -> "asyncio.Future[list[dict[str, object]]]":
    """The call's ``error`` events once there are any: what ``_retry_wait`` races a retry
    against (the turn failed instead of asking again)."""
    async def errors() -> list[dict[str, object]]:
        await h.output.until(lambda: h.output.of("error"))
        return h.output.of("error")

    return asyncio.ensure_future(errors())


async def test_a_call_whose_voice_stalls_hears_the_apology_at_the_deadline(eleven):
    # The call's side: the agent's sentence goes to a voice that never answers. The turn
    # fails as `tts_failed` when the first-audio deadline (the setting's default, on the
    # call's clock) passes, the caller hears the apology then, not 30 s of silence, and
    # the next turn is answered once the voice is back.
    fake, server = eleven
    fake.stall_before_audio.set()
    h, tts = await _call_on_the_fake_voice(fake, server)
    assert tts._first_audio_timeout_s == 4.0  # the setting's default
    try:
        await h.text("when do you open")
        asked_at = h.clock.now()
        assert await fake.requests.reach(1), "never asked"
        await assert_a_stalled_voice_fails_the_turn(
            h, asked_at, "no audio within 4 s", ["apology"],
            meanwhile=lambda: h.output.frames == [])  # silence, so far

        fake.stall_before_audio.clear()  # the voice is back
        await h.wait(2000)
        await h.text("and on saturday")
        assert await h.output.until(lambda: h.output.of("response", source="llm"))
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
        assert len(fake.requests) == 2 and len(h.output.of("error")) == 1
    finally:
        await h.stop()
        await tts.aclose()


async def test_the_first_audio_deadline_leaves_a_barge_in_a_cancel():
    # The deadline runs on the call's clock (gateway.clock.deadline): a reply cancelled
    # meanwhile (a barge-in) is cancelled, not reported as a stall, and a block that ends
    # in time leaves no timer behind.
    clock = ManualClock()

    async def waits_for_audio() -> None:
        async with deadline(clock, 4.0):
            await asyncio.Event().wait()

    reply = asyncio.ensure_future(waits_for_audio())
    await clock.advance(1.0)
    reply.cancel()
    await clock.settle()
    assert reply.cancelled()
    async with deadline(clock, 4.0) as in_time:
        await clock.advance(1.0)
    await clock.advance(5.0)
    assert not in_time.expired and clock.sleeping == 0


async def test_a_call_whose_voice_stalls_mid_sentence_hears_the_apology_at_the_gap_timeout(eleven):
    # The voice answers, streams the sentence's first piece, then sends nothing with the
    # connection open. httpx's read timeout (30 s) was all that ended that silence; now
    # the turn fails as `tts_failed` once tts_gap_timeout_s (4 s, on the call's clock)
    # passes with no audio, the apology plays, and the next turn is answered.
    fake, server = eleven
    fake.hold_after_first.set()
    h, tts = await _call_on_the_fake_voice(fake, server)
    # The stall starts once the call has all of the first piece's audio (the fake sends
    # piece_bytes + 1, even) and asks for more, however the SDK splits it into chunks. A
    # chunk_size SDK holds back a partial chunk until the stream goes on: the piece is a
    # whole number of them (two). The clock has stood since the text: the stall starts
    # then on it.
    piece = 2 * tts._chunk_bytes
    fake.piece_bytes = piece - 1
    received = 0
    piece_in = asyncio.Event()
    synthesize = tts.synthesize

    async def counting(text: str) -> AsyncIterator[bytes]:
        nonlocal received
        async for chunk in synthesize(text):
            yield chunk
            received += len(chunk)  # the call took it and asks for the next
            if received >= piece:
                piece_in.set()

    tts.synthesize = counting  # type: ignore[method-assign]
    try:
        await h.text("when do you open")
        await asyncio.wait_for(piece_in.wait(), 30)  # a bound on a hang, never a pace
        assert received == piece, f"{received} bytes of the first piece's {piece}"
        await assert_a_stalled_voice_fails_the_turn(
            h, h.clock.now(), "no audio for 4 s in the middle of a synthesis", ["llm", "apology"])

        fake.hold_after_first.clear()  # the voice is well again
        await h.wait(2000)
        await h.text("and on saturday")
        assert await h.output.until(lambda: len(h.output.of("response", source="llm")) == 2)
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["llm", "apology", "llm"]
        assert len(fake.requests) == 2 and len(h.output.of("error")) == 1
    finally:
        await h.stop()
        await tts.aclose()


async def test_a_call_whose_voice_returns_no_audio_hears_the_apology(eleven):
    # The voice answers 200 and a body with no audio. The sentence was announced as said
    # (a `response` event) and played as nothing: the caller heard silence, no error was
    # counted, and the context kept words nobody heard. Now the synthesis fails as
    # `tts_failed` (the apology, from the pre-rendered prompts), and the next turn works.
    fake, server = eleven
    fake.silent = True
    h, tts = await _call_on_the_fake_voice(fake, server)
    try:
        await h.text("when do you open")
        assert await h.output.until(lambda: h.output.of("error") or h.output.of("response"))
        await h.wait(3000)
        errors = h.output.of("error")
        assert [(e["code"], e["turn"]) for e in errors] == [("tts_failed", 1)], errors
        assert "returned no audio" in errors[0]["message"], errors[0]["message"]
        assert [e["source"] for e in h.output.of("response")] == ["apology"]
        assert h.output.frames, "no apology audio"
        assert h.stats.errors["tts_failed"] == 1, h.stats.errors

        fake.silent = False  # the voice is well again
        await h.text("and on saturday")
        assert await h.output.until(lambda: h.output.of("response", source="llm"))
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
    finally:
        await h.stop()
        await tts.aclose()


async def test_a_call_whose_voice_answers_mp3_hears_the_apology_not_noise(eleven):
    # Review (stop 63): the call's side: the voice answered MP3 for the pcm_16000 asked
    # for and the caller heard it played as PCM, loud noise. Now the turn fails as
    # `tts_failed` (the apology), and the next turn works once the voice is right again.
    fake, server = eleven
    fake.other_audio = ("audio/mpeg", _mp3_frames())
    h, tts = await _call_on_the_fake_voice(fake, server)
    try:
        await h.text("when do you open")
        assert await h.output.until(lambda: h.output.of("error") or h.output.of("response"))
        await h.wait(3000)
        errors = h.output.of("error")
        assert [(e["code"], e["turn"]) for e in errors] == [("tts_failed", 1)], errors
        assert "audio/mpeg (MP3) instead of the pcm_16000" in errors[0]["message"], errors
        assert [e["source"] for e in h.output.of("response")] == ["apology"]
        assert h.stats.errors["tts_failed"] == 1, h.stats.errors

        fake.other_audio = None
        await h.text("and on saturday")
        assert await h.output.until(lambda: h.output.of("response", source="llm"))
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["apology", "llm"]
    finally:
        await h.stop()
        await tts.aclose()


# The 429s ElevenLabs documents (its errors page: `code` concurrent_limit_exceeded or
# rate_limit_exceeded; the legacy `status` too_many_concurrent_requests or system_busy).
CONCURRENT = {"type": "rate_limit_error", "code": "concurrent_limit_exceeded",
              "status": "too_many_concurrent_requests",
              "message": "Too many concurrent requests for your subscription."}
BUSY = {"status": "system_busy", "message": "Our services are experiencing high traffic."}


class WatchedClock:
    """A ManualClock's time for the adapter, telling the test each wait it begins other
    than its first-audio deadline's: the wait before a retry, seen and timed on the clock."""

    def __init__(self, inner: ManualClock, deadline_s: float = 4.0) -> None:
        self.inner = inner
        self.waits: list[float] = []
        self._deadline_s = deadline_s
        self._waited = asyncio.Event()

    def now(self) -> float:
        return self.inner.now()

    async def sleep(self, seconds: float) -> None:
        if seconds != self._deadline_s:
            self.waits.append(seconds)
            self._waited.set()
        await self.inner.sleep(seconds)

    async def wait_begun(self, count: int) -> float:
        while len(self.waits) < count:
            self._waited.clear()
            await self._waited.wait()
        return self.waits[count - 1]


async def _retry_wait(clock: WatchedClock, failed: "asyncio.Future[object]", count: int = 1
                      ) -> float:
    """The adapter's ``count``-th wait before a retry, once it begins; the test fails if
    ``failed`` (the synthesis, or the call's error) ends first: no retry, a failure."""
    waiting = asyncio.ensure_future(clock.wait_begun(count))
    await asyncio.wait([waiting, failed], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        outcome = (failed.exception() or failed.result()) if failed.done() else "nothing in 30 s"
        raise AssertionError(f"not retried: {outcome}")
    return waiting.result()


SERVER_ERROR = {"status": "server_error", "message": "try again"}


@pytest.mark.parametrize(("status", "detail", "headers", "asked"), [
    (429, CONCURRENT, {}, None),
    (429, BUSY, {}, None),
    (429, CONCURRENT, {"Retry-After": "1"}, 1.0),
    (500, SERVER_ERROR, {}, None),
    (502, SERVER_ERROR, {}, None),
    (503, SERVER_ERROR, {}, None),
    (504, SERVER_ERROR, {}, None),
], ids=["concurrency", "system-busy", "retry-after", "500", "502", "503", "504"])
async def test_a_passing_refusal_is_retried_after_a_short_wait_on_the_clock(
        eleven, caplog, status, detail, headers, asked):
    """ElevenLabs refuses a synthesis with a 429 (the account's concurrency limit, or its
    traffic): routine and short-lived at call-center scale. The SDK does not retry a
    streaming request, and the sentence failed (a call's tts_failed and the apology
    instead of the answer). Now it is asked again after a short wait on the adapter's
    clock (Retry-After's when ElevenLabs gives one), and the answer is whole. So is a
    server error before any audio (an overloaded or restarting service, or a gateway in
    front of it): gone a moment later, and nothing was said yet."""
    caplog.set_level(logging.INFO, logger="voicegate")
    fake, server = eleven
    fake.refusals = [(status, detail, headers)]
    clock = WatchedClock(ManualClock())
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url,
                        first_audio_timeout_s=4.0, clock=clock)
    text = "Our branches open at nine."
    synthesis = asyncio.ensure_future(_all(tts.synthesize(text)))
    try:
        wait = await _retry_wait(clock, synthesis)
        assert len(fake.requests) == 1  # refused, and not asked again before the wait
        if asked is None:
            assert 0.05 <= wait <= 0.1, wait  # the first backoff, jittered
        else:
            assert wait == asked
        await clock.inner.advance(wait)
        chunks = await asyncio.wait_for(synthesis, 30)
    finally:
        synthesis.cancel()
        await tts.aclose()
    assert sum(map(len, chunks)) == 16000 * len(text) * MS_PER_CHAR // 1000 * 2
    assert len(fake.requests) == 2 and fake.requests[1]["text"] == text
    retried = [r.fields for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage() == "elevenlabs_retry"]
    assert len(retried) == 1 and retried[0]["status"] == status, retried
    assert retried[0]["wait_s"] == round(wait, 3) and retried[0]["retry"] == 1
    assert "test-key" not in caplog.text and text not in caplog.text


async def test_a_429_that_persists_fails_after_a_bounded_number_of_retries(eleven):
    """A 429 on every request: asked again a bounded number of times with growing waits
    (all far inside the first-audio budget), then the sentence fails with the 429 itself,
    not the first-audio deadline's stall."""
    fake, server = eleven
    fake.refusals = [(429, BUSY, {})] * 10
    clock = WatchedClock(ManualClock())
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url,
                        first_audio_timeout_s=4.0, clock=clock)
    started = clock.now()
    synthesis = asyncio.ensure_future(_all(tts.synthesize("Our branches open at nine.")))
    try:
        for n in (1, 2, 3):
            await clock.inner.advance(await _retry_wait(clock, synthesis, n))
        with pytest.raises(ProviderError, match=r"HTTP 429: Our services .* \(asked 4 times\)"):
            await asyncio.wait_for(synthesis, 30)
    finally:
        synthesis.cancel()
        await tts.aclose()
    assert len(fake.requests) == 4 and len(fake.refusals) == 6
    assert len(clock.waits) == 3 and all(  # 0.1 s doubling, each jittered to 50-100 %
        base / 2 <= w <= base for w, base in zip(clock.waits, (0.1, 0.2, 0.4))), clock.waits
    assert clock.now() - started < 1.0


@pytest.mark.parametrize(("status", "detail", "headers"), [
    (400, {"status": "quota_exceeded", "message": "You have insufficient quota"}, {}),
    (401, {"status": "quota_exceeded", "message": "You have insufficient quota"}, {}),
    (422, {"status": "invalid_parameters", "message": "bad model"}, {}),
    (429, {"code": "quota_exceeded", "message": "Quota exceeded"}, {}),
    (429, CONCURRENT, {"Retry-After": "30"}),
], ids=["400-quota", "401-quota", "422", "429-quota", "429-retry-after-too-long"])
async def test_a_refusal_that_will_not_clear_soon_fails_at_once(eleven, status, detail,
                                                                headers):
    """Only a refusal that clears in moments is asked again. A bad request, a refused key,
    an exhausted quota, or a 429 whose Retry-After is beyond the first-audio budget (the
    caller would hear only silence, then the apology) fail at once, as before."""
    fake, server = eleven
    fake.refusals = [(status, detail, headers)]
    clock = WatchedClock(ManualClock())
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url,
                        first_audio_timeout_s=4.0, clock=clock)
    try:
        with pytest.raises(ProviderError, match=f"HTTP {status}: {detail['message']}$"):
            await asyncio.wait_for(_all(tts.synthesize("Our branches open at nine.")), 30)
    finally:
        await tts.aclose()
    assert len(fake.requests) == 1 and clock.waits == []


async def test_a_call_whose_voice_is_rate_limited_once_hears_the_answer(eleven):
    # The call's side: the agent's sentence is refused once with a 429 and a Retry-After
    # of 1 s. The caller heard the apology (tts_failed) instead of the answer; now the
    # answer, 1 s (of the call's clock) later than it would have been, and no error.
    fake, server = eleven
    fake.refusals = [(429, CONCURRENT, {"Retry-After": "1"})]
    h, tts = await _call_on_the_fake_voice(fake, server)
    clock = WatchedClock(h.clock)
    tts._clock = clock  # the call's clock, its waits seen

    failed = _an_error(h)
    try:
        await h.text("when do you open")
        asked_at = h.clock.now()
        assert await fake.requests.reach(1), "never asked"
        wait = await _retry_wait(clock, failed)
        assert wait == 1.0 and h.output.frames == []
        await h.wait(1020)  # a frame past it: 51 steps of 20 ms, summed in floats
        assert await fake.requests.reach(2), "never asked again"
        assert await h.output.until(lambda: h.output.of("response"))
        await h.wait(3000)
        assert [e["source"] for e in h.output.of("response")] == ["llm"]
        assert h.output.of("error") == [] and not h.stats.errors.get("tts_failed")
        first_heard = h.output.frames[0][0] - asked_at
        assert 1.0 <= first_heard < 1.2, first_heard
    finally:
        failed.cancel()
        await h.stop()
        await tts.aclose()


def _unanswered_url() -> str:
    """A local address where nothing listens: a connection there is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(("drop", "logged", "reached"), [
    ("close", {"error": "RemoteProtocolError"}, 0),
    ("reset", {"error": "ReadError"}, 0),
    ("headers", {"status": 200, "error": "RemoteProtocolError"}, 1)],
    ids=["close", "reset", "a-200-before-its-audio"])
async def test_a_connection_dropped_before_any_response_is_asked_again(eleven, caplog, drop,
                                                                       logged, reached):
    """Review (stop 66): a connection that failed before any response (closed or reset
    by a load balancer or a restarting gateway: httpx's RemoteProtocolError "Server
    disconnected without sending a response", ReadError, ConnectError, which the SDK
    lets through) was not asked again, as a passing 5xx is: a network blip was the
    call's tts_failed and the apology instead of the answer. Now it is asked again after
    the same short wait on the clock, logged with the error's name, and the answer is
    whole: nothing was said yet. Review (stop 67): so is a 200 whose connection dropped
    after its headers, before any audio byte (``headers``), logged with its status; its
    request reached ElevenLabs (``reached``), so its characters may be billed too."""
    caplog.set_level(logging.INFO, logger="voicegate")
    fake, server = eleven
    clock = WatchedClock(ManualClock())
    text = "Our branches open at nine."
    with DroppingDoor(server.port) as door:
        door.drops = [drop]
        tts = ElevenLabsTTS("test-key", voice_id="v", base_url=door.url,
                            first_audio_timeout_s=4.0, clock=clock)
        synthesis = asyncio.ensure_future(_all(tts.synthesize(text)))
        try:
            wait = await _retry_wait(clock, synthesis)
            assert 0.05 <= wait <= 0.1, wait  # the first backoff, jittered
            assert list(door.connections) == [drop] and len(fake.requests) == reached
            await clock.inner.advance(wait)
            chunks = await asyncio.wait_for(synthesis, 30)
        finally:
            synthesis.cancel()
            await tts.aclose()
    assert b"".join(chunks) == tone(len(text) * MS_PER_CHAR, 16000)
    assert list(door.connections) == [drop, None] and len(fake.requests) == reached + 1
    retried = [r.fields for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage() == "elevenlabs_retry"]
    assert retried == [{**logged, "retry": 1, "wait_s": round(wait, 3)}], retried
    assert "test-key" not in caplog.text and text not in caplog.text


_UNREACHABLE = "cannot reach the synthesis endpoint"
_DROPPED_200 = "answered 200, then the connection dropped before any audio"


@pytest.mark.parametrize(("drop", "failure", "reached"), [
    ("close", f"{_UNREACHABLE}: RemoteProtocolError", 0),
    ("reset", f"{_UNREACHABLE}: ReadError", 0),
    ("refused", f"{_UNREACHABLE}: ConnectError", 0),
    ("headers", f"{_DROPPED_200}: RemoteProtocolError", 4)],
    ids=["close", "reset", "refused", "a-200-before-its-audio"])
async def test_a_connection_that_fails_every_time_fails_clearly_after_the_retries(
        eleven, drop, failure, reached):
    """Review (stop 66): the same failure on every attempt (the voice unreachable) is
    asked again a bounded number of times (``max_retries``: 3), with the 5xx's growing
    waits, far inside the first-audio budget, then fails saying what happened and how
    often it was asked. Review (stop 67): a 200 dropped before its first audio byte every
    time too, naming the drop (every request reached ElevenLabs: ``reached``)."""
    fake, server = eleven
    clock = WatchedClock(ManualClock())
    with DroppingDoor(server.port) as door:
        door.drops = [drop] * 10
        url = _unanswered_url() if drop == "refused" else door.url
        tts = ElevenLabsTTS("test-key", voice_id="v", base_url=url,
                            first_audio_timeout_s=4.0, clock=clock)
        started = clock.now()
        synthesis = asyncio.ensure_future(_all(tts.synthesize("Our branches open at nine.")))
        try:
            for n in (1, 2, 3):
                await clock.inner.advance(await _retry_wait(clock, synthesis, n))
            with pytest.raises(ProviderError, match=(
                    rf"^elevenlabs: {re.escape(failure)} \(asked 4 times\)$")):
                await asyncio.wait_for(synthesis, 30)
        finally:
            synthesis.cancel()
            await tts.aclose()
    assert len(fake.requests) == reached
    assert len(door.connections) == (0 if drop == "refused" else 4)
    assert len(clock.waits) == 3 and all(  # 0.1 s doubling, each jittered to 50-100 %
        base / 2 <= w <= base for w, base in zip(clock.waits, (0.1, 0.2, 0.4))), clock.waits
    assert clock.now() - started < 1.0


async def test_a_dropped_connection_is_not_asked_again_past_the_first_audio_budget(eleven):
    """Review (stop 66): a retry after a dropped connection waits only when the wait ends
    inside the first-audio budget (here 0.15 s: the first wait, 0.05-0.1 s, fits; the
    second, 0.1-0.2 s, never does): past it the sentence fails at once, saying so, rather
    than leave the caller in silence for nothing."""
    fake, server = eleven
    clock = WatchedClock(ManualClock(), deadline_s=0.15)
    with DroppingDoor(server.port) as door:
        door.drops = ["close"] * 10
        tts = ElevenLabsTTS("test-key", voice_id="v", base_url=door.url,
                            first_audio_timeout_s=0.15, clock=clock)
        started = clock.now()
        synthesis = asyncio.ensure_future(_all(tts.synthesize("Our branches open at nine.")))
        try:
            await clock.inner.advance(await _retry_wait(clock, synthesis))
            with pytest.raises(ProviderError, match=r"RemoteProtocolError \(asked 2 times\)$"):
                await asyncio.wait_for(synthesis, 30)
        finally:
            synthesis.cancel()
            await tts.aclose()
    assert len(door.connections) == 2 and len(clock.waits) == 1
    assert clock.now() - started < 0.15


async def test_a_connection_lost_after_audio_began_is_not_asked_again(eleven):
    """Once any audio came, a lost connection fails the sentence: asked again, the caller
    would hear its start twice."""
    fake, server = eleven
    clock = WatchedClock(ManualClock())
    with DroppingDoor(server.port) as door:
        door.drops = [("cut", 1500)]  # the headers and some of the audio, then closed
        tts = ElevenLabsTTS("test-key", voice_id="v", base_url=door.url, clock=clock)
        got: list[bytes] = []
        try:
            with pytest.raises(ProviderError, match="RemoteProtocolError$"):
                async for chunk in tts.synthesize("Our branches open at nine, every day."):
                    got.append(chunk)
        finally:
            await tts.aclose()
    assert got and len(door.connections) == 1 and len(fake.requests) == 1
    assert clock.waits == []


@pytest.mark.parametrize("drop, requests", [("close", 1), ("headers", 2)],
                         ids=["before-any-response", "a-200-before-its-audio"])
async def test_a_call_whose_voice_drops_a_connection_once_hears_the_answer(eleven, drop,
                                                                           requests):
    # The call's side: the agent's sentence goes out on a connection that is closed with
    # no response (or, Review (stop 67), after a 200's headers, before any audio: both
    # requests reached the fake). The caller heard the apology (tts_failed); now the
    # answer, a short wait (of the call's clock) later, and no error.
    fake, server = eleven
    with DroppingDoor(server.port) as door:
        door.drops = [drop]
        h, tts = await _call_on_the_fake_voice(fake, door)
        clock = WatchedClock(h.clock)
        tts._clock = clock  # the call's clock, its waits seen

        failed = _an_error(h)
        try:
            await h.text("when do you open")
            wait = await _retry_wait(clock, failed)
            assert wait <= 0.1 and h.output.frames == []
            await h.wait(120)
            assert await h.output.until(lambda: h.output.of("response"))
            await h.wait(3000)
            assert [e["source"] for e in h.output.of("response")] == ["llm"]
            assert h.output.of("error") == [] and not h.stats.errors.get("tts_failed")
            assert list(door.connections)[:2] == [drop, None]
            assert len(fake.requests) == requests
        finally:
            failed.cancel()
            await h.stop()
            await tts.aclose()


async def test_a_call_whose_voice_drops_after_some_audio_hears_the_apology_once(eleven):
    """Review (stop 67): once any audio of the sentence came, a dropped connection is not
    asked again (the caller would hear its start twice): the turn fails as tts_failed and
    the apology follows, one request made."""
    fake, server = eleven
    with DroppingDoor(server.port) as door:
        door.drops = [("cut", 1500)]  # the headers and some of the audio, then closed
        h, tts = await _call_on_the_fake_voice(fake, door)
        clock = WatchedClock(h.clock)
        tts._clock = clock
        try:
            await h.text("when do you open")
            assert await h.output.until(lambda: h.output.of("error"))
            await h.wait(3000)
            errors = h.output.of("error")
            assert [(e["code"], e["turn"]) for e in errors] == [("tts_failed", 1)], errors
            assert "RemoteProtocolError" in errors[0]["message"], errors[0]["message"]
            assert [e["source"] for e in h.output.of("response")] == ["llm", "apology"]
            assert clock.waits == [] and len(fake.requests) == 1
            assert list(door.connections)[:1] == [("cut", 1500)]
        finally:
            await h.stop()
            await tts.aclose()


def _urgent(coro, urgency: int) -> "asyncio.Future[list[bytes]]":
    """``coro`` as a task whose syntheses are this ``URGENCY`` (as the responder starts a
    sentence fetched ahead, and a seed its answers)."""
    context = contextvars.copy_context()
    context.run(URGENCY.set, urgency)
    return asyncio.get_running_loop().create_task(coro, context=context)


async def test_capped_syntheses_wait_for_a_slot_and_a_first_sentence_goes_first(eleven):
    # Over the account's concurrency limit ElevenLabs refuses with a 429 whichever request
    # comes: the first sentence a caller waits for in silence as likely as one fetched
    # ahead or a seed's answer. With a cap, the replica stays under it, and a freed slot
    # goes to the first sentence.
    fake, server = eleven
    fake.hold_after_first.set()
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url, max_concurrent=1)
    playing = _urgent(_all(tts.synthesize("A sentence being synthesized.")), 0)
    try:
        assert await fake.requests.reach(1)
        seed = _urgent(_all(tts.synthesize("An answer the seed renders.")), SEEDING)
        ahead = _urgent(_all(tts.synthesize("A second sentence, fetched ahead.")), 1)
        first = _urgent(_all(tts.synthesize("Another caller's first sentence.")), 0)
        await asyncio.sleep(0.3)
        assert len(fake.requests) == 1 and tts.slots.waiting == 3  # none past the cap
        fake.release.set()
        for task in (playing, seed, ahead, first):
            assert await asyncio.wait_for(task, 10)
        assert [r["text"] for r in fake.requests][1:] == [
            "Another caller's first sentence.", "A second sentence, fetched ahead.",
            "An answer the seed renders."]
        assert tts.slots.busy == 0
    finally:
        fake.release.set()
        await tts.aclose()


async def _the_only_slot_held(fake, server) -> tuple[ElevenLabsTTS, ManualClock,
                                                     "asyncio.Future[list[bytes]]"]:
    """A voice capped at one synthesis, on a manual clock, its slot held by a long answer
    playing (held by the fake until ``fake.release``); its first audio already in, so
    that only a later synthesis' first-audio deadline can pass."""
    fake.hold_after_first.set()
    clock = ManualClock()
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url, max_concurrent=1,
                        first_audio_timeout_s=4.0, clock=clock)
    speaking = tts.synthesize("A long answer, playing.")
    first = await asyncio.wait_for(anext(speaking), 10)
    assert first and len(fake.requests) == 1
    return tts, clock, asyncio.ensure_future(_all(speaking))


async def test_a_seed_waits_for_a_slot_as_long_as_callers_hold_them_and_still_renders(eleven):
    # Review: a seed's answers wait behind every caller's sentence (SEEDING), but that wait
    # counted in the first-audio budget: under steady call load the seed's renders failed
    # after 4 s ("waiting for one of the N synthesis slots") and the seed published nothing.
    # Nobody listens to a seed's answer: its budget starts once it holds a slot.
    fake, server = eleven
    tts, clock, playing = await _the_only_slot_held(fake, server)
    try:
        seed = _urgent(_all(tts.synthesize("An answer the seed renders.")), SEEDING)
        await asyncio.sleep(0.1)
        assert tts.slots.waiting == 1
        await clock.advance(30.0)  # callers hold the only slot far past the budget
        await asyncio.sleep(0.1)
        assert not seed.done() and tts.slots.waiting == 1
        fake.release.set()
        assert await asyncio.wait_for(playing, 10)
        assert await asyncio.wait_for(seed, 10)  # its turn came: rendered, no error
        assert [r["text"] for r in fake.requests] == ["A long answer, playing.",
                                                     "An answer the seed renders."]
        assert tts.slots.busy == 0
    finally:
        fake.release.set()
        await tts.aclose()


def _ahead(coro, wanted: asyncio.Event) -> "asyncio.Future[list[bytes]]":
    """``coro`` as the responder starts a sentence fetched ahead: its place (1) as its
    ``URGENCY``, and ``WANTED`` set once its reply starts reading it."""
    context = contextvars.copy_context()
    context.run(URGENCY.set, 1)
    context.run(WANTED.set, wanted)
    return asyncio.get_running_loop().create_task(coro, context=context)


async def test_a_sentence_fetched_ahead_has_its_budget_from_its_slot_or_its_reply_waiting(
        eleven):
    # Review: a reply's second sentence, fetched while the first plays, waited for a slot
    # behind other callers' first sentences, and that wait counted in its 4 s budget: it
    # failed (the apology in the middle of the reply) while the first was still playing,
    # nobody waiting for it yet. Its budget starts once it holds a slot, or once its reply
    # waits for it, whichever comes first.
    fake, server = eleven
    tts, clock, playing = await _the_only_slot_held(fake, server)
    try:
        wanted = asyncio.Event()
        ahead = _ahead(_all(tts.synthesize("Then bring your card.")), wanted)
        await asyncio.sleep(0.1)
        await clock.advance(10.0)  # the first sentence still plays: nobody waits for it
        await asyncio.sleep(0.1)
        assert not ahead.done() and tts.slots.waiting == 1
        wanted.set()  # the first sentence has played: the caller waits from here
        await asyncio.sleep(0.1)
        await clock.advance(4.1)
        with pytest.raises(ProviderError, match=r"all of it waiting for one of the 1 "):
            await asyncio.wait_for(ahead, 10)
        fake.release.set()
        assert await asyncio.wait_for(playing, 10)
        assert tts.slots.busy == 0 and tts.slots.waiting == 0
    finally:
        fake.release.set()
        await tts.aclose()


async def test_a_sentence_fetched_ahead_is_rendered_when_its_slot_comes_in_time(eleven):
    fake, server = eleven
    tts, clock, playing = await _the_only_slot_held(fake, server)
    try:
        ahead = _ahead(_all(tts.synthesize("Then bring your card.")), asyncio.Event())
        await asyncio.sleep(0.1)
        await clock.advance(10.0)
        fake.release.set()  # the slot frees before anyone waits for the sentence
        assert await asyncio.wait_for(playing, 10)
        assert await asyncio.wait_for(ahead, 10)
        assert [r["text"] for r in fake.requests] == ["A long answer, playing.",
                                                     "Then bring your card."]
    finally:
        fake.release.set()
        await tts.aclose()


async def test_a_wait_for_a_slot_past_the_first_audio_budget_fails_saying_so(eleven):
    fake, server = eleven
    tts, clock, playing = await _the_only_slot_held(fake, server)
    try:
        waiting = asyncio.ensure_future(_all(tts.synthesize("Our branches open at nine.")))
        await clock.advance(4.1)
        with pytest.raises(ProviderError, match=r"no audio within 4 s of the request "
                                                r"\(VOICEGATE_ELEVENLABS_FIRST_AUDIO_TIMEOUT_S\):"
                                                r" all of it waiting for one of the 1 synthesis "
                                                r"slots, none free "
                                                r"\(VOICEGATE_ELEVENLABS_MAX_CONCURRENT\)$"):
            await asyncio.wait_for(waiting, 10)
        assert len(fake.requests) == 1 and tts.slots.waiting == 0
        fake.release.set()
        assert await asyncio.wait_for(playing, 10)
        assert tts.slots.busy == 0
    finally:
        fake.release.set()
        await tts.aclose()


async def test_a_sentence_fetched_ahead_its_reply_waits_for_is_asked_again_after_a_429(eleven):
    """Review (stop 69): a reply's second sentence, fetched ahead while the first played,
    waited for a slot; its reply came to it (``WANTED``: its 4 s first-audio budget starts
    there) before the slot did, and the request it then made got a routine 429. That is
    asked again while the wait ends inside the budget, but the retry's budget was counted
    from the sentence's request, seconds before its reply wanted it, not from when its
    first-audio deadline started: nothing was left, the 429 failed the sentence at once
    (the caller heard the apology mid-reply) with 3 s of the budget still to run. A retry
    now counts from where the first-audio deadline started."""
    fake, server = eleven
    fake.hold_after_first.set()
    clock = WatchedClock(ManualClock())
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url, max_concurrent=1,
                        first_audio_timeout_s=4.0, clock=clock)
    speaking = tts.synthesize("A long answer, playing.")
    assert await asyncio.wait_for(anext(speaking), 10)
    playing = asyncio.ensure_future(_all(speaking))
    text = "Then bring your card."
    try:
        wanted = asyncio.Event()
        ahead = _ahead(_all(tts.synthesize(text)), wanted)
        await asyncio.sleep(0.1)
        await clock.inner.advance(10.0)  # the first sentence plays on: nobody waits for it
        wanted.set()  # its reply waits for it from here: its 4 s start now
        await asyncio.sleep(0.1)
        await clock.inner.advance(1.0)
        fake.refusals = [(429, CONCURRENT, {})]
        fake.release.set()  # the slot frees, 3 s of the budget left: the request is refused
        wait = await _retry_wait(clock, ahead)
        await clock.inner.advance(wait)
        chunks = await asyncio.wait_for(ahead, 10)
        assert await asyncio.wait_for(playing, 10)
    finally:
        fake.release.set()
        await tts.aclose()
    assert sum(map(len, chunks)) == 16000 * len(text) * MS_PER_CHAR // 1000 * 2
    assert [r["text"] for r in fake.requests] == ["A long answer, playing.", text, text]


def test_the_dropping_door_closes_at_once() -> None:
    """Review (stop 66, second look): closing the door's listener did not wake its
    accept() (Linux), so every test with a door waited out the 5 s join, its event loop
    frozen, and left the thread behind. Shut down first, it returns at once."""
    import socket

    from tests.fakes.tcp_drops import DroppingDoor

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    door = DroppingDoor(port)
    door.__enter__()
    door.__exit__(None, None, None)
    # Its join waits for the thread (5 s at most): a thread still blocked in accept() is
    # alive after it, whatever the machine's speed.
    assert not door._thread.is_alive()
