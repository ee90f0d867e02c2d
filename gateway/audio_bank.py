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
        # key -> (clip, its audio by (rate, encoding)): one dict, swapped whole by
        # replace_all, so one lookup gives a clip's text and audio from the same version.
        self._held: dict[str, tuple[Clip, dict[tuple[int, str], bytes]]] = {}

    def add(self, clip: Clip) -> None:
        forms: dict[tuple[int, str], bytes] = {}
        for rate in self._rates:
            forms[(rate, PCM16)] = resample_pcm16(clip.pcm16, clip.sample_rate, rate)
        for rate, encoding in self._encoded:
            forms[(rate, encoding)] = encode(_converted(clip, forms, rate, PCM16), encoding)
        self._held[clip.key] = (clip, forms)

    def replace_all(self, clips: list[Clip]) -> None:
        """Swap in a new set of clips at once (a newly published cache version)."""
        fresh = AudioBank(self._rates, self._encoded)
        for clip in clips:
            try:
                fresh.add(clip)
            except ValueError as exc:  # nothing swapped: the clips held stay, whole
                raise ValueError(f"the audio of {clip.key!r} cannot be converted "
                                 f"({len(clip.pcm16)} bytes at {clip.sample_rate} Hz): {exc}"
                                 ) from exc
        self._held = fresh._held

    def __contains__(self, key: str) -> bool:
        return key in self._held

    def __len__(self) -> int:
        return len(self._held)

    def clip(self, key: str) -> Clip:
        return self._held[key][0]

    def find(self, key: str) -> Clip | None:
        """The clip, or None when ``key`` is not held: one lookup, so a ``replace_all`` on
        another thread cannot come between a check and the read."""
        held = self._held.get(key)
        return None if held is None else held[0]

    def audio(self, key: str, rate: int, encoding: str = PCM16) -> bytes:
        """The clip at ``rate`` in ``encoding``; a format outside the configured set is
        converted once, then kept."""
        clip, forms = self._held[key]
        return _converted(clip, forms, rate, encoding)

    def take(self, key: str, rate: int, encoding: str = PCM16) -> tuple[Clip, bytes] | None:
        """The clip and its audio (as ``audio``) in one lookup, so from one version even
        while ``replace_all`` swaps in another; None when ``key`` is not held."""
        held = self._held.get(key)
        if held is None:
            return None
        clip, forms = held
        return clip, _converted(clip, forms, rate, encoding)


def _converted(clip: Clip, forms: dict[tuple[int, str], bytes], rate: int,
               encoding: str) -> bytes:
    """``clip`` at ``rate`` in ``encoding`` from ``forms``, converted once and kept there."""
    try:
        return forms[(rate, encoding)]
    except KeyError:
        pcm = forms.get((rate, PCM16))
        if pcm is None:
            pcm = resample_pcm16(clip.pcm16, clip.sample_rate, rate)
            forms[(rate, PCM16)] = pcm
        converted = encode(pcm, encoding)
        forms[(rate, encoding)] = converted
        return converted
