"""The real elevenlabs SDK against a local fake of the streaming-synthesis endpoint."""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest

from gateway.providers.base import ProviderError, TextToSpeech
from gateway.providers.elevenlabs_tts import ElevenLabsTTS
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
