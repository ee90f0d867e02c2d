import asyncio
import math

import numpy as np
import pytest

from gateway.call.turns import (UNSCORED_TURN_END_MS, SpeechResumed, SpeechStarted, TurnDetector,
                                TurnEnded, TurnSettings)
from gateway.clock import ManualClock
from gateway.providers.base import Transcript
from gateway.settings import Settings, SettingsError
from gateway.vad import WINDOW_BYTES, WINDOW_MS, SegmentEvent, SileroState, SpeechSegmenter


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


class CountingSession:
    """Stands in for Silero's ONNX session: each row's recurrent state counts the windows
    it has heard (a window fed twice shows), the output is that count / 100; a window
    holding NaN breaks the run, as a bad input breaks a real batch."""

    def run(self, _outputs, feeds):
        if np.isnan(feeds["input"]).any():
            raise ValueError("NaN in a window")
        new_state = feeds["state"] + 1.0
        return np.array(new_state[0, :, :1] / 100.0, dtype=np.float32), new_state


def counting_vad():
    from gateway.vad import SileroVAD

    vad = SileroVAD.__new__(SileroVAD)  # the batching code, with the session above
    vad._session = CountingSession()
    vad._sr = np.array(16000, dtype=np.int64)
    return vad


async def test_a_broken_batch_is_retried_from_each_calls_state_before_it():
    from concurrent.futures import ThreadPoolExecutor

    from gateway.vad import WINDOW_SAMPLES, VADBatcher

    vad = counting_vad()
    good_windows = [np.full(WINDOW_SAMPLES, 0.1, np.float32) for _ in range(2)]
    # The other call's second window breaks the batch, in its second round: the first
    # round has already run every call's first window.
    bad_windows = [np.full(WINDOW_SAMPLES, 0.1, np.float32),
                   np.full(WINDOW_SAMPLES, np.nan, np.float32)]
    alone = SileroState()
    expected = vad.probabilities_batch([alone], [good_windows])[0]
    with ThreadPoolExecutor(max_workers=1) as pool:
        batcher = VADBatcher(vad, pool)
        good, bad = SileroState(), SileroState()
        results = await asyncio.gather(batcher.score(good, good_windows),
                                       batcher.score(bad, bad_windows),
                                       return_exceptions=True)
    assert isinstance(results[1], ValueError)  # only the broken call learns of it
    # The good call is scored as if alone: its model heard each of its windows once.
    assert float(good.state[0, 0, 0]) == float(alone.state[0, 0, 0]) == 2.0
    assert results[0] == expected
    assert np.array_equal(good.context, alone.context)


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


async def test_a_quiet_line_skips_the_model_once_it_has_settled_on_silence():
    from concurrent.futures import ThreadPoolExecutor

    from gateway.vad import QUIET_SETTLE_WINDOWS, VADBatcher, dbfs_to_rms

    class RecordingVad:
        def __init__(self) -> None:
            self.heard: list[np.ndarray] = []  # every window the model scored
            self.contexts: list[np.ndarray] = []  # the context it had for each

        def probabilities_batch(self, states, windows):
            out = []
            for state, call in zip(states, windows):
                for w in call:
                    self.heard.append(w)
                    self.contexts.append(state.context.copy())
                    state.context = w[-64:].reshape(1, -1)
                out.append([0.9 if np.abs(w).max() > 0.05 else 0.1 for w in call])
            return out

    rng = np.random.default_rng(0)

    def at(dbfs: float) -> np.ndarray:  # white noise whose RMS is ``dbfs``
        w = rng.standard_normal(512).astype(np.float32)
        return w / np.sqrt(np.mean(w * w)) * dbfs_to_rms(dbfs)

    quiet = [at(-65.0) for _ in range(10)]
    speech = [at(-20.0) for _ in range(3)]
    line_noise = [at(-45.0) for _ in range(8)]  # above the floor: a noisy line
    for skip in (True, False):
        vad = RecordingVad()
        with ThreadPoolExecutor(1) as pool:
            batcher = VADBatcher(vad, pool, quiet_dbfs=-55.0 if skip else None)
            state = SileroState()
            # Frames arrive a window or so at a time, as on a call.
            probs = []
            for chunk in ([[w] for w in quiet] + [speech, line_noise]):
                probs += await batcher.score(state, chunk)
        assert len(probs) == 10 + 3 + 8
        assert probs[10:13] == [0.9] * 3  # speech is always the model's
        if not skip:
            assert len(vad.heard) == 21 and batcher.skipped == 0
            continue
        # The model heard the first quiet windows, then nothing quiet until speech.
        assert all(w is q for w, q in zip(vad.heard[:QUIET_SETTLE_WINDOWS], quiet))
        assert vad.heard[QUIET_SETTLE_WINDOWS] is speech[0]
        assert probs[QUIET_SETTLE_WINDOWS:10] == [0.0] * (10 - QUIET_SETTLE_WINDOWS)
        assert batcher.skipped == 10 - QUIET_SETTLE_WINDOWS
        # The first speech window came with the tail of the last quiet one as context.
        first_speech = next(i for i, w in enumerate(vad.heard) if w is speech[0])
        assert np.array_equal(vad.contexts[first_speech][0], quiet[-1][-64:])
        # A noisy line is scored window by window.
        assert all(any(w is n for w in vad.heard) for n in line_noise)

    # A model that still hears voice in the quiet (a soft word ending) keeps every window.
    class StillVoiced(RecordingVad):
        def probabilities_batch(self, states, windows):
            super().probabilities_batch(states, windows)
            return [[0.5] * len(call) for call in windows]

    vad = StillVoiced()
    with ThreadPoolExecutor(1) as pool:
        batcher = VADBatcher(vad, pool, quiet_dbfs=-55.0)
        state = SileroState()
        for w in quiet:
            assert await batcher.score(state, [w]) == [0.5]
    assert len(vad.heard) == len(quiet) and batcher.skipped == 0


async def test_skipping_quiet_windows_leaves_the_turns_silero_finds_in_place(runtime, speak):
    from concurrent.futures import ThreadPoolExecutor

    from gateway.vad import VADBatcher, pcm16_windows

    words = np.frombuffer(speak("Could you tell me my account balance please?"), "<i2")
    gap = np.zeros(int(0.6 * 16000), np.int16)
    line = np.concatenate([np.zeros(16000, np.int16), words, gap, words,
                           np.zeros(24000, np.int16)]).astype(np.float32)
    line += np.random.default_rng(2).standard_normal(len(line)) * 10  # -70 dBFS line noise
    windows = pcm16_windows(np.clip(line, -32768, 32767).astype("<i2").tobytes())
    timelines = []
    for quiet_dbfs in (None, -55.0):
        with ThreadPoolExecutor(1) as pool:
            batcher = VADBatcher(runtime.vad, pool, quiet_dbfs=quiet_dbfs)
            state, segmenter = SileroState(), SpeechSegmenter(end_silence_ms=300)
            events = []
            for i in range(0, len(windows), 2):  # 64 ms of frames at a time
                for j, p in enumerate(await batcher.score(state, windows[i:i + 2])):
                    events += [(i + j, e) for e in segmenter.push(p)]
        timelines.append((events, batcher.skipped))
    (scored, none_skipped), (gated, skipped) = timelines
    assert none_skipped == 0 and skipped > len(windows) // 3  # the silences, mostly
    # The model's state waited through the skipped silence, so its probabilities inside
    # speech differ a little (a pause may flicker in one and not the other); the turns
    # themselves start and end on the same windows, give or take one (32 ms).
    turns = [[(i, e) for i, e in timeline if e in (SegmentEvent.SPEECH_START,
                                                   SegmentEvent.TURN_END)]
             for timeline in (scored, gated)]
    assert [e for _, e in turns[0]] == [SegmentEvent.SPEECH_START, SegmentEvent.TURN_END] * 2
    assert [e for _, e in turns[1]] == [e for _, e in turns[0]]
    assert all(abs(a - b) <= 1 for (a, _), (b, _) in zip(*turns))


# A caller's next word rises over a window or two before the VAD calls it voiced; the
# window where it starts must not be the one that ends the turn (bench/vad_pauses.py).
_PAUSE_TO_THE_END = math.ceil(300 / WINDOW_MS) - 1  # quiet windows: one short of 300 ms


def test_a_window_where_the_next_word_starts_does_not_end_the_turn():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300)
    events = run(seg, [0.9] * 10 + [0.0] * _PAUSE_TO_THE_END + [0.3, 0.9] + [0.0] * 12)
    assert events.count(SegmentEvent.SPEECH_START) == 1
    assert SegmentEvent.RESUME in events
    assert events.count(SegmentEvent.TURN_END) == 1  # at the real end, not in the pause


def test_without_the_onset_rule_that_window_ends_the_turn():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300, onset_probability=1.0)
    events = run(seg, [0.9] * 10 + [0.0] * _PAUSE_TO_THE_END + [0.3, 0.9])
    assert SegmentEvent.TURN_END in events and SegmentEvent.RESUME not in events


def test_a_line_that_stays_a_little_noisy_ends_the_turn_two_windows_later():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300)
    run(seg, [0.9] * 10 + [0.0] * _PAUSE_TO_THE_END)
    ended_after = [SegmentEvent.TURN_END in seg.push(0.3) for _ in range(4)]
    assert ended_after == [False, False, True, False]  # two deferrals, then the end


def test_quiet_windows_end_the_turn_on_time_whatever_came_before():
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300)
    # an onset that came to nothing earlier in the pause defers nothing later
    events = run(seg, [0.9] * 10 + [0.0] * 3 + [0.3] + [0.0] * (_PAUSE_TO_THE_END - 4))
    assert SegmentEvent.TURN_END not in events
    assert seg.push(0.0) == [SegmentEvent.TURN_END]


class _QuietSTT:
    """A recogniser stub: takes audio, gives no early words, finals on request."""

    async def send_audio(self, pcm16: bytes) -> None:
        pass

    def finalize(self) -> "asyncio.Future[Transcript]":
        future = asyncio.get_running_loop().create_future()
        future.set_result(Transcript(text="", final=True))
        return future


class _Driver:
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.detector = TurnDetector(TurnSettings(), _QuietSTT(), self.clock)  # type: ignore[arg-type]
        self.at = self.clock.now()

    async def push(self, prob: float) -> list:
        """One window of that probability, arriving a window after the last."""
        await self.clock.advance(WINDOW_MS / 1000)  # the detector's clock (note_* metrics)
        self.at = self.clock.now()
        return await self.detector.push(bytes(WINDOW_BYTES), prob, self.at)


def _ended(signals: list) -> bool:
    return any(isinstance(s, TurnEnded) for s in signals)


async def test_a_late_signal_does_not_end_the_turn_while_the_next_word_starts():
    d = _Driver()
    for prob in [0.9] * 10 + [0.0] * (math.ceil(900 / WINDOW_MS) - 1):
        await d.push(prob)
    assert not _ended(await d.push(0.3))  # the 900 ms have passed, on this window
    # a signal arriving now (a late route) would end the turn on the silence so far
    assert d.detector.end_turn_if_due(d.detector.pause, d.at) is None
    assert any(isinstance(s, SpeechResumed) for s in await d.push(0.9))
    assert d.detector.in_utterance


async def test_late_signal_on_a_slightly_noisy_line_ends_within_two_windows():
    """Docs: "the next window decides, at most twice in a row (64 ms), and end_turn_if_due
    defers the same way". A noisy line (p=0.2 throughout the pause, below the VAD
    threshold) + a cached question whose route lands after the 160 ms silence: the
    signal is declined (uncounted), then the segmenter defers twice more, so the turn
    ends on the 3rd window after the signal (~96 ms + batching), not within 2."""
    d = _Driver()
    for _ in range(10):
        await d.push(0.9)
    for _ in range(12):  # ~384 ms of pause at p=0.2; the open silence (900 ms) is not due
        assert not _ended(await d.push(0.2))
    det = d.detector
    det.note_route(det.pause, cache_hit=True, words_finished=True)  # -> 160 ms
    assert det.policy.required_silence_ms() == 160.0
    signal_at = d.at + 0.005
    assert det.end_turn_if_due(det.pause, signal_at) is None  # declined: last window p=0.2
    windows_after_signal = None
    for n in range(1, 6):
        if _ended(await d.push(0.2)):
            windows_after_signal = n
            break
    assert windows_after_signal is not None
    assert windows_after_signal <= 2, f"ended {windows_after_signal} windows after the signal"


async def test_a_signal_long_after_the_last_window_is_not_held_by_its_onset():
    """end_turn_if_due counts unscored time as quiet ("audio not scored yet is taken as
    still quiet"), yet hears_onset looks only at the last scored window. If no window
    follows (the client stops sending after the question; a long network stall), a
    cached question whose last scored window was 0.15 <= p < 0.5 (a speech tail) is
    declined however late the signal is, and nothing ever ends the turn (in_utterance
    stays True, so the idle watch is 'busy' forever too)."""
    d = _Driver()
    for _ in range(10):
        await d.push(0.9)
    for p in (0.1, 0.05, 0.0, 0.3):  # a pause, last window a (would-be) onset
        assert not _ended(await d.push(p))
    det = d.detector
    det.note_route(det.pause, cache_hit=True, words_finished=True)  # -> 160 ms
    # the route lands 2 s after the last window: 2 s of presumed quiet, far past any
    # deferral budget (2 windows)
    ended = det.end_turn_if_due(det.pause, d.at + 2.0)
    assert isinstance(ended, TurnEnded)


def test_deferrals_counted_earlier_in_the_pause_do_not_use_up_a_later_onset():
    """The count is reset only by a voiced window, end_turn() and reset(): a deferral
    spent when the required silence was shorter stays spent after it grows (the
    detector re-sets end_silence_ms every window from the policy, e.g. 900 -> 1200 when
    the turn model's 'incomplete' lands just after the 900 ms mark). The later pause
    end then gets one deferral instead of two, and the caller's next word rising over
    two windows (0.3, 0.3, then voiced) is cut off."""
    seg = SpeechSegmenter(min_speech_ms=120, end_silence_ms=300)
    for p in [0.9] * 10 + [0.0] * (math.ceil(300 / WINDOW_MS) - 1):
        assert SegmentEvent.TURN_END not in seg.push(p)
    assert seg.push(0.3) == []  # deferred once at the 300 ms mark
    seg.end_silence_ms = 600  # what is now known about the pause asks for longer
    while seg.silence_ms + WINDOW_MS < 600:
        assert SegmentEvent.TURN_END not in seg.push(0.0)
    events = [seg.push(p) for p in (0.3, 0.3, 0.9)]  # the next word rises, then voiced
    assert all(SegmentEvent.TURN_END not in e for e in events), events
    assert SegmentEvent.RESUME in events[-1]


async def test_detector_turn_model_raising_the_silence_after_a_deferral():
    """Finding 3 through the TurnDetector: open silence (900 ms), an onset deferral at
    900 ms, then the turn model says 'incomplete' (1200 ms); the caller's next word
    rising at 1200 ms (0.3, 0.3, voiced) must resume the turn, not end it."""
    d = _Driver()
    det = d.detector
    for _ in range(10):
        await d.push(0.9)
    quiet = math.ceil(900 / WINDOW_MS) - 1
    for _ in range(quiet):
        assert not _ended(await d.push(0.0))
    assert not _ended(await d.push(0.3))  # deferred at the 900 ms mark
    det.note_turn_probability(det.pause, 0.01)  # -> incomplete: 1200 ms
    assert det.policy.required_silence_ms() == 1200.0
    while det._segmenter.silence_ms + WINDOW_MS < 1200:
        assert not _ended(await d.push(0.0))
    signals = []
    for p in (0.3, 0.3, 0.9):
        signals += await d.push(p)
    assert not _ended(signals)
    assert any(isinstance(s, SpeechResumed) for s in signals)


async def test_a_batch_cancelled_by_the_executors_shutdown_hangs_nobody():
    # Runtime.aclose shuts the VAD executor down with cancel_futures: a batch submitted but
    # not yet taken by its thread is cancelled. Its calls learn of it (none waits for
    # good), and a batch asked after is told at once.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gateway.vad import VADBatcher

    class ConstantVad:
        def probabilities_batch(self, states, windows):
            return [[0.1] * len(call) for call in windows]

    pool = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    pool.submit(release.wait, 10)  # the VAD thread is busy: the batch queues behind it
    batcher = VADBatcher(ConstantVad(), pool)  # type: ignore[arg-type]
    window = [np.zeros(512, np.float32)]
    first = asyncio.ensure_future(batcher.score(SileroState(), window))
    for _ in range(3):  # the batch starts and is handed to the executor
        await asyncio.sleep(0)
    assert pool._work_queue.qsize() == 1, "the batch is queued behind the busy thread"
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    try:
        await asyncio.wait_for(first, 2)
    except TimeoutError:
        raise AssertionError("a call whose VAD batch the shutdown cancelled waits for good")
    except RuntimeError:
        pass
    else:
        raise AssertionError("a cancelled batch gave probabilities")
    try:  # the executor is gone: said at once
        await asyncio.wait_for(batcher.score(SileroState(), window), 2)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a batch asked after the shutdown gave probabilities")
    assert not batcher._running


class _HeardSTT(_QuietSTT):
    """Keeps what the recogniser was sent."""

    def __init__(self) -> None:
        self.sent = bytearray()

    async def send_audio(self, pcm16: bytes) -> None:
        self.sent += pcm16


async def test_a_barge_in_confirmed_through_dips_reaches_the_recogniser_from_its_first_word():
    # While the bot talks, speech needs 400 ms of voiced windows (13) to count, and a
    # candidate survives one-window dips: voiced and unvoiced alternating, it is confirmed
    # 25 windows after it began. Every one of them, and its first word, must reach the
    # recogniser (a pre-roll of the voiced time alone, 18 windows, cut the first 7).
    clock = ManualClock()
    stt = _HeardSTT()
    detector = TurnDetector(TurnSettings(), stt, clock)  # type: ignore[arg-type]
    detector.confirm_speech_slowly(True)
    window = 0
    started: list[SpeechStarted] = []
    probabilities = [0.0] * 40 + [0.9, 0.0] * 12 + [0.9]
    first_voiced = 40
    for prob in probabilities:
        await clock.advance(WINDOW_MS / 1000)
        # Each window's bytes say which window it is.
        pcm = window.to_bytes(2, "little") * (WINDOW_BYTES // 2)
        started += [s for s in await detector.push(pcm, prob, clock.now())
                    if isinstance(s, SpeechStarted)]
        window += 1
    assert len(started) == 1 and detector.in_utterance
    heard = [int.from_bytes(stt.sent[i:i + 2], "little")
             for i in range(0, len(stt.sent), WINDOW_BYTES)]
    assert first_voiced in heard and heard[-1] == window - 1
    assert heard == sorted(heard) and len(heard) == len(set(heard))
    assert heard[0] >= first_voiced - 5  # the 160 ms margin before it, not more silence
    # When the speech began: the first voiced window's start (its arrival a window later).
    first_arrival = 1000.0 + (first_voiced + 1) * WINDOW_MS / 1000
    assert abs(started[0].speech_at - (first_arrival - WINDOW_MS / 1000)) < 1e-6


async def test_speech_confirmed_at_once_keeps_the_pre_roll_every_turn_was_decoded_with():
    clock = ManualClock()
    stt = _HeardSTT()
    detector = TurnDetector(TurnSettings(), stt, clock)  # type: ignore[arg-type]
    for prob in [0.0] * 40 + [0.9] * 4:  # a turn's 120 ms, no dips
        await clock.advance(WINDOW_MS / 1000)
        await detector.push(bytes(WINDOW_BYTES), prob, clock.now())
    assert detector.in_utterance
    assert len(stt.sent) == TurnSettings().preroll_sent_windows * WINDOW_BYTES == 18 * WINDOW_BYTES


async def test_windows_the_vad_failed_to_score_neither_start_speech_nor_end_a_turn():
    """Review (stop 65): windows whose VAD scoring failed now reach the detector unscored
    (``prob`` None) instead of being dropped, so their audio reaches the recogniser. Their
    voice is unknown: they must not confirm speech (a barge-in on a failure) nor count as
    silence (a turn cut mid-sentence, by the segmenter or by a late ``end_turn_if_due``)."""
    d = _Driver()
    d.detector.confirm_speech_slowly(True)  # the bot is talking: speech would barge in
    for _ in range(40):
        assert await d.push(None) == []
    assert not d.detector.in_utterance
    d.detector.confirm_speech_slowly(False)
    for prob in [0.9] * 10 + [0.0] * 3:  # speech, then a pause
        await d.push(prob)
    assert d.detector.in_utterance
    for _ in range(40):  # 1.3 s unscored, far past the silence that ends a turn
        assert not _ended(await d.push(None))
    assert d.detector.end_turn_if_due(d.detector.pause, d.at) is None
    assert d.detector.in_utterance
    # Scored again, the silence ends the turn as it would have.
    assert any([_ended(await d.push(0.0)) for _ in range(math.ceil(3000 / WINDOW_MS))])


async def test_a_vad_that_stays_failed_mid_utterance_still_ends_the_turn():
    """Review (stop 65, second look): unscored windows hold the segmenter still, so a VAD
    that stays failed (a broken model session) while the caller speaks left the turn open
    for good: no silence is ever counted, end_turn_if_due never finds enough, and the idle
    prompt waits while the caller is mid-utterance. The caller heard nothing until
    max_call_s (4 h by default; never with 0). Wanted: a run of unscored windows that long
    (``UNSCORED_TURN_END_MS``, far past a turn's longest silence) ends the turn, so the
    words so far are answered; a short failure (above: 1.3 s) still ends none."""
    d = _Driver()
    for prob in [0.9] * 10:
        await d.push(prob)
    assert d.detector.in_utterance
    ended_at = None
    for n in range(1, math.ceil(60_000 / WINDOW_MS)):  # a minute of a failed VAD
        if _ended(await d.push(None)):
            ended_at = n * WINDOW_MS
            break
    assert ended_at is not None and UNSCORED_TURN_END_MS <= ended_at \
        < UNSCORED_TURN_END_MS + WINDOW_MS
    assert not d.detector.in_utterance
    # Still failed: no new turn starts (its audio goes to the pre-roll, as before).
    for _ in range(100):
        assert await d.push(None) == []


def test_a_vad_threshold_at_or_below_the_hysteresis_is_refused():
    """Review (stop 69): VOICEGATE_VAD_THRESHOLD was accepted anywhere in (0, 1), but once
    speech runs a window counts as voiced down to 0.15 below the threshold: at 0.15 or less
    that is 0.0 or less, every window is voiced (a quiet window the batcher skips scores
    exactly 0.0), no pause nor turn end ever comes, and the caller is never answered. Such a
    threshold is now refused at load, naming the field."""
    stuck = SpeechSegmenter(threshold=0.15, min_speech_ms=120, end_silence_ms=300)
    events = run(stuck, [0.9] * windows(320) + [0.0] * windows(3000))
    assert SegmentEvent.SPEECH_START in events and SegmentEvent.TURN_END not in events
    for threshold in (0.15, 0.1):
        with pytest.raises(SettingsError, match="vad_threshold"):
            Settings.load({"vad_threshold": threshold}, environ={})
    assert Settings.load({"vad_threshold": 0.2}, environ={}).vad_threshold == 0.2
