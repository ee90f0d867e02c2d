"""The real elevenlabs SDK against a local fake of the streaming-synthesis endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable, Iterator

import pytest

from gateway.audio_bank import AudioBank
from gateway.providers.base import ProviderError, TextToSpeech
from gateway.providers.elevenlabs_tts import ElevenLabsTTS
from gateway.providers.registry import create_tts
from gateway.services import Services
from tests.fakes.elevenlabs_server import MS_PER_CHAR, FakeElevenLabs
from tests.fakes.server import ServerThread


@pytest.fixture
def eleven() -> Iterator[tuple[FakeElevenLabs, ServerThread]]:
    fake = FakeElevenLabs()
    with ServerThread(fake.app) as server:
        yield fake, server


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


async def wait_for_async(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


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
            # The start-up asked the voice and was refused.
            assert await wait_for_async(lambda: len(voice.requests) >= 1, 20), \
                "the start-up never asked the voice"
            assert not services.ready
            assert await wait_for_async(lambda: services.load_error is not None, 20)
            voice.status = 200  # the voice is back
            became_ready = await wait_for_async(lambda: services.ready, 30)
            assert became_ready, ("the voice answers again, but the replica stays not ready "
                                  f"for good: {services.readiness()}")
        finally:
            await services.aclose()
            await tts.aclose()
