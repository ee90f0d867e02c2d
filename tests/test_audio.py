import wave

import numpy as np
import pytest

from gateway.audio import (StreamResampler, duration_ms, frame_bytes, read_wav, resample_pcm16,
                           split_frames, write_wav)
from gateway.settings import SUPPORTED_SAMPLE_RATES
from gateway.vad import SAMPLE_RATE as VAD_RATE


def tone(rate: int, seconds: float, freq: float = 440.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * freq * t) * 12000).astype("<i2").tobytes()


def test_split_frames_pads_the_last_frame():
    pcm = b"\x01\x00" * 500  # 500 samples at 16 kHz = 31.25 ms
    frames = split_frames(pcm, 16000, 20)
    assert [len(f) for f in frames] == [640, 640]
    assert frames[1][-20:] == b"\x00" * 20


def test_resample_keeps_duration_and_pitch():
    pcm = tone(48000, 1.0)
    out = resample_pcm16(pcm, 48000, 8000)
    assert abs(duration_ms(out, 8000) - 1000) < 2
    samples = np.frombuffer(out, dtype="<i2").astype(np.float32)
    peak_hz = np.argmax(np.abs(np.fft.rfft(samples))) * 8000 / len(samples)
    assert abs(peak_hz - 440) < 3


def test_stream_resampler_matches_length_of_whole_clip():
    pcm = tone(8000, 1.0)
    stream = StreamResampler(8000, 16000)
    chunks = [stream.process(f) for f in split_frames(pcm, 8000, 20)]
    chunks.append(stream.process(b"", last=True))
    total = sum(len(c) for c in chunks)
    assert abs(total - frame_bytes(16000, 1000)) <= 64


def test_the_live_resampler_holds_no_caller_audio_back():
    # Audio held in the filter reaches VAD and STT late: it delays every end of turn.
    for quality, most_ms in ((StreamResampler.LIVE_QUALITY, 1.0), ("HQ", None)):
        stream = StreamResampler(8000, 16000, quality)
        sent = frame_bytes(8000, 20) * 50
        out = sum(len(stream.process(f)) for f in split_frames(tone(8000, 1.0), 8000, 20))
        held_ms = (sent * 2 - out) / 2 / 16
        if most_ms is not None:
            assert held_ms <= most_ms, held_ms
        else:
            assert held_ms > 30  # the reason: HQ would hold tens of ms


@pytest.mark.parametrize("rate", [r for r in SUPPORTED_SAMPLE_RATES if r > VAD_RATE])
def test_live_caller_audio_above_16_khz_is_low_passed_not_folded_into_the_speech_band(rate):
    """Review (stop 67): a native caller at 22.05-48 kHz comes down to 16 kHz through a
    low-pass: an 11 kHz tone (above the 8 kHz Nyquist) is gone, not folded to 5 kHz at full
    strength as cubic interpolation did; little is held back, and the speech band is kept."""
    frame = frame_bytes(rate, 20)
    for freq, heard in ((11000.0, False), (4000.0, True)):
        stream = StreamResampler.live(rate, VAD_RATE)
        out = b"".join(stream.process(f) for f in split_frames(tone(rate, 1.0, freq), rate, 20))
        samples = np.frombuffer(out, dtype="<i2").astype(np.float64)[1600:]
        level_db = 20 * np.log10(max(float(np.sqrt(np.mean(samples ** 2))), 1e-3) / 8485.0)
        assert (level_db > -1.0) if heard else (level_db < -60.0), (freq, level_db)
        held_ms = (frame * 50 * VAD_RATE / rate - len(out)) / 2 / 16
        assert held_ms <= 32.0, held_ms  # HQ: up to ~58 ms


def test_wav_round_trip_and_stereo_downmix(tmp_path):
    pcm = tone(16000, 0.5)
    path = tmp_path / "a.wav"
    write_wav(path, pcm, 16000)
    back, rate = read_wav(path)
    assert rate == 16000 and len(back) == len(pcm)
    import wave
    stereo = tmp_path / "s.wav"
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        mono = np.frombuffer(tone(8000, 0.25), dtype="<i2")
        w.writeframes(np.stack([mono, mono], axis=1).astype("<i2").tobytes())
    down, rate = read_wav(stereo)
    assert rate == 8000 and len(down) == len(mono) * 2


def test_read_wav_keeps_16_bit_samples_exactly(tmp_path):
    # Review: a 16-bit mono WAV is already pcm16: reading it must not change a sample.
    # read_wav went through float (/32768) and back (*32767, truncated), so every non-zero
    # sample moved one step toward zero (1 -> 0, -32768 -> -32767): a small crossover
    # distortion on every clip the CLI's test caller speaks from a file.
    samples = np.array([0, 1, -1, 2, -2, 100, -100, 32767, -32768, 12345], dtype="<i2")
    path = tmp_path / "exact.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(samples.tobytes())
    pcm, rate = read_wav(path)
    assert rate == 8000
    assert np.frombuffer(pcm, dtype="<i2").tolist() == samples.tolist()
