"""Streaming on a batch recogniser: the early final, partials under load, the cut."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.clock import ManualClock
from gateway.providers.redecode import (FINAL, PARTIAL, DecodeScheduler, DecodeStopped,
                                        RedecodingSTT, decode_fn)

MS = 32  # bytes per ms at 16 kHz PCM16


def audio(ms: int, value: int = 1) -> bytes:
    return value.to_bytes(2, "little", signed=True) * (16 * ms)


class GatedRecognizer:
    """'Decodes' to the byte count; each decode waits until the test opens the gate."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.decoded: list[int] = []
        self.lock = threading.Lock()

    def transcribe(self, pcm16: bytes) -> str:
        self.gate.wait(10)
        with self.lock:
            self.decoded.append(len(pcm16))
        return f"{len(pcm16)} bytes"

    def warm_up(self) -> None:
        return None


@pytest.fixture
def pool():
    executor = ThreadPoolExecutor(max_workers=2)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def stt(pool, slots=1, interval_ms=400):
    return RedecodingSTT(GatedRecognizer(), pool, slots=slots, partial_interval_ms=interval_ms)


async def until(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def test_finalize_cuts_the_utterance_before_it_decodes(pool):
    service = stt(pool, interval_ms=10_000)
    stream = service.open_stream()
    service.recognizer.gate.clear()
    await stream.send_audio(audio(1000))
    final = asyncio.ensure_future(stream.finalize())
    await stream.send_audio(audio(300, 2))  # the caller talks on while it decodes
    service.recognizer.gate.set()
    assert (await final).text == f"{1000 * MS} bytes"
    assert (await stream.finalize()).text == f"{300 * MS} bytes"  # only the new audio
    await stream.aclose()


async def test_the_early_final_is_the_final_when_no_speech_follows(pool):
    service = stt(pool, interval_ms=10_000)
    stream = service.open_stream()
    await stream.send_audio(audio(800))
    early = await stream.speech_paused()
    assert early.text == f"{800 * MS} bytes" and not early.final
    await stream.send_audio(audio(200, 0))  # trailing silence until the turn ends
    final = await stream.finalize()
    assert final.text == early.text and final.final
    assert service.recognizer.decoded == [800 * MS]  # decoded once, not again at the end
    await stream.aclose()


async def test_speech_after_the_pause_throws_the_early_decode_away(pool):
    service = stt(pool, interval_ms=10_000)
    stream = service.open_stream()
    await stream.send_audio(audio(800))
    early = stream.speech_paused()
    stream.speech_resumed()
    with pytest.raises(asyncio.CancelledError):
        await early
    await stream.send_audio(audio(400))
    assert (await stream.finalize()).text == f"{1200 * MS} bytes"
    await stream.aclose()


async def test_the_early_transcript_is_offered_as_a_partial(pool):
    service = stt(pool, interval_ms=10_000)
    stream = service.open_stream()
    partials = stream.partials()
    await stream.send_audio(audio(500))
    await stream.speech_paused()
    assert (await asyncio.wait_for(anext(partials), 2)).text == f"{500 * MS} bytes"
    await partials.aclose()
    await stream.aclose()


async def test_a_partial_still_unread_at_the_cut_is_not_the_next_utterances(pool):
    # Review: partials queued before a turn's cut were read after it, by a consumer a
    # loop pass behind, as the next utterance's (sent to the client after its barge-in,
    # routed as its speculation).
    service = stt(pool, interval_ms=10_000)
    stream = service.open_stream()
    await stream.send_audio(audio(500))
    await stream.speech_paused()  # offered as a partial, not read yet
    assert not stream._partials.empty()
    final = stream.finalize()
    await stream.send_audio(audio(300, 2))
    await stream.speech_paused()  # the next utterance's first partial
    partials = stream.partials()
    assert (await asyncio.wait_for(anext(partials), 2)).text == f"{300 * MS} bytes"
    assert (await final).text == f"{500 * MS} bytes"
    await partials.aclose()
    await stream.aclose()


async def test_partials_follow_new_audio_not_the_wall_clock(pool):
    service = stt(pool, slots=2, interval_ms=400)
    stream = service.open_stream()
    await stream.send_audio(audio(300))
    assert service.scheduler.decodes[PARTIAL] == 0  # under the interval of new audio
    await stream.send_audio(audio(100))
    await until(lambda: service.recognizer.decoded == [400 * MS])
    await stream.send_audio(audio(200))
    await asyncio.sleep(0.05)
    assert service.recognizer.decoded == [400 * MS]  # 200 ms new: not due yet
    await stream.aclose()


async def test_under_load_a_caller_gets_fewer_partials_and_finals_go_first(pool):
    service = stt(pool, slots=1, interval_ms=100)
    busy, waiting = service.open_stream(), service.open_stream()
    recognizer = service.recognizer
    recognizer.gate.clear()
    await busy.send_audio(audio(200))  # its partial takes the only slot
    await until(lambda: service.scheduler.running == 1)
    await waiting.send_audio(audio(200))  # due, but no slot is free: skipped
    assert waiting.partials_skipped == 1
    final = asyncio.ensure_future(waiting.finalize())
    await asyncio.sleep(0.01)
    await busy.send_audio(audio(200))  # busy's own decode still runs: no second partial
    recognizer.gate.set()
    assert (await final).text == f"{200 * MS} bytes"
    assert service.scheduler.decodes == {FINAL: 1, PARTIAL: 1}
    await busy.aclose()
    await waiting.aclose()


async def busy_scheduler(pool, kind):
    """A one-slot scheduler whose slot holds a decode of 100 ms (of ``kind``) at the gate."""
    recognizer = GatedRecognizer()
    scheduler = DecodeScheduler(decode_fn(recognizer), pool, slots=1)
    recognizer.gate.clear()
    first = asyncio.ensure_future(scheduler.decode(audio(100), kind))
    await until(lambda: scheduler.running == 1)
    return recognizer, scheduler, first


class StoppableRecognizer(GatedRecognizer):
    """Like Moonshine: a decode checks its ``stop`` while it waits at the gate."""

    def transcribe_ids(self, pcm16: bytes, draft, stop) -> tuple[str, list[int]]:
        while not self.gate.wait(0.002):
            if stop.is_set():
                raise DecodeStopped
        return self.transcribe(pcm16), []


async def test_a_final_that_finds_every_slot_busy_stops_a_partial_and_takes_its_slot(pool):
    recognizer = StoppableRecognizer()
    service = RedecodingSTT(recognizer, pool, slots=1, partial_interval_ms=100)
    busy, caller = service.open_stream(), service.open_stream()
    recognizer.gate.clear()
    await busy.send_audio(audio(200))  # its partial takes the only slot and holds it
    await until(lambda: service.scheduler.running == 1)
    await caller.send_audio(audio(300))  # due, but no slot: skipped
    final = asyncio.ensure_future(caller.finalize())
    # The partial stops at the gate, still shut, and the final runs in its slot.
    await until(lambda: service.scheduler.partials_stopped == 1
                and service.scheduler.decodes[FINAL] == 1)
    recognizer.gate.set()
    assert (await final).text == f"{300 * MS} bytes"
    assert recognizer.decoded == [300 * MS]  # the partial never finished
    assert busy._partials.empty()  # the stopped partial offers nothing
    await busy.send_audio(audio(100))  # and the next one is due as usual
    assert (await asyncio.wait_for(anext(busy.partials()), 2)).text == f"{300 * MS} bytes"
    await busy.aclose()
    await caller.aclose()


async def test_speech_after_the_pause_stops_the_running_early_decode(pool, caplog):
    recognizer = StoppableRecognizer()
    service = RedecodingSTT(recognizer, pool, slots=1, partial_interval_ms=10_000)
    stream = service.open_stream()
    recognizer.gate.clear()
    await stream.send_audio(audio(800))
    early = stream.speech_paused()
    await until(lambda: service.scheduler.running == 1)
    stream.speech_resumed()  # the caller spoke on: nobody needs that decode
    await until(lambda: service.scheduler.running == 0)  # stopped with the gate still shut
    assert service.scheduler.abandoned_stopped == 1 and recognizer.decoded == []
    with pytest.raises(asyncio.CancelledError):
        await early
    recognizer.gate.set()
    await stream.send_audio(audio(400))
    assert (await stream.finalize()).text == f"{1200 * MS} bytes"
    await stream.aclose()
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_final_with_a_free_slot_stops_no_partial(pool):
    recognizer = StoppableRecognizer()
    scheduler = DecodeScheduler(decode_fn(recognizer), pool, slots=2)
    recognizer.gate.clear()
    partial = asyncio.ensure_future(scheduler.decode(audio(100), PARTIAL))
    await until(lambda: scheduler.running == 1)
    final = asyncio.ensure_future(scheduler.decode(audio(200), FINAL))
    await until(lambda: scheduler.running == 2)
    recognizer.gate.set()
    assert (await partial)[0] == f"{100 * MS} bytes"
    assert (await final)[0] == f"{200 * MS} bytes"
    assert scheduler.partials_stopped == 0


async def test_queued_finals_run_before_queued_partials(pool):
    recognizer, scheduler, first = await busy_scheduler(pool, PARTIAL)
    partial = asyncio.ensure_future(scheduler.decode(audio(200), PARTIAL))
    final = asyncio.ensure_future(scheduler.decode(audio(300), FINAL))
    await asyncio.sleep(0.01)
    recognizer.gate.set()
    await asyncio.gather(first, partial, final)
    assert recognizer.decoded == [100 * MS, 300 * MS, 200 * MS]


async def test_a_cancelled_queued_decode_never_runs(pool):
    recognizer, scheduler, first = await busy_scheduler(pool, FINAL)
    dropped = asyncio.ensure_future(scheduler.decode(audio(200), PARTIAL))
    await asyncio.sleep(0.01)
    dropped.cancel()
    recognizer.gate.set()
    await first
    await until(lambda: scheduler.running == 0)
    assert recognizer.decoded == [100 * MS]


async def test_a_failing_decode_reaches_the_final_and_frees_its_slot(pool):
    class Broken(GatedRecognizer):
        def transcribe(self, pcm16: bytes) -> str:
            raise RuntimeError("model crashed")

    service = RedecodingSTT(Broken(), pool, slots=1, partial_interval_ms=10_000)
    stream = service.open_stream()
    await stream.send_audio(audio(500))
    with pytest.raises(RuntimeError, match="model crashed"):
        await stream.finalize()
    assert service.scheduler.running == 0 and service.scheduler.has_free_slot
    await stream.aclose()


async def test_too_short_audio_is_not_decoded(pool):
    service = stt(pool)
    stream = service.open_stream()
    await stream.send_audio(audio(50))
    assert (await stream.finalize()).text == ""
    assert service.recognizer.decoded == []
    await stream.aclose()


class DraftingRecognizer(GatedRecognizer):
    """Takes drafts like Moonshine: ids are the decoded length in ms, one per 100 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.drafts: list[list[int]] = []

    def transcribe_ids(self, pcm16: bytes, draft, stop=None) -> tuple[str, list[int]]:
        self.gate.wait(10)
        with self.lock:
            self.drafts.append(list(draft))
        ms = len(pcm16) // MS
        return f"{ms} ms", list(range(3, 3 + ms // 100))


async def test_each_decode_gets_the_utterance_s_previous_decode_as_its_draft(pool):
    recognizer = DraftingRecognizer()
    service = RedecodingSTT(recognizer, pool, slots=1, partial_interval_ms=200)
    stream = service.open_stream()
    partials = stream.partials()
    await stream.send_audio(audio(200))  # a partial of 200 ms: no draft yet
    assert (await asyncio.wait_for(anext(partials), 2)).text == "200 ms"
    await stream.send_audio(audio(200))  # the next partial starts from the first's ids
    assert (await asyncio.wait_for(anext(partials), 2)).text == "400 ms"
    await stream.send_audio(audio(100))
    early = await stream.speech_paused()  # the early final starts from the newest partial
    assert early.text == "500 ms"
    assert (await stream.finalize()).text == "500 ms"
    assert recognizer.drafts == [[], [3, 4], [3, 4, 5, 6]]
    await stream.send_audio(audio(300))  # a new utterance: no draft from the last one
    assert (await stream.finalize()).text == "300 ms"
    assert recognizer.drafts[-1] == []
    await partials.aclose()
    await stream.aclose()


class HeldRecognizer(DraftingRecognizer):
    """A DraftingRecognizer whose decodes of the lengths (in ms) in ``held`` wait until
    the test sets their event (a partial slower than the early final, which Moonshine
    decodes faster with the partial's ids as a draft)."""

    def __init__(self, *held_ms: int) -> None:
        super().__init__()
        self.held = {ms: threading.Event() for ms in held_ms}

    def transcribe_ids(self, pcm16: bytes, draft, stop=None) -> tuple[str, list[int]]:
        gate = self.held.get(len(pcm16) // MS)
        if gate is not None:
            gate.wait(10)
        return super().transcribe_ids(pcm16, draft, stop)


async def test_a_partial_of_audio_before_the_pause_is_not_offered_after_the_early_one(pool):
    recognizer = HeldRecognizer(400)  # the partial of the first 400 ms is slow
    service = RedecodingSTT(recognizer, pool, slots=2, partial_interval_ms=400)
    stream = service.open_stream()
    await stream.send_audio(audio(400))  # a partial starts in one slot, held
    await until(lambda: service.scheduler.running == 1)
    await stream.send_audio(audio(100))
    early = await asyncio.wait_for(stream.speech_paused(), 2)  # the other slot
    assert early.text == "500 ms"
    recognizer.held[400].set()  # the older partial ends after the early final
    await stream._partial_task
    offered = []
    while not stream._partials.empty():
        offered.append(stream._partials.get_nowait().text)
    # The early transcript is the newest: nothing older may follow it (the transcript
    # would take words back, and speculation would route the older words).
    assert offered == ["500 ms"]
    # Nor does the older partial's draft replace the early decode's.
    stream.speech_resumed()
    await stream.send_audio(audio(200))
    assert (await stream.finalize()).text == "700 ms"
    assert recognizer.drafts[-1] == [3, 4, 5, 6, 7]
    await stream.aclose()


# ---- splitting an utterance at a long pause the caller spoke on after


def splitting(pool, recognizer=None, interval_ms=10_000, slots=2):
    return RedecodingSTT(recognizer or DraftingRecognizer(), pool, slots=slots,
                         partial_interval_ms=interval_ms, split_pause_ms=200,
                         min_segment_ms=1000)


async def test_a_long_pause_the_caller_spoke_on_after_splits_the_utterance(pool):
    service = splitting(pool)
    recognizer = service.recognizer
    stream = service.open_stream()
    await stream.send_audio(audio(1500))
    recognizer.gate.clear()  # the pause's decode is still running when the caller goes on
    stream.speech_paused()
    await stream.send_audio(audio(250, 0))  # 250 ms of silence since the pause began
    stream.speech_resumed()
    recognizer.gate.set()
    await until(lambda: len(recognizer.drafts) == 1)
    await asyncio.sleep(0.01)  # the kept decode's text has arrived
    await stream.send_audio(audio(600))
    final = await stream.finalize()
    # The decode started at the pause was kept, and the final read only what followed,
    # without the kept part's token ids as its draft.
    assert final.text == "1500 ms 850 ms" and stream.splits == 1
    assert recognizer.drafts == [[], []]
    # The split-off decode, done after the caller spoke on, is no partial of its own: it
    # could come after a partial that already carried its words and more.
    assert stream._partials.empty()
    assert service.scheduler.abandoned_stopped == 0
    await stream.aclose()


async def test_the_early_final_after_a_split_decodes_only_the_new_part(pool):
    service = splitting(pool)
    stream = service.open_stream()
    partials = stream.partials()
    await stream.send_audio(audio(1200))
    await stream.speech_paused()
    assert (await asyncio.wait_for(anext(partials), 2)).text == "1200 ms"
    await stream.send_audio(audio(300, 0))
    stream.speech_resumed()
    await stream.send_audio(audio(500))
    early = await stream.speech_paused()
    assert early.text == "1200 ms 800 ms"
    assert (await asyncio.wait_for(anext(partials), 2)).text == "1200 ms 800 ms"
    assert (await stream.finalize()).text == "1200 ms 800 ms"  # the early decode stands
    await stream.send_audio(audio(700))  # the next utterance starts whole
    assert (await stream.finalize()).text == "700 ms"
    await partials.aclose()
    await stream.aclose()


async def test_partials_after_a_split_decode_only_the_new_part(pool):
    service = splitting(pool, interval_ms=400)
    recognizer = service.recognizer
    stream = service.open_stream()
    partials = stream.partials()
    await stream.send_audio(audio(1000))
    assert (await asyncio.wait_for(anext(partials), 2)).text == "1000 ms"
    await stream.speech_paused()
    await stream.send_audio(audio(200, 0))
    stream.speech_resumed()
    await stream.send_audio(audio(300))  # 500 ms since the split: a partial is due
    assert (await asyncio.wait_for(anext(partials), 2)).text == "1000 ms 500 ms"
    assert [len(d) for d in recognizer.drafts][-1] == 0  # not the split-off part's draft
    await partials.aclose()
    await stream.aclose()


@pytest.mark.parametrize("silence_ms, speech_ms", [(150, 1500), (300, 900)])
async def test_a_short_pause_or_a_short_part_does_not_split(pool, silence_ms, speech_ms):
    service = splitting(pool)
    stream = service.open_stream()
    await stream.send_audio(audio(speech_ms))
    early = stream.speech_paused()
    await stream.send_audio(audio(silence_ms, 0))
    stream.speech_resumed()
    with pytest.raises(asyncio.CancelledError):
        await early
    await stream.send_audio(audio(400))
    final = await stream.finalize()
    assert final.text == f"{speech_ms + silence_ms + 400} ms" and stream.splits == 0
    await stream.aclose()


async def test_a_failed_segment_decode_falls_back_on_the_whole_utterance(pool, caplog):
    class FailsOnce(DraftingRecognizer):
        def transcribe_ids(self, pcm16, draft, stop=None):
            if len(pcm16) == 1500 * MS:
                raise RuntimeError("decoder fell over")
            return super().transcribe_ids(pcm16, draft, stop)

    service = splitting(pool, FailsOnce())
    stream = service.open_stream()
    await stream.send_audio(audio(1500))
    early = stream.speech_paused()
    await stream.send_audio(audio(250, 0))
    stream.speech_resumed()
    with pytest.raises(RuntimeError):
        await early
    await stream.send_audio(audio(500))
    assert (await stream.finalize()).text == "2250 ms"
    assert "stt_segment_failed" in caplog.text
    await stream.aclose()


async def split_once(service, stream):
    """1500 ms of speech, a pause whose decode is still running, then speech again."""
    await stream.send_audio(audio(1500))
    early = stream.speech_paused()
    await until(lambda: service.scheduler.running == 1)
    await stream.send_audio(audio(250, 0))
    stream.speech_resumed()
    assert stream.splits == 1
    return early


async def test_a_reset_stops_the_segments_decodes(pool):
    recognizer = StoppableRecognizer()
    service = splitting(pool, recognizer, slots=1)
    stream = service.open_stream()
    recognizer.gate.clear()
    await split_once(service, stream)
    assert service.scheduler.running == 1  # kept running
    await stream.reset()
    await until(lambda: service.scheduler.running == 0)  # stopped with the gate still shut
    assert recognizer.decoded == []
    recognizer.gate.set()
    await stream.aclose()


async def test_a_cancelled_final_stops_its_segments_decodes(pool):
    # The call ends while a split utterance's final decodes (the engine cancels its
    # finals): nobody waits for the segment any more, so its decode must stop rather than
    # hold one of the process's decode slots to its end.
    recognizer = StoppableRecognizer()
    service = splitting(pool, recognizer)
    stream = service.open_stream()
    recognizer.gate.clear()
    try:
        await split_once(service, stream)
        await stream.send_audio(audio(500))
        final = asyncio.ensure_future(stream.finalize())
        await until(lambda: service.scheduler.running == 2)  # the segment and the tail
        final.cancel()
        with pytest.raises(asyncio.CancelledError):
            await final
        await stream.aclose()
        await until(lambda: service.scheduler.running == 0)  # stopped, the gate still shut
        assert recognizer.decoded == []
    finally:
        recognizer.gate.set()


async def test_a_segment_failing_after_its_final_was_cancelled_is_not_left_unretrieved(
        pool, caplog):
    class FailsAtTheGate(StoppableRecognizer):
        def transcribe(self, pcm16: bytes) -> str:
            self.gate.wait(10)
            if len(pcm16) == 1500 * MS:
                raise RuntimeError("decoder fell over")
            return super().transcribe(pcm16)

    recognizer = FailsAtTheGate()
    service = splitting(pool, recognizer)
    stream = service.open_stream()
    recognizer.gate.clear()
    early = await split_once(service, stream)
    early.cancel()  # the engine stops awaiting the pause's transcript when speech resumes
    await stream.send_audio(audio(500))
    final = asyncio.ensure_future(stream.finalize())
    await until(lambda: service.scheduler.running == 2)
    final.cancel()  # the caller hung up
    with pytest.raises(asyncio.CancelledError):
        await final
    await stream.aclose()
    recognizer.gate.set()
    await until(lambda: service.scheduler.running == 0)
    del early, final, stream
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


class RecordingRecognizer(GatedRecognizer):
    """Keeps every decode's audio."""

    def __init__(self) -> None:
        super().__init__()
        self.audio: list[bytes] = []

    def transcribe(self, pcm16: bytes) -> str:
        with self.lock:
            self.audio.append(pcm16)
        return super().transcribe(pcm16)


async def test_the_early_decode_reads_the_pause_s_end_again_as_more_silence(pool):
    service = RedecodingSTT(RecordingRecognizer(), pool, slots=1,
                            partial_interval_ms=10_000, early_pad_ms=32)
    stream = service.open_stream()
    await stream.send_audio(audio(800, 5) + audio(32, 0))  # a word, then the pause so far
    early = await stream.speech_paused()
    decoded = service.recognizer.audio[-1]
    assert early.text == f"{864 * MS} bytes"
    assert decoded == audio(800, 5) + audio(64, 0)
    # The turn ends with no new speech: that padded decode is the final, not decoded again.
    await stream.send_audio(audio(200, 0))
    assert (await stream.finalize()).text == early.text
    # A final without an early decode reads only what was heard.
    await stream.send_audio(audio(500, 5))
    await stream.finalize()
    assert service.recognizer.audio[-1] == audio(500, 5)
    await stream.aclose()


def test_the_early_pad_may_not_exceed_the_silence_heard():
    from gateway.settings import Settings

    assert Settings(early_final_after_ms=32, early_final_pad_ms=32).early_final_pad_ms == 32
    with pytest.raises(ValueError, match="early_final_pad_ms .48. must not exceed "
                                         "early_final_after_ms .32."):
        Settings(early_final_after_ms=32, early_final_pad_ms=48)


async def test_decodes_the_model_executors_shutdown_cancelled_hang_nobody():
    # Runtime.aclose shuts the model executor down with cancel_futures while calls may
    # still be closing (the VAD batcher was made safe against exactly this:
    # test_vad.test_a_batch_cancelled_by_the_executors_shutdown_hangs_nobody). The
    # executor is shared with the TTS: here its only thread is busy, so the decode that
    # holds the scheduler's slot waits in the executor's queue, and a second decode waits
    # in the scheduler's own queue. Both must learn of the shutdown as an error.
    pool = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    pool.submit(release.wait, 10)  # a TTS sentence holds the model thread
    scheduler = DecodeScheduler(lambda pcm, draft, stop: ("words", []), pool, slots=1)
    first = asyncio.ensure_future(scheduler.decode(audio(500), FINAL))
    second = asyncio.ensure_future(scheduler.decode(audio(500), FINAL))
    for _ in range(3):
        await asyncio.sleep(0)
    assert scheduler.running == 1
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    results = []
    try:
        await _outcomes((first, second), results)
    finally:
        for decode in (first, second):
            decode.cancel()
    assert results == ["error", "error"], results
    assert scheduler.running == 0


async def _outcomes(decodes, results):
    for decode in decodes:
        try:
            await asyncio.wait_for(asyncio.shield(decode), 2)
        except TimeoutError:
            results.append("hangs")
        except asyncio.CancelledError:
            results.append("cancelled")  # its awaiting final looks cancelled: no report
        except RuntimeError:
            results.append("error")
        else:
            results.append("decoded")


async def test_an_utterance_longer_than_the_longest_kept_is_decoded_whole(pool):
    """Review (stop 66): an utterance longer than ``max_utterance_s`` (a caller who talks
    on without a pause that ends the turn) had its oldest audio dropped from the buffer
    undecoded: the final read only the last ``max_utterance_s``, the end of a question
    answered as if it were the whole (docs/operations.md: "older audio is decoded but not
    re-decoded"). Now the tail is split off as a segment, decoded once, when it reaches
    that length; the final reads what follows and joins the two, so every byte is heard
    once, and the buffer stays bounded."""
    service = RedecodingSTT(GatedRecognizer(), pool, slots=2, partial_interval_ms=10_000,
                            max_utterance_s=1.0)
    stream = service.open_stream()
    for _ in range(25):  # 2.5 s in 100 ms frames
        await stream.send_audio(audio(100))
    assert len(stream._buffer) <= 32_000 + 100 * MS  # bounded: a segment holds the rest
    final = await stream.finalize()
    assert final.text == "32000 bytes 32000 bytes 16000 bytes"
    assert sorted(service.recognizer.decoded) == [16000, 32000, 32000]
    await stream.aclose()


async def test_a_long_utterance_is_not_split_while_its_pause_decodes(pool):
    """The tail passes ``max_utterance_s`` in a pause whose early decode runs: that decode
    (the final-to-be) reads the words, so nothing is split off (no second decode of them)
    until the caller speaks on, and then the split comes at the next audio."""
    service = RedecodingSTT(GatedRecognizer(), pool, slots=2, partial_interval_ms=10_000,
                            max_utterance_s=1.0)
    stream = service.open_stream()
    await stream.send_audio(audio(900))
    early = stream.speech_paused()
    for _ in range(3):  # the pause's silence passes the longest kept length
        await stream.send_audio(audio(100, 0))
    assert (await early).text == "28800 bytes" and not stream._segments
    assert (await stream.finalize()).text == "28800 bytes"

    await stream.send_audio(audio(900))  # the next utterance: the caller speaks on after
    stream.speech_paused()
    await stream.send_audio(audio(300, 0))
    stream.speech_resumed()
    await stream.send_audio(audio(100))
    await stream.send_audio(audio(100))
    assert (await stream.finalize()).text == "41600 bytes 3200 bytes"
    await stream.aclose()


class BrokenRecognizer(GatedRecognizer):
    """A local model that fails every decode (a corrupt file, a library that broke)."""

    def transcribe(self, pcm16: bytes) -> str:
        raise RuntimeError("model crashed")


async def test_a_recogniser_whose_partials_keep_failing_does_not_flood_the_log(
        pool, caplog, monkeypatch):
    """Review (stop 70): every failed partial decode logged ``stt_partial_failed`` with its
    traceback: a broken local recogniser wrote a traceback for each partial of every call,
    several a second a call, and the operator's log was that and nothing else. A stream now
    logs its first failure with the traceback, then at most one line every 10 s of its
    clock, counting the failures held back since (``held_back``); another call's stream
    logs its own first failure at once."""
    # Seen by caplog even after a test ran the CLI (its logging stops propagation).
    monkeypatch.setattr(logging.getLogger("voicegate"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="voicegate.stt")
    clock = ManualClock()
    service = RedecodingSTT(BrokenRecognizer(), pool, slots=1, partial_interval_ms=500,
                            max_utterance_s=120.0, clock=clock)

    async def speak(stream, seconds: int) -> None:
        """``seconds`` of speech in 500 ms steps of the clock: a failed partial each."""
        for _ in range(seconds * 2):
            await stream.send_audio(audio(500))
            await until(lambda: stream._partial_task is not None and stream._partial_task.done())
            await clock.advance(0.5)

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "stt_partial_failed"]

    stream = service.open_stream()
    await speak(stream, 25)  # 50 failures, at 0, 0.5, ... 24.5 s
    logged = lines()
    assert len(logged) == 3, f"{len(logged)} lines for 50 failed partials in 25 s"
    assert logged[0].exc_info is not None and "model crashed" in caplog.text
    assert [r.exc_info for r in logged[1:]] == [None, None]  # one traceback, then counts
    assert [r.fields["held_back"] for r in logged] == [0, 19, 19]  # type: ignore[attr-defined]
    assert all("model crashed" in r.fields["error"] for r in logged)  # type: ignore[attr-defined]
    await stream.aclose()

    other = service.open_stream()  # another call: its own first failure, traceback and all
    await speak(other, 1)
    assert len(lines()) == 4 and lines()[-1].exc_info is not None
    await other.aclose()
