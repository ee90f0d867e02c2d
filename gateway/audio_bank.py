"""Pre-rendered audio held in memory, ready in every format a transport asks for.

The cache-hit path must send its first frame without touching disk, network or a
model, so clips are converted once (at load) to each configured output rate, and
encoded once to each configured wire encoding (μ-law 8 kHz for telephony), and
served from a dict afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audio import resample_pcm16
from .codec import MULAW, PCM16, encode

# (sample rate, encoding) pairs held ready beside the pcm16 rates: Twilio plays μ-law 8 kHz.
DEFAULT_ENCODED: tuple[tuple[int, str], ...] = ((8000, MULAW),)


@dataclass(frozen=True)
class Clip:
    key: str
    text: str
    pcm16: bytes
    sample_rate: int


class AudioBank:
    def __init__(self, rates: tuple[int, ...] = (8000, 16000, 24000, 48000),
                 encoded: tuple[tuple[int, str], ...] = DEFAULT_ENCODED) -> None:
        self._rates = rates
        self._encoded = encoded
        self._clips: dict[str, Clip] = {}
        self._converted: dict[tuple[str, int, str], bytes] = {}

    def add(self, clip: Clip) -> None:
        self._clips[clip.key] = clip
        for rate in self._rates:
            self._converted[(clip.key, rate, PCM16)] = resample_pcm16(
                clip.pcm16, clip.sample_rate, rate)
        for rate, encoding in self._encoded:
            self._converted[(clip.key, rate, encoding)] = encode(self.audio(clip.key, rate),
                                                                 encoding)

    def replace_all(self, clips: list[Clip]) -> None:
        """Swap in a new set of clips at once (a newly published cache version)."""
        fresh = AudioBank(self._rates, self._encoded)
        for clip in clips:
            fresh.add(clip)
        self._clips, self._converted = fresh._clips, fresh._converted

    def __contains__(self, key: str) -> bool:
        return key in self._clips

    def __len__(self) -> int:
        return len(self._clips)

    def clip(self, key: str) -> Clip:
        return self._clips[key]

    def audio(self, key: str, rate: int, encoding: str = PCM16) -> bytes:
        """The clip at ``rate`` in ``encoding``; a format outside the configured set is
        converted once, then kept."""
        try:
            return self._converted[(key, rate, encoding)]
        except KeyError:
            clip = self._clips[key]
            pcm = self._converted.get((key, rate, PCM16))
            if pcm is None:
                pcm = resample_pcm16(clip.pcm16, clip.sample_rate, rate)
                self._converted[(key, rate, PCM16)] = pcm
            converted = encode(pcm, encoding)
            self._converted[(key, rate, encoding)] = converted
            return converted
