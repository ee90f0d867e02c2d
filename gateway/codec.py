"""Sample encodings on the wire: 16-bit linear PCM and G.711 μ-law (telephony).

Inside voicegate audio is pcm16; a transport that speaks μ-law (Twilio) decodes
caller audio at its edge, and reply audio is encoded once: cached clips when they
are added to an ``AudioBank``, streamed TTS chunk by chunk as it is produced.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # stdlib audioop (3.11/3.12) warns that it is deprecated; audioop-lts provides it on 3.13+.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

PCM16 = "pcm16"
MULAW = "mulaw"
ENCODINGS: tuple[str, ...] = (PCM16, MULAW)

# Bytes per sample, and the byte that encodes digital silence (μ-law 0 is 0xFF, not 0x00).
SAMPLE_WIDTH: dict[str, int] = {PCM16: 2, MULAW: 1}
SILENCE_BYTE: dict[str, bytes] = {PCM16: b"\x00", MULAW: b"\xff"}


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    return audioop.ulaw2lin(ulaw, 2)


def pcm16_to_ulaw(pcm16: bytes) -> bytes:
    return audioop.lin2ulaw(pcm16, 2)


def encode(pcm16: bytes, encoding: str) -> bytes:
    """pcm16 -> ``encoding`` (whole samples in, whole samples out)."""
    if encoding == PCM16:
        return bytes(pcm16)
    if encoding == MULAW:
        return pcm16_to_ulaw(pcm16)
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def decode(data: bytes, encoding: str) -> bytes:
    """``encoding`` -> pcm16."""
    if encoding == PCM16:
        return bytes(data)
    if encoding == MULAW:
        return ulaw_to_pcm16(data)
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
