import numpy as np

from gateway.vad import WINDOW_MS, SegmentEvent, SileroState, SpeechSegmenter


def run(seg: SpeechSegmenter, probs: list[float]) -> list[SegmentEvent]:
    events: list[SegmentEvent] = []
    for p in probs:
        events.extend(seg.push(p))
    return events


def windows(ms: float) -> int:
    return int(round(ms / WINDOW_MS))


def test_short_noise_is_rejected_and_speech_is_confirmed():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300)
    noise = run(seg, [0.9] * windows(64) + [0.0] * 4)
    assert SegmentEvent.SPEECH_START not in noise and SegmentEvent.REJECTED in noise
    speech = run(seg, [0.9] * windows(320) + [0.0] * windows(320))
    assert speech.index(SegmentEvent.SPEECH_START) < speech.index(SegmentEvent.PAUSE) < \
        speech.index(SegmentEvent.TURN_END)


def test_pause_shorter_than_end_silence_resumes_the_same_turn():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300)
    events = run(seg, [0.9] * 10 + [0.0] * 5 + [0.9] * 10 + [0.0] * 12)
    assert events.count(SegmentEvent.SPEECH_START) == 1
    assert SegmentEvent.RESUME in events
    assert events.count(SegmentEvent.TURN_END) == 1


def test_barge_in_threshold_ignores_backchannels():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300, min_speech_ms_override=400)
    uh_huh = run(seg, [0.9] * windows(250) + [0.0] * 4)
    assert SegmentEvent.SPEECH_START not in uh_huh
    real = run(seg, [0.9] * windows(450))
    assert SegmentEvent.SPEECH_START in real


def test_silero_separates_speech_from_silence(runtime, speak):
    speech = speak("Could you tell me my account balance please?")
    state = SileroState()
    speech_probs = runtime.vad.probabilities(speech, state)
    silence_probs = runtime.vad.probabilities(b"\x00" * 32000, SileroState())
    noise = (np.random.default_rng(1).standard_normal(16000) * 200).astype("<i2").tobytes()
    noise_probs = runtime.vad.probabilities(noise, SileroState())
    assert np.mean(np.array(speech_probs) > 0.5) > 0.5
    assert max(silence_probs) < 0.2 and np.mean(np.array(noise_probs) > 0.5) < 0.1


async def test_a_failing_window_fails_only_its_own_call():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from gateway.vad import SileroState, VADBatcher

    class PoisonedVad:
        def probabilities_batch(self, states, windows):
            if any(np.isnan(w).any() for call in windows for w in call):
                raise ValueError("NaN in a window")
            return [[0.5] * len(call) for call in windows]

    with ThreadPoolExecutor(1) as pool:
        batcher = VADBatcher(PoisonedVad(), pool)  # type: ignore[arg-type]
        good = [np.zeros(512, np.float32)]
        bad = [np.full(512, np.nan, np.float32)]
        results = await asyncio.gather(batcher.score(SileroState(), good),
                                       batcher.score(SileroState(), bad),
                                       batcher.score(SileroState(), good * 2),
                                       return_exceptions=True)
    assert results[0] == [0.5] and results[2] == [0.5, 0.5]
    assert isinstance(results[1], ValueError)


async def test_windows_arriving_within_the_batch_interval_share_one_model_run():
    import asyncio

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from gateway.vad import SileroState, VADBatcher

    class CountingVad:
        def __init__(self) -> None:
            self.runs: list[int] = []

        def probabilities_batch(self, states, windows):
            self.runs.append(len(states))
            return [[0.1] * len(call) for call in windows]

    window = [np.zeros(512, np.float32)]
    for interval_ms, expected in ((0.0, [1, 1, 1]), (1000.0, [1, 2])):
        vad = CountingVad()
        with ThreadPoolExecutor(1) as pool:
            batcher = VADBatcher(vad, pool, interval_ms)  # type: ignore[arg-type]
            await batcher.score(SileroState(), window)  # starts the interval
            first = asyncio.ensure_future(batcher.score(SileroState(), window))
            await asyncio.sleep(0.02)  # the next call's window comes a little later
            second = asyncio.ensure_future(batcher.score(SileroState(), window))
            await asyncio.gather(first, second)
        # Back to back: each window alone; with an interval: both in the next run.
        assert vad.runs == expected
