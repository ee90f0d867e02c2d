"""Voice activity detection: the Silero model (ONNX) and the speech segmenter.

``SileroVAD`` is loaded once and shared by every call; each call owns a
``SileroState`` (the model's recurrent state and audio context) and a
``SpeechSegmenter`` that turns per-window speech probabilities into turn events.
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import Executor
from dataclasses import dataclass, field
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime

from .executors import run_in
from .settings import VAD_HYSTERESIS

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 512  # 32 ms: the window size Silero v5+ is trained on at 16 kHz
WINDOW_BYTES = WINDOW_SAMPLES * 2
WINDOW_MS = WINDOW_SAMPLES * 1000 / SAMPLE_RATE
_CONTEXT_SAMPLES = 64  # the model sees the tail of the previous window
# A quiet window (RMS below ``quiet_dbfs``) is silence without asking the model once this
# many quiet windows in a row went before it: the model has settled on silence by then,
# and the first windows of every silence are still its to judge.
QUIET_SETTLE_WINDOWS = 4
# ... and only while the model's latest word on this call was silence (a soft word ending
# can stay voiced for the model below the energy floor; it keeps the model until it is not).
SETTLED_PROBABILITY = 0.2


def silero_model_path() -> Path:
    """The ONNX file of the ``silero-vad`` wheel, found without importing the package
    (its ``__init__`` imports torch, which the serving process never needs)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Silero VAD needs the silero-vad package, which ships its "
                                "model (pip install silero-vad)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"


@dataclass
class SileroState:
    """Per-call recurrent state of the Silero model."""

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros((1, _CONTEXT_SAMPLES),
                                                                 dtype=np.float32))
    quiet_run: int = 0  # quiet windows in a row, up to the latest one
    last_probability: float = 0.0  # the model's, for the latest window it scored


class SileroVAD:
    """Silero VAD through onnxruntime; thread-safe, one instance per process."""

    def __init__(self, model_path: Path | None = None) -> None:
        options = onnxruntime.SessionOptions()
        # One thread per inference: windows are tiny and calls run in parallel instead.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_path or silero_model_path()), sess_options=options,
            providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def probabilities(self, pcm16: bytes, state: SileroState) -> list[float]:
        """Speech probability for each complete 32 ms window of 16 kHz ``pcm16``."""
        samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
        count = len(samples) // WINDOW_SAMPLES
        probs: list[float] = []
        for i in range(count):
            window = samples[i * WINDOW_SAMPLES:(i + 1) * WINDOW_SAMPLES].reshape(1, -1)
            model_input = np.concatenate([state.context, window], axis=1)
            out, state.state = self._session.run(
                None, {"input": model_input, "state": state.state, "sr": self._sr})
            state.context = window[:, -_CONTEXT_SAMPLES:]
            probs.append(float(out[0, 0]))
        return probs

    def probabilities_batch(self, states: list[SileroState],
                            windows: list[list[np.ndarray]]) -> list[list[float]]:
        """Score many calls' windows in batched runs: round r takes each call's r-th window.

        One batched run costs far less per window than one run per call (the model and
        its caches stay hot), which is what lets one core carry many calls.

        The states change only once every round has run: a run that fails leaves each
        call's state as it was, so each call can be scored again alone (VADBatcher)
        without its model hearing a window twice.
        """
        results: list[list[float]] = [[] for _ in states]
        recurrent = [s.state for s in states]
        contexts = [s.context for s in states]
        rounds = max((len(w) for w in windows), default=0)
        for r in range(rounds):
            members = [i for i, w in enumerate(windows) if len(w) > r]
            batch = np.stack([windows[i][r] for i in members])
            context = np.concatenate([contexts[i] for i in members], axis=0)
            state = np.concatenate([recurrent[i] for i in members], axis=1)
            model_input = np.concatenate([context, batch], axis=1)
            out, new_state = self._session.run(
                None, {"input": model_input, "state": state, "sr": self._sr})
            for row, i in enumerate(members):
                recurrent[i] = new_state[:, row:row + 1, :]
                contexts[i] = batch[row:row + 1, -_CONTEXT_SAMPLES:]
                results[i].append(float(out[row, 0]))
        for s, state_after, context_after in zip(states, recurrent, contexts):
            s.state, s.context = state_after, context_after
        return results

    def warm_up(self) -> None:
        self.probabilities(b"\x00" * WINDOW_BYTES * 4, SileroState())
        self.probabilities_batch([SileroState(), SileroState()],
                                 [[np.zeros(WINDOW_SAMPLES, np.float32)]] * 2)


def pcm16_windows(pcm16: bytes) -> list[np.ndarray]:
    """Complete 512-sample windows of 16 kHz pcm16 as float32 arrays."""
    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
    count = len(samples) // WINDOW_SAMPLES
    return [samples[i * WINDOW_SAMPLES:(i + 1) * WINDOW_SAMPLES] for i in range(count)]


def dbfs_to_rms(dbfs: float) -> float:
    """The RMS of a float window (full scale 1.0) at ``dbfs``."""
    return float(10.0 ** (dbfs / 20.0))


class VADBatcher:
    """Collects every call's pending windows and scores them in one batched model run.

    Requests arriving while a batch runs wait for the next one, so under load batches
    grow by themselves; with one call, a batch is just that call's windows.

    Quiet windows skip the model: once a call has sent ``QUIET_SETTLE_WINDOWS`` windows
    in a row below ``quiet_dbfs`` (a quiet room on a phone line is -60 to -70 dBFS,
    speech -35 to -15) and the model called the latest it scored silence, each further
    quiet window scores 0.0 without a model run; the
    call's model state waits, its context moves on. A caller listening to the bot sends
    little else, so this removes most of the model's work on a line that is quiet. A
    noisy line is scored window by window, as before. ``quiet_dbfs`` None: every
    window is scored.
    """

    def __init__(self, vad: SileroVAD, executor: Executor, interval_ms: float = 0.0,
                 quiet_dbfs: float | None = None) -> None:
        self._vad = vad
        self._executor = executor
        self._quiet_rms = None if quiet_dbfs is None else dbfs_to_rms(quiet_dbfs)
        self.skipped = 0  # quiet windows scored without the model
        self._queue: list[tuple[SileroState, list[np.ndarray], asyncio.Future[list[float]]]] = []
        self._running = False
        # Batches start at most this often: with many calls a model run costs far less
        # per window when it carries many calls' windows, and a faster event loop would
        # otherwise hand the model small batches one after the other.
        self._interval_s = interval_ms / 1000.0
        self._last_start = 0.0
        self.batches = 0
        self.windows = 0

    async def score(self, state: SileroState, windows: list[np.ndarray]) -> list[float]:
        """Speech probability of each of ``windows`` (one call's, in order)."""
        skipped = self._skip_quiet(state, windows)
        if skipped == len(windows):
            return [0.0] * skipped
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._queue.append((state, windows[skipped:], future))
        if not self._running:
            self._running = True
            self._schedule()
        return [0.0] * skipped + await future

    def _skip_quiet(self, state: SileroState, windows: list[np.ndarray]) -> int:
        """How many leading ``windows`` are settled silence, which the model need not
        hear (a window or two arrive at a time: once the model has one, the rest of that
        block stays with it); counts the quiet run over all of them."""
        if self._quiet_rms is None:
            return 0
        floor = self._quiet_rms * self._quiet_rms * WINDOW_SAMPLES  # sum of squares
        skipped, leading = 0, True
        for window in windows:
            quiet = float(np.dot(window, window)) < floor
            state.quiet_run = state.quiet_run + 1 if quiet else 0
            if (leading and quiet and state.quiet_run > QUIET_SETTLE_WINDOWS
                    and state.last_probability < SETTLED_PROBABILITY):
                skipped += 1
                state.context = window[-_CONTEXT_SAMPLES:].reshape(1, -1)
            else:
                leading = False
        self.skipped += skipped
        return skipped

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last_start + self._interval_s - loop.time()
        if wait > 0:
            loop.call_later(wait, self._start_batch)
        else:
            loop.call_soon(self._start_batch)

    def _start_batch(self) -> None:
        self._last_start = asyncio.get_running_loop().time()
        # Drop requests whose call went away (barge-in, hang-up) before they ran.
        batch = [item for item in self._queue if not item[2].cancelled()]
        self._queue = []
        if not batch:
            self._running = False
            return
        task = asyncio.ensure_future(self._run(batch))
        task.add_done_callback(lambda _t: self._after_batch())

    async def _run(self, batch: list[tuple[SileroState, list[np.ndarray],
                                           asyncio.Future[list[float]]]]) -> None:
        states = [item[0] for item in batch]
        windows = [item[1] for item in batch]
        try:
            results = await self._in_executor(states, windows)
        except Exception:
            # One call's windows may have broken the batch: score each call alone, so
            # only the calls whose windows fail learn of it (from the states before the
            # batch, which a failed run leaves as they were).
            await self._run_each(batch)
            return
        self.batches += 1
        self.windows += sum(len(w) for w in windows)
        for (state, _, future), probs in zip(batch, results):
            state.last_probability = probs[-1]
            if not future.done():
                future.set_result(probs)

    async def _run_each(self, batch: list[tuple[SileroState, list[np.ndarray],
                                                asyncio.Future[list[float]]]]) -> None:
        for state, windows, future in batch:
            if future.done():
                continue
            try:
                (probs,) = await self._in_executor([state], [windows])
            except Exception as exc:  # this call learns of it; none hangs
                if not future.done():
                    future.set_exception(exc)
                continue
            state.last_probability = probs[-1]
            if not future.done():
                future.set_result(probs)

    async def _in_executor(self, states: list[SileroState],
                           windows: list[list[np.ndarray]]) -> list[list[float]]:
        """One batched run on the executor; its shutdown is an error its calls learn of
        (``executors.run_in``), never a wait for good."""
        return await run_in(self._executor, "VAD", self._vad.probabilities_batch, states,
                            windows)

    def _after_batch(self) -> None:
        if self._queue:
            self._schedule()
        else:
            self._running = False


class SegmentEvent(enum.Enum):
    CANDIDATE = "candidate"  # voice heard, not yet long enough to count as speech
    REJECTED = "rejected"  # the candidate ended too soon: noise or a backchannel
    SPEECH_START = "speech_start"  # confirmed speech (long enough)
    PAUSE = "pause"  # confirmed speech went quiet; the turn may be ending
    RESUME = "resume"  # speech resumed before the turn ended
    TURN_END = "turn_end"  # silence long enough: the caller's turn is over


@dataclass
class SpeechSegmenter:
    """Turns per-window probabilities into speech and turn events (hysteresis + durations).

    ``min_speech_ms`` is checked against consecutive voiced audio, so a click or an
    "uh-huh" shorter than it never becomes speech. The call raises it while the bot
    is talking (barge-in) via ``min_speech_ms_override``.

    A window that would end the turn but in which the model hears a possible onset of
    voice (``onset_probability`` <= p < threshold) does not end it: the next window
    decides, at most ``max_onset_deferrals`` times in a row. A caller's next word rises
    over a window or two (0.1-0.45, then voiced), so without this a pause just longer
    than the required silence ended on the very window where the caller spoke again.
    """

    threshold: float = 0.5
    min_speech_ms: float = 120.0
    end_silence_ms: float = 300.0
    min_speech_ms_override: float | None = None
    onset_probability: float = 0.15  # 1.0: every quiet window may end the turn
    max_onset_deferrals: int = 2
    _voiced_ms: float = 0.0
    _silence_ms: float = 0.0
    _in_candidate: bool = False
    _in_speech: bool = False
    _paused: bool = False
    _last_probability: float = 0.0
    _onset_deferrals: int = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def in_candidate(self) -> bool:
        """Voice heard, not yet long enough to be speech nor quiet long enough to be
        rejected (at most a few windows)."""
        return self._in_candidate

    @property
    def silence_ms(self) -> float:
        """Silence since the last voiced window (0 while voiced)."""
        return self._silence_ms

    @property
    def hears_onset(self) -> bool:
        """The caller's pause ends on a window that may be their next word starting:
        ending the turn now would be deferred to the next window (see the class)."""
        return (self._paused and self._last_probability >= self.onset_probability
                and self._onset_deferrals < self.max_onset_deferrals)

    def push(self, prob: float) -> list[SegmentEvent]:
        # Hysteresis: once voiced, a window stays voiced down to threshold - VAD_HYSTERESIS
        # (the settings refuse a threshold at or below it).
        voiced = prob >= (self.threshold - VAD_HYSTERESIS
                          if (self._in_candidate or self._in_speech) and not self._paused
                          else self.threshold)
        events: list[SegmentEvent] = []
        needed = self.min_speech_ms_override or self.min_speech_ms
        self._last_probability = prob
        if voiced:
            self._silence_ms = 0.0
            self._onset_deferrals = 0
            self._voiced_ms += WINDOW_MS
            if self._in_speech:
                if self._paused:
                    self._paused = False
                    events.append(SegmentEvent.RESUME)
            elif not self._in_candidate:
                self._in_candidate = True
                events.append(SegmentEvent.CANDIDATE)
            if self._in_candidate and self._voiced_ms >= needed:
                self._in_candidate = False
                self._in_speech = True
                events.append(SegmentEvent.SPEECH_START)
        else:
            self._silence_ms += WINDOW_MS
            if self._in_candidate:
                # A short gap inside a candidate does not reset it; a long one rejects it.
                if self._silence_ms >= 2 * WINDOW_MS:
                    self._in_candidate = False
                    self._voiced_ms = 0.0
                    events.append(SegmentEvent.REJECTED)
            elif self._in_speech:
                if not self._paused:
                    self._paused = True
                    events.append(SegmentEvent.PAUSE)
                if prob < self.onset_probability:
                    self._onset_deferrals = 0  # the run of onset windows is broken
                if self._silence_ms >= self.end_silence_ms and self.hears_onset:
                    self._onset_deferrals += 1  # the next window decides
                elif self._silence_ms >= self.end_silence_ms:
                    self._in_speech = False
                    self._paused = False
                    self._voiced_ms = 0.0
                    self._onset_deferrals = 0
                    events.append(SegmentEvent.TURN_END)
        return events

    @property
    def onset_budget_ms(self) -> float:
        """How much more audio the onset rule may still defer the end by."""
        return max(0, self.max_onset_deferrals - self._onset_deferrals) * WINDOW_MS

    def defer_onset(self) -> None:
        """An end from outside was deferred for the onset: it counts as one deferral."""
        self._onset_deferrals += 1

    def end_turn(self) -> None:
        """The turn was ended from outside (its silence was enough once its last signal
        arrived): no TURN_END follows; the silence goes on counting."""
        self._in_speech = self._paused = False
        self._voiced_ms = 0.0
        self._onset_deferrals = 0

    def reset(self) -> None:
        self._voiced_ms = self._silence_ms = self._last_probability = 0.0
        self._in_candidate = self._in_speech = self._paused = False
        self._onset_deferrals = 0
