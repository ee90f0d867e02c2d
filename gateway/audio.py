"""PCM helpers: conversion, resampling, framing and WAV files.

All audio inside voicegate is 16-bit little-endian mono PCM (``pcm16``). Rates
differ at the edges (the client's negotiated rate, 16 kHz for the speech
models, 22.05 kHz for Piper), so conversions happen here and nowhere else.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soxr

BYTES_PER_SAMPLE = 2


def pcm16_to_float(pcm16: bytes) -> np.ndarray:
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """The inverse of ``pcm16_to_float``: scaled by 32768 and rounded (16-bit samples come
    back exactly; truncating at 32767 moved every one a step toward zero), clipped."""
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def duration_ms(pcm16: bytes | bytearray | memoryview, sample_rate: int) -> float:
    return len(pcm16) / BYTES_PER_SAMPLE / sample_rate * 1000.0


def frame_bytes(sample_rate: int, frame_ms: int) -> int:
    return sample_rate * frame_ms // 1000 * BYTES_PER_SAMPLE


def resample_pcm16(pcm16: bytes, from_rate: int, to_rate: int) -> bytes:
    """Resample a whole clip (pre-rendered audio, WAV files)."""
    if from_rate == to_rate or not pcm16:
        return bytes(pcm16)
    samples = np.frombuffer(pcm16, dtype="<i2")
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype("<i2").tobytes()


class StreamResampler:
    """Resamples a PCM16 stream chunk by chunk, keeping filter state between chunks.

    soxr's filters hold audio back: "HQ" releases 8 kHz caller audio about 66 ms late,
    "QQ" (cubic) at once. A caller's live audio (``live``) takes ``LIVE_QUALITY`` up to
    16 kHz: every ms held back delays the end of their turn (same recogniser WER on
    phone-band speech, see docs/architecture.md). Down to it, ``LIVE_DOWN_QUALITY``: cubic
    interpolation has no low-pass, and folded all above 8 kHz into the speech band at full
    strength; "LQ" filters it out (flat to 6 kHz), holding ~11-16 ms back (HQ ~21-32).
    Audio played to the caller keeps "HQ".
    """

    LIVE_QUALITY = "QQ"
    LIVE_DOWN_QUALITY = "LQ"

    def __init__(self, from_rate: int, to_rate: int, quality: str = "HQ") -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream = (None if from_rate == to_rate else
                        soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16",
                                            quality=quality))

    @classmethod
    def live(cls, from_rate: int, to_rate: int) -> "StreamResampler":
        """A caller's live audio: the least held back that folds nothing."""
        return cls(from_rate, to_rate,
                   cls.LIVE_DOWN_QUALITY if from_rate > to_rate else cls.LIVE_QUALITY)

    def process(self, pcm16: bytes, last: bool = False) -> bytes:
        if self._stream is None:
            return bytes(pcm16)
        samples = np.frombuffer(pcm16, dtype="<i2")
        return self._stream.resample_chunk(samples, last=last).astype("<i2").tobytes()


def split_frames(pcm16: bytes, sample_rate: int, frame_ms: int) -> list[bytes]:
    """Cut audio into frames of ``frame_ms``; the last one is zero-padded to full size."""
    size = frame_bytes(sample_rate, frame_ms)
    frames = [pcm16[i:i + size] for i in range(0, len(pcm16), size)]
    if frames and len(frames[-1]) < size:
        frames[-1] = frames[-1] + b"\x00" * (size - len(frames[-1]))
    return frames


def read_wav(path: str | Path) -> tuple[bytes, int]:
    """Read a PCM WAV file as mono pcm16 (channels are averaged; 8/24/32-bit converted)."""
    with wave.open(str(path), "rb") as wav:
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8)
                | (b[:, 2].astype(np.int32) << 16))
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{path}: unsupported WAV sample width {width}")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return float_to_pcm16(samples), rate


def write_wav(path: str | Path | BinaryIO, pcm16: bytes, sample_rate: int) -> None:
    if isinstance(path, (str, Path)):
        # Opened here, not by wave.open(name): a path it cannot open would raise the OSError
        # and then print wave's own "Exception ignored ... AttributeError" traceback.
        with open(path, "wb") as file:
            write_wav(file, pcm16, sample_rate)
        return
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(BYTES_PER_SAMPLE)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm16)


def wav_bytes(pcm16: bytes, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    write_wav(buffer, pcm16, sample_rate)
    return buffer.getvalue()


def rms_dbfs(pcm16: bytes) -> float:
    if not pcm16:
        return -120.0
    samples = pcm16_to_float(pcm16)
    rms = float(np.sqrt(np.mean(samples * samples)))
    return 20.0 * np.log10(max(rms, 1e-6))
