"""Shared fixtures: warm models once per session, one real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gateway.audio import resample_pcm16  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402
from gateway.server import BackgroundServer  # noqa: E402
import gateway.settings  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from tests.fakes.elevenlabs_server import FakeElevenLabs  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI  # noqa: E402
from tests.fakes.server import ServerThread  # noqa: E402
from tests.fakes.webhook_server import FakeWebhook  # noqa: E402

CALL_RATE = 16000

# The overload gate's busy signal off in every test server: their loops share two cores with
# the whole suite (a flood test leaves its server's loop busy for the next test's call).
# tests/test_overload.py sets it where it is what is tested; the lateness signal stays on.
gateway.settings.DEFAULT_OVERLOAD_LOOP_BUSY = 0.0


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # A store of the test session's own: never the relative var/store the README's
    # commands seed.
    store = tmp_path_factory.mktemp("store")
    return Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(store)}, environ={})


@pytest.fixture(scope="session")
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime.load(settings)
    yield rt


@pytest.fixture(scope="session")
def server(settings: Settings, runtime: Runtime) -> Iterator[BackgroundServer]:
    srv = BackgroundServer(settings, runtime).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def speak(runtime: Runtime) -> Callable[[str], bytes]:
    """Caller speech synthesized at test time by the local TTS, at 16 kHz."""
    cache: dict[tuple[str, int], bytes] = {}

    def render(text: str, rate: int = CALL_RATE) -> bytes:
        if (text, rate) not in cache:
            pcm = runtime.tts.synthesize_all(text)  # type: ignore[attr-defined]
            cache[(text, rate)] = resample_pcm16(pcm, runtime.tts.sample_rate, rate)
        return cache[(text, rate)]

    return render


@pytest.fixture
def llm_server() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (SSE, tool calls, faults)."""
    fake = FakeOpenAI()
    with ServerThread(fake) as server:
        try:
            yield fake, server
        finally:
            fake.release.set()  # no held reply outlives its test


@pytest.fixture
def eleven() -> Iterator[tuple[FakeElevenLabs, ServerThread]]:
    """An ElevenLabs-compatible streaming TTS server on 127.0.0.1."""
    fake = FakeElevenLabs()
    with ServerThread(fake.app) as server:
        try:
            yield fake, server
        finally:
            fake.release.set()  # no stalled stream outlives its test


@pytest.fixture
def webhook() -> Iterator[tuple[FakeWebhook, ServerThread]]:
    fake = FakeWebhook()
    with ServerThread(fake.app) as server:
        try:
            yield fake, server
        finally:
            fake.release.set()  # no held answer outlives its test
