"""Call recording on the manual clock: a stereo WAV (caller left, bot right) aligned in time,
the bot channel cut where the caller stopped hearing it, and a JSON of the turns."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import stat
import threading
import time
import tracemalloc
import wave
from typing import AsyncIterator

import numpy as np
import pytest

from gateway.call.engine import RECORDING_END_WAIT_S, RECORDING_STALL_S
from gateway.call.recording import GAP_SETTLES_S, SPILL_S, CallRecorder
from gateway.clock import ManualClock
from tests.call_harness import RATE, CallHarness, tone

NOISE = 77  # a sample value that is no word: the recogniser hears nothing in it


def channels(path) -> tuple[np.ndarray, np.ndarray]:
    return channels_at(path, RATE)


def channels_at(path, rate: int) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, rate)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


async def test_a_barge_in_is_recorded_as_the_caller_heard_it(tmp_path):
    h = CallHarness(settings={"record_dir": str(tmp_path), "false_interruption_s": 0})
    start = h.clock.now()
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(20))
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)
    said_at = h.clock.now()
    await h.say("stop now please", then_silence_ms=1500)
    await h.stop()
    (wav,) = tmp_path.glob("*.wav")
    (meta,) = tmp_path.glob("*.json")
    caller, bot = channels(wav)

    # the caller's first word where it was spoken, on the call's clock
    stop_value = h.vocabulary.value("stop")
    first_word = int(np.flatnonzero(caller == stop_value)[0])
    assert abs(first_word - (said_at - start) * RATE) <= RATE * 0.02

    # the bot's reply from its first frame to where the caller stopped hearing it
    interrupt = h.output.of("interrupt")[0]
    assert interrupt["sent_ms"] > interrupt["heard_ms"]  # some was sent but never heard
    reply_start = (h.output.frames[0][0] - start) * RATE
    spoken = np.flatnonzero(bot)
    assert abs(spoken[0] - reply_start) <= RATE * 0.02
    gaps = np.flatnonzero(np.diff(spoken) > RATE * 0.02)  # silence before the next reply
    first_reply_end = spoken[gaps[0]] if gaps.size else spoken[-1]
    heard_end = reply_start + interrupt["heard_ms"] * RATE / 1000
    assert abs(first_reply_end - heard_end) <= RATE * 0.02
    assert first_reply_end < reply_start + interrupt["sent_ms"] * RATE / 1000 - RATE * 0.02

    data = json.loads(meta.read_text())
    assert data["call_id"] == "test-call" and data["channels"] == {"left": "caller",
                                                                  "right": "bot"}
    assert [t["turn"] for t in data["turns"]] == [m["turn"] for m in h.metrics()]
    assert data["turns"][0]["interrupted"] is True
    kinds = [e["type"] for e in data["events"]]
    assert "interrupt" in kinds and "response" in kinds
    assert [e["text"] for e in data["events"] if e["type"] == "transcript"][-1] == \
        "stop now please"


def stretches(channel: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) sample of every stretch of sound (silences over 10 ms split them)."""
    sound = np.flatnonzero(channel)
    if not sound.size:
        return []
    breaks = np.flatnonzero(np.diff(sound) > RATE // 100)
    return list(zip([sound[0], *sound[breaks + 1]], [*sound[breaks] + 1, sound[-1] + 1]))


async def test_a_barge_in_on_a_resumed_reply_is_cut_where_the_caller_stopped_hearing_it(
        tmp_path):
    # A cough holds the reply, which resumes from `from_ms`; words then stop it for good.
    # Their heard_ms counts from the reply's start, not from the resume: what was sent
    # after it and never heard is not in the recording.
    h = CallHarness(settings={"record_dir": str(tmp_path)})
    start = h.clock.now()
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(20))
    await h.start()
    await h.text("tell me everything")
    await h.wait(1000)
    await h.feed(tone(450, NOISE))  # a cough: the reply is held ...
    await h.silence(1000)  # ... and resumes (no words)
    (resume,) = h.output.of("resume")
    await h.wait(1000)
    await h.say("stop now please", then_silence_ms=1500)
    await h.stop()
    first, second = h.output.of("interrupt")
    assert second["turn"] == first["turn"]  # the same reply, stopped again after its resume
    (wav,) = tmp_path.glob("*.wav")
    _, bot = channels(wav)
    # the reply up to the cough, the resumed reply up to the words, then the next answer
    resumed_start, resumed_end = stretches(bot)[1]
    resumed_at = min(t for t, _ in h.output.frames if t > h.output.interrupted_at[0] + 0.1)
    assert abs(resumed_start - (resumed_at - start) * RATE) <= RATE * 0.02
    heard_since_resume_ms = second["heard_ms"] - resume["from_ms"]
    sent_since_resume_ms = second["sent_ms"] - resume["from_ms"]
    assert sent_since_resume_ms - heard_since_resume_ms >= 40  # some sent, never heard
    recorded_ms = (resumed_end - resumed_start) * 1000 / RATE
    assert abs(recorded_ms - heard_since_resume_ms) <= 20


async def test_caller_audio_read_late_in_a_burst_fills_its_gap_and_the_channels_stay_aligned(
        tmp_path):
    # A stall (the network, or a busy event loop reading the backlog late) delivers 2 s of
    # the caller's audio at once: it was spoken during the stall, so it fills that gap
    # instead of pushing every later word of the caller 2 s after it was spoken.
    h = CallHarness(settings={"record_dir": str(tmp_path)})
    start = h.clock.now()
    await h.start()
    await h.silence(1000)
    frame = RATE * 20 // 1000 * 2
    backlog = tone(2000, NOISE)  # 2 s of the caller's audio, held up on the way
    await h.clock.advance(2.0)  # nothing is read for 2 s ...
    for i in range(0, len(backlog), frame):  # ... then all of it at once
        h.call.feed_audio(backlog[i:i + frame])
    stall_end = h.clock.now()
    await h.silence(1000)
    said_at = h.clock.now()
    await h.say("hello world", then_silence_ms=1500)
    await h.stop()
    (wav,) = tmp_path.glob("*.wav")
    caller, _ = channels(wav)
    backlog_at = np.flatnonzero(caller == NOISE)
    assert abs(backlog_at[0] - (stall_end - 2.0 - start) * RATE) <= RATE * 0.02
    assert abs(backlog_at[-1] + 1 - (stall_end - start) * RATE) <= RATE * 0.02
    first_word = int(np.flatnonzero(caller == h.vocabulary.value("hello"))[0])
    assert abs(first_word - (said_at - start) * RATE) <= RATE * 0.02


async def test_keys_are_not_written_to_the_recording(tmp_path):
    h = CallHarness(settings={"record_dir": str(tmp_path)})
    await h.start()
    for key in "1234#":
        h.call.feed_dtmf(key)
    await h.wait(1500)
    await h.stop()
    (meta,) = tmp_path.glob("*.json")
    text = meta.read_text()
    keypad = [e for e in json.loads(text)["events"] if e["type"] == "keypad"]
    assert keypad and "keys" not in keypad[0]
    assert "1234" not in text


async def test_keys_carried_into_a_spoken_turn_are_not_in_the_recording(tmp_path):
    """Review (stop 61): a recording leaves keypad keys out (they may be a PIN), but keys
    collected while the caller speaks (their pause runs out mid-utterance) are joined into
    the words of the turn those words end (``_carry_keys``): the final `transcript` and the
    `route` the recording keeps said "the caller pressed 4 9 2 1 uh I do not have ...".
    Both hold the caller's words alone; the agent is still asked the keys with them."""
    h = CallHarness(settings={"record_dir": str(tmp_path), "keypad_pause_s": 3,
                              "idle_prompt_s": 0})
    await h.start()
    for key in "4921":
        h.call.feed_dtmf(key)
    await h.wait(1000)
    words = "uh I do not have my account number can I give you my name instead please"
    await h.feed(h.vocabulary.audio(words))  # 3.2 s: the keys' 3 s pause ends inside
    await h.wait(2000)
    await h.stop()
    assert h.llm.requests[-1][-1]["content"] == f"the caller pressed 4 9 2 1 {words}"
    (meta,) = tmp_path.glob("*.json")
    events = json.loads(meta.read_text())["events"]
    kept = {e["type"]: e for e in events if e["type"] in ("transcript", "route")}
    assert kept["transcript"]["text"] == words and kept["route"]["text"] == words, kept
    assert "pressed" not in meta.read_text() and "4 9 2 1" not in meta.read_text()


@pytest.mark.parametrize("key, action", [("1", "hours"), ("0", "handoff")])
async def test_a_mapped_key_is_not_in_the_recording(tmp_path, key, action):
    """Review (stop 61): a recording leaves keypad keys out (docs/protocol.md, "Keypad"),
    but a key mapped to an entry (or to handoff) makes a turn whose `route` event, kept in
    the recording, said `text` "the caller pressed 1" and `reason` "key 1" ("key 0 is mapped
    to handoff"). The client still gets them (it has the key in the `keypad` event anyway);
    the recording keeps that route's decision without them."""
    h = CallHarness(settings={"record_dir": str(tmp_path), "keypad": {key: action},
                              "idle_prompt_s": 0},
                    faqs={"opening hours": "hours"})
    await h.start()
    h.call.feed_dtmf(key)
    await h.wait(2000)
    await h.text("what are your opening hours")  # a routed turn: its route keeps its text
    await h.wait(1500)
    await h.stop()
    (keyed, asked) = h.output.of("route")
    assert keyed["text"] == f"the caller pressed {key}", keyed  # the protocol, as ever
    (meta,) = tmp_path.glob("*.json")
    text = meta.read_text()
    events = json.loads(text)["events"]
    recorded = [e for e in events if e["type"] == "route"]
    assert [e["turn"] for e in recorded] == [keyed["turn"], asked["turn"]]
    assert "text" not in recorded[0] and "reason" not in recorded[0], recorded[0]
    assert recorded[0]["intent"] == keyed["intent"] and recorded[0]["hit"] == keyed["hit"]
    assert recorded[1]["text"] == "what are your opening hours", recorded[1]
    assert "pressed" not in text and f"key {key}" not in text, text


async def test_a_key_mapped_to_a_missing_entry_is_not_named_in_the_log_or_the_recording(
        tmp_path, caplog):
    """Review (stop 62): a key mapped to an entry the cache does not hold reported
    `keypad_unknown_entry` with the message "key 7 is mapped to entry 'gone_entry', ...":
    logged (``stage_failed``'s detail) and kept as the recording's `error` event, though
    docs/protocol.md (Keypad) promises keys never appear in logs or in a recording. The
    message names the entry (what the operator fixes in VOICEGATE_KEYPAD), not the key."""
    import logging

    from gateway.logs import JsonFormatter

    caplog.set_level(logging.DEBUG, logger="voicegate")
    h = CallHarness(settings={"record_dir": str(tmp_path), "keypad": {"7": "gone_entry"},
                              "idle_prompt_s": 0})
    await h.start()
    h.call.feed_dtmf("7")
    await h.wait(2000)
    await h.stop()
    (error,) = h.output.of("error")
    assert error["code"] == "keypad_unknown_entry" and "'gone_entry'" in error["message"]
    (meta,) = tmp_path.glob("*.json")
    text = meta.read_text()
    recorded = [e for e in json.loads(text)["events"] if e["type"] == "error"]
    assert [e["code"] for e in recorded] == ["keypad_unknown_entry"], recorded
    lines = "\n".join(JsonFormatter().format(r) for r in caplog.records
                      if r.name.startswith("voicegate"))
    assert "stage_failed" in lines and "gone_entry" in lines
    for where in (error["message"], text, lines):
        assert "key 7" not in where and '"7"' not in where and "'7'" not in where, where


async def test_nothing_is_recorded_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = await CallHarness().start()
    await h.text("hello")
    await h.wait(1000)
    await h.stop()
    assert list(tmp_path.rglob("*.wav")) == []


async def test_a_barge_in_before_the_next_reply_played_keeps_the_last_one_recorded(tmp_path):
    # The answer plays to its end; the caller asks on, and while that turn's final decodes
    # (nothing of its reply sent) they type. That `interrupt` (heard_ms 0, of the reply not
    # begun) cut the bot channel at the start of the last reply recorded: the answer the
    # caller had heard in full was gone from the WAV.
    h = CallHarness(decode_s=0.5, settings={"record_dir": str(tmp_path)})
    start = h.clock.now()
    h.llm.reply = "Our branches open at nine."  # 500 ms of speech
    await h.start()
    await h.text("when do you open")
    await h.wait(1500)  # played in full
    answered = len(h.output.frames)
    await h.say("and on sunday", then_silence_ms=400)  # the turn ended; its final decodes
    assert h.call.replying and len(h.output.frames) == answered
    h.llm.reply = "Okay."
    await h.text("hello")  # stops the reply that has not begun
    (interrupt,) = h.output.of("interrupt")
    assert interrupt["sent_ms"] == 0
    await h.wait(1500)
    await h.stop()
    (wav,) = tmp_path.glob("*.wav")
    _, bot = channels(wav)
    recorded = stretches(bot)
    assert len(recorded) == 2, recorded  # the answer, then the one to "hello"
    first, end = recorded[0]
    assert abs(first - (h.output.frames[0][0] - start) * RATE) <= RATE * 0.02
    assert abs((end - first) * 1000 / RATE - 500) <= 20


def test_two_calls_of_one_id_in_one_second_keep_both_recordings(tmp_path, monkeypatch):
    # Files are named by the start second and the call id, and a Twilio call's id is its
    # CallSid: a stream of the same CallSid started again within the second must not
    # replace the first call's recording.
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    written = []
    for tone_value in (1000, 2000):
        recorder = CallRecorder(tmp_path, "CA0123", 8000, "pcm16", ManualClock())
        recorder.caller_audio(np.full(800, tone_value, dtype="<i2").tobytes())
        written.append(recorder.write())
    (wav_a, json_a), (wav_b, json_b) = written
    assert len({wav_a, wav_b, json_a, json_b}) == 4 and wav_b.name.endswith("CA0123-2.wav")
    for (wav_path, json_path), tone_value in zip(written, (1000, 2000)):
        with wave.open(str(wav_path)) as wav:
            left = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")[0::2]
        assert set(left.tolist()) == {tone_value}
        assert json.loads(json_path.read_text())["audio"] == wav_path.name


@contextlib.contextmanager
def disk_takes_only(size: int):
    """Files may grow to ``size`` bytes, no further (EFBIG past it, as a full disk's ENOSPC):
    the operating system's own failure of a write, in this process, for the block only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal_was = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, signal_was)


@pytest.mark.parametrize("fails", ["wav", "json"])
def test_a_write_that_fails_leaves_no_partial_recording(fails, tmp_path):
    # The disk fills as a call's recording is written. Before, what had been written
    # stayed: a WAV cut short whose header says it has no audio, or a WAV with a JSON cut
    # off mid-way, files a retention job or a pipeline took for a recording.
    recorder = CallRecorder(tmp_path, "CA0123", 8000, "pcm16", ManualClock())
    seconds = 2.0 if fails == "wav" else 0.1  # 64 KB of stereo audio, or 3.2 KB
    recorder.caller_audio(np.full(int(8000 * seconds), 1000, dtype="<i2").tobytes())
    for turn in range(40 if fails == "json" else 0):  # a JSON of about 20 KB
        recorder.event({"type": "transcript", "final": True, "turn": turn,
                        "text": "I would like to know when the branch opens " * 10})
    with disk_takes_only(16_000), pytest.raises(OSError):
        recorder.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writing_a_recording_takes_little_memory_beyond_the_calls_audio(tmp_path):
    # A recording is held in memory until the call ends; writing it built the whole
    # stereo WAV at once, three more copies of the call's audio besides (the caller
    # channel joined, the interleaved array, its bytes): a half-hour call at 16 kHz,
    # 115 MB held, peaked near 460 MB as it was written, at the end of calls that end
    # together. Now it is written a second at a time.
    rate, seconds = 16000, 60
    recorder = CallRecorder(tmp_path, "long-call", rate, "pcm16", ManualClock())
    caller = np.arange(rate * seconds, dtype="<i2")
    bot = (caller[::-1] | 1).astype("<i2")
    frame = rate // 50
    for i in range(0, len(caller), frame):
        recorder.caller_audio(caller[i:i + frame].tobytes())
        recorder.bot_audio(bot[i:i + frame].tobytes())
    held = caller.nbytes + bot.nbytes  # 3.84 MB
    tracemalloc.start()
    try:
        wav, _ = recorder.write()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < held / 8, f"{peak / held:.2f} x the call's audio"
    left, right = channels_at(wav, rate)
    assert np.array_equal(left, caller) and np.array_equal(right, bot)


async def test_caller_audio_that_arrives_as_the_recording_is_written_is_left_out(
        tmp_path, monkeypatch):
    # A call that ended itself (an idle goodbye) is written while its stream goes on
    # until the line closes it: frames the transport still fed were appended to the
    # recording as a worker thread read it, a second at a time.
    h = CallHarness(settings={"record_dir": str(tmp_path)})
    await h.start()
    await h.silence(1000)
    write = CallRecorder.write

    def write_as_audio_arrives(recorder: CallRecorder):
        h.call.feed_audio(tone(100, NOISE))  # the transport, meanwhile
        return write(recorder)

    monkeypatch.setattr(CallRecorder, "write", write_as_audio_arrives)
    await h.stop()
    (wav,) = tmp_path.glob("*.wav")
    caller, _ = channels(wav)
    assert len(caller) == RATE and not (caller == NOISE).any()


async def spilled(h: CallHarness) -> None:
    """The block of the recording being written, if any, written."""
    spill = h.call._spill
    if spill is not None:
        await asyncio.wait_for(asyncio.shield(spill), 10)


async def test_a_long_call_goes_to_its_file_as_it_goes_and_holds_seconds_in_memory(tmp_path):
    # A recording was held in memory whole until the call ended: about 4 MB a minute at
    # 16 kHz, 120 MB for a half-hour call, without a cap; a process that died lost every
    # call's recording. Now what has settled is written every few seconds.
    h = CallHarness(settings={"record_dir": str(tmp_path), "idle_prompt_s": 0})
    start = h.clock.now()
    h.llm.reply = "Our branches open at nine."  # 500 ms of speech
    await h.start()
    marks = []
    for second in range(60):  # a knock every second: where it lands shows alignment
        marks.append(h.clock.now() - start)
        await h.feed(tone(40, NOISE))
        await h.silence(960)
        if second == 30:
            await h.text("when do you open")
    await spilled(h)
    recorder = h.call._recorder
    # Both channels of 60 s are 3.84 MB; held: what has not settled or filled a block.
    assert recorder.held_bytes <= 2 * (SPILL_S + GAP_SETTLES_S) * RATE * 2
    # What has gone out is a whole WAV already (its header follows every block): a
    # process that dies now leaves the call up to here.
    (part,) = tmp_path.glob("*.wav.part")
    caller_so_far, _ = channels(part)
    assert len(caller_so_far) >= 50 * RATE

    await h.stop()
    assert not list(tmp_path.glob("*.part"))
    (wav,) = tmp_path.glob("*.wav")
    caller, bot = channels(wav)
    assert np.array_equal(caller[:len(caller_so_far)], caller_so_far)
    knocks = [start for start, _ in stretches(caller)]
    assert len(knocks) == 60
    for knock, mark in zip(knocks, marks):
        assert abs(knock - mark * RATE) <= RATE * 0.02
    assert all(end - start == RATE * 40 // 1000 for start, end in stretches(caller))
    (answer,) = stretches(bot)
    assert abs(answer[0] - (h.output.frames[0][0] - start) * RATE) <= RATE * 0.02
    assert abs((answer[1] - answer[0]) * 1000 / RATE - 500) <= 20
    meta = json.loads(wav.with_suffix(".json").read_text())
    assert meta["audio"] == wav.name and abs(meta["duration_s"] - len(caller) / RATE) < 1e-3


async def test_a_disk_that_fills_during_the_call_loses_the_recording_not_the_call(tmp_path):
    h = CallHarness(settings={"record_dir": str(tmp_path), "idle_prompt_s": 0})
    h.llm.reply = "Our branches open at nine."
    await h.start()
    with disk_takes_only(100_000):  # the first block (5 s, 320 KB of stereo) does not fit
        for _ in range(12):
            await h.feed(tone(40, NOISE))
            await h.silence(960)
            await spilled(h)
    assert not list(tmp_path.iterdir())  # the part is gone as its write failed
    await h.text("when do you open")  # the call goes on
    await h.wait(1500)
    assert h.output.frames
    await h.stop()
    assert not list(tmp_path.iterdir())
    assert h.deps.stats.snapshot()["errors"].get("recording_failed") == 1


def test_a_closed_recorder_takes_nothing_more_in(tmp_path):
    # A cancel that cuts a call's close short leaves reply tasks ending on their own: what
    # they still send must not change the recording a worker thread is writing.
    clock = ManualClock()
    recorder = CallRecorder(tmp_path, "c", 8000, "pcm16", clock)
    recorder.caller_audio(np.full(800, 1000, dtype="<i2").tobytes())
    recorder.close()
    held, events = recorder.held_bytes, list(recorder.events)
    recorder.caller_audio(np.full(800, 2000, dtype="<i2").tobytes())
    recorder.reply_boundary()
    recorder.bot_audio(np.full(800, 3000, dtype="<i2").tobytes())
    recorder.interrupted(50.0)
    recorder.event({"type": "response", "source": "llm", "text": "late"})
    assert recorder.held_bytes == held and recorder.events == events
    wav, _ = recorder.write()
    caller, bot = channels_at(wav, 8000)
    assert set(caller.tolist()) == {1000} and not bot.any()


def test_a_recording_finished_while_another_of_its_name_opens_its_part_is_not_replaced(
        tmp_path, monkeypatch):
    # Review: _new_file checks that <name>.wav does not exist, then creates <name>.wav.part.
    # The two are not one step: the first call's end (its rename of <name>.wav.part to
    # <name>.wav, on another worker thread) can come between them. The second call then
    # gets <name>.wav.part as free, and its own rename at its end (os.rename replaces)
    # overwrites the first call's WAV, and its JSON the first call's JSON.
    import pathlib

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    first = CallRecorder(tmp_path, "CA0123", 8000, "pcm16", ManualClock())
    first.caller_audio(np.full(800, 1000, dtype="<i2").tobytes())
    first.append(*(first._caller[:], b""))  # its first block: <name>.wav.part is open
    second = CallRecorder(tmp_path, "CA0123", 8000, "pcm16", ManualClock())
    second.caller_audio(np.full(800, 2000, dtype="<i2").tobytes())

    exists = pathlib.Path.exists
    written = []

    def interleaved(path, *args, **kwargs):  # the other thread runs between the two steps
        result = exists(path, *args, **kwargs)
        if not written and path.name.endswith("CA0123.wav"):
            written.append(first.write())
        return result

    monkeypatch.setattr(pathlib.Path, "exists", interleaved)
    wav_b, json_b = second.write()
    monkeypatch.setattr(pathlib.Path, "exists", exists)
    (wav_a, json_a), = written
    lefts = [set(channels_at(wav, 8000)[0].tolist()) for wav in sorted(tmp_path.glob("*.wav"))]
    assert {1000} in lefts and {2000} in lefts, (
        f"both written to {wav_a.name} == {wav_b.name}; the WAVs left hold {lefts}")


async def test_a_shutdown_lets_the_calls_it_cuts_short_write_their_recordings(tmp_path):
    # Review: uvicorn cancels the calls that outlive its shutdown grace; each call's close
    # then writes its recording (shielded, held in engine._WRITES), but nothing waited for
    # it: the loop's teardown cancelled the write and left a .wav.part, its tail and JSON
    # missing. Services.aclose (the lifespan's shutdown) now lets them finish.
    from gateway.call import engine
    from gateway.services import Services
    from gateway.settings import Settings

    h = CallHarness(settings={"record_dir": str(tmp_path), "idle_prompt_s": 0})
    await h.start()
    for _ in range(8):  # past a block of SPILL_S: part of the call is in its .wav.part
        await h.feed(tone(40, NOISE))
        await h.silence(960)
        await spilled(h)
    assert list(tmp_path.glob("*.wav.part"))
    services = Services(Settings.load({"record_dir": str(tmp_path),
                                       "store_dir": str(tmp_path / "store")}, environ={}))
    assert services.admission.try_enter()  # the harness's call, as its endpoint admits it
    call_task = h._task
    assert call_task is not None

    async def cut_short() -> None:  # uvicorn's shutdown, past its grace, then the endpoint
        call_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call_task
        services.admission.leave()

    cutting = asyncio.create_task(cut_short())
    await services.aclose()
    for write in list(engine._WRITES):  # asyncio.run's teardown: whatever is left is cancelled
        write.cancel()
    cutting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cutting
    assert not list(tmp_path.glob("*.wav.part"))
    (wav,) = tmp_path.glob("*.wav")
    assert json.loads(wav.with_suffix(".json").read_text())["audio"] == wav.name


async def test_a_stalled_recording_disk_does_not_hold_the_call_open(tmp_path, monkeypatch):
    # Review: the record_dir's disk stalls (an NFS or EBS hiccup), and the recording's
    # final write blocks in its worker thread. Call.run awaited that write (shielded)
    # before it returned, and CallSession.close awaits Call.run before it leaves the
    # admission slot and closes the socket: every call that ended while the disk was stuck
    # stayed open, holding a max_calls slot, until the disk answered. It now waits
    # RECORDING_END_WAIT_S; the write goes on, held for the shutdown.
    stalled, entered = threading.Event(), threading.Event()
    write = CallRecorder.write

    def stuck_write(recorder: CallRecorder):
        entered.set()
        stalled.wait()  # the disk does not answer
        return write(recorder)

    monkeypatch.setattr(CallRecorder, "write", stuck_write)
    h = CallHarness(settings={"record_dir": str(tmp_path), "idle_prompt_s": 0})
    await h.start()
    await h.feed(tone(400, 77))
    await h.silence(600)
    task = h._task
    assert task is not None
    h.call.stop()
    try:
        assert await asyncio.to_thread(entered.wait, 10)  # the write is under way, stuck
        await h.clock.advance(RECORDING_END_WAIT_S + 0.1)
        assert task.done(), "the call's end waits for the recording's disk"
    finally:
        stalled.set()
        await asyncio.wait_for(task, 10)


async def test_a_block_the_disk_never_takes_gives_the_recording_up_not_the_call(
        tmp_path, monkeypatch):
    # Review: while one block of the recording was stuck on its disk, no later block was
    # taken: the whole call piled up in memory (4 MB a minute at 16 kHz, for every call of
    # the replica) until the disk answered. Past RECORDING_STALL_S the recording is given
    # up, counted, and the call goes on.
    stalled, entered = threading.Event(), threading.Event()
    threads: list[str] = []

    def stuck_append(recorder: CallRecorder, *block):
        threads.append(threading.current_thread().name)
        entered.set()
        stalled.wait()

    monkeypatch.setattr(CallRecorder, "append", stuck_append)
    h = CallHarness(settings={"record_dir": str(tmp_path), "idle_prompt_s": 0})
    h.llm.reply = "Our branches open at nine."
    await h.start()
    try:
        for _ in range(int(SPILL_S + GAP_SETTLES_S + RECORDING_STALL_S) + 5):
            await h.feed(tone(40, NOISE))
            await h.silence(960)
        assert entered.is_set()
        # On the recordings' own threads: a stuck disk never holds the loop's default
        # executor (the cache's refresh runs there).
        assert threads and all(name.startswith("vg-record") for name in threads)
        assert h.call._recorder is None  # given up: nothing more is held for it
        assert h.deps.stats.snapshot()["errors"].get("recording_failed") == 1
        await h.text("when do you open")  # the call goes on
        await h.wait(1500)
        assert h.output.frames
    finally:
        stalled.set()
        await h.stop()
    assert h.deps.stats.snapshot()["errors"].get("recording_failed") == 1


async def test_a_barge_in_after_a_voice_stall_keeps_the_heard_audio_in_the_recording(tmp_path):
    # Review: the reply's second sentence comes late from the voice: the caller hears the
    # first, then a second of silence, then the second. heard_ms counts no silence (the
    # playout's clock restarts after a late producer), but the recorder placed the second
    # sentence where it was sent (after the silence) and cut the bot channel at
    # reply_start + heard_ms: the cut fell a whole stall too early.
    h = CallHarness(settings={"record_dir": str(tmp_path), "false_interruption_s": 0})
    start = h.clock.now()
    h.llm.reply = ("One two three four five six. "
                   "Seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                   "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three.")
    speak = h.tts.synthesize

    async def late_second_sentence(text: str) -> AsyncIterator[bytes]:
        if text.startswith("Seven"):
            await h.clock.sleep(1.5)  # the voice is slow to start this sentence
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = late_second_sentence  # type: ignore[method-assign]
    await h.start()
    await h.text("tell me everything")
    await h.wait(1500)  # the first sentence, the stall (its words are confirmed in the second)
    await h.say("stop now please", then_silence_ms=1500)
    await h.stop()
    (interrupt,) = h.output.of("interrupt")
    assert interrupt["sent_ms"] > interrupt["heard_ms"] > 600  # heard into sentence two
    (wav,) = tmp_path.glob("*.wav")
    _, bot = channels(wav)
    first_reply = [s for s in stretches(bot)
                   if s[0] < (h.output.interrupted_at[0] - start) * RATE]
    recorded_ms = sum(end - begin for begin, end in first_reply) * 1000 / RATE
    assert abs(recorded_ms - interrupt["heard_ms"]) <= 40, (
        f"the caller heard {interrupt['heard_ms']:.0f} ms of the reply; the recording "
        f"keeps {recorded_ms:.0f} ms of it ({first_reply})")


@contextlib.contextmanager
def umask(mask: int):
    was = os.umask(mask)
    try:
        yield
    finally:
        os.umask(was)


def test_recordings_are_readable_by_the_gateways_user_only(tmp_path):
    """Review (stop 64): a recording is personal data (the caller's voice, account numbers,
    transcripts in the JSON), yet the gateway made its files with the process's default
    mode: under the usual umask 022 the `.wav.part` written during the call, the `.wav`
    and the `.json` were 0644 and the directory it created 0755, readable by every local
    user and every other process on a shared volume, until an operator found the docs'
    `chmod 700`. Files are now created 0600 and a directory the gateway creates 0700 (one
    that exists keeps the operator's mode)."""
    directory = tmp_path / "recordings" / "today"
    recorder = CallRecorder(directory, "CA0123", 8000, "pcm16", ManualClock())
    with umask(0o022):
        recorder.append(np.full(8000, 1000, dtype="<i2").tobytes(), b"")  # a block mid-call
        (part,) = directory.glob("*.wav.part")
        part_mode = stat.S_IMODE(part.stat().st_mode)
        wav, meta = recorder.write()
    assert part_mode == 0o600, oct(part_mode)
    assert stat.S_IMODE(wav.stat().st_mode) == 0o600, oct(wav.stat().st_mode)
    assert stat.S_IMODE(meta.stat().st_mode) == 0o600, oct(meta.stat().st_mode)
    for created in (directory, directory.parent):
        assert stat.S_IMODE(created.stat().st_mode) == 0o700, (created, created.stat())
    # A directory the operator made (and its mode, their choice) is left as it is.
    mine = tmp_path / "theirs"
    mine.mkdir(mode=0o750)
    os.chmod(mine, 0o750)
    with umask(0o022):
        CallRecorder(mine, "CA0124", 8000, "pcm16", ManualClock()).write()
    assert stat.S_IMODE(mine.stat().st_mode) == 0o750


async def _chat_call(directory, *, spill: bool, knocks_after_s: float | None = None):
    """A chat call: a text turn every 3 s for two minutes and no caller audio (with
    ``knocks_after_s``, a knock every second from then on). ``spill=False`` keeps the whole
    recording in memory to the end: what the file was before blocks went out mid-call. The
    clock moves without a frame fed (``h.wait`` feeds silence, as a phone line does)."""
    if not spill:
        # A caller frame's spill is all that wrote a block before.
        original = CallRecorder.take_settled
        CallRecorder.take_settled = lambda recorder: None  # type: ignore[method-assign]
    try:
        h = CallHarness(settings={"record_dir": str(directory), "idle_prompt_s": 0})
        h.llm.reply = "Our branches open at nine."  # 500 ms of speech
        await h.start()
        held = []
        for second in range(120):
            if second % 3 == 0:
                await h.text(f"question {second}")
            if knocks_after_s is not None and second >= knocks_after_s:
                await h.feed(tone(40, NOISE))
                await h.clock.advance(0.96)
            else:
                await h.clock.advance(1.0)
            await spilled(h)
            held.append(h.call._recorder.held_bytes)
        parts = [channels(part) for part in directory.glob("*.wav.part")]
        await h.stop()
    finally:
        if not spill:
            CallRecorder.take_settled = original  # type: ignore[method-assign]
    (wav,) = directory.glob("*.wav")
    return h, held, parts, wav


async def test_a_text_only_call_writes_its_bots_audio_as_it_goes(tmp_path):
    """Review (stop 65): a call whose caller only types (native `text` turns, no caller
    audio) still records the bot's replies, but held them all in memory to the call's end:
    blocks were taken only as caller audio arrived, and no more than the caller's channel
    had settled, which a call with no caller audio never has. Two minutes of chat held the
    whole two minutes (a chat call of hours, ~115 MB an hour at 16 kHz, without a cap), and
    a process that died lost it. The caller's silence is now final once they have sent no
    audio for a while, and the bot's frames take settled blocks out too: the call holds
    seconds, its `.wav.part` grows as it goes, and the file is the one it was."""
    h, held, parts, wav = await _chat_call(tmp_path / "spilled", spill=True)
    assert len(h.output.of("response")) == 40 and len(h.output.frames) >= 40 * 25
    assert max(held) <= 2 * (SPILL_S + GAP_SETTLES_S) * RATE * 2, max(held)
    (part,) = parts  # on disk mid-call: a process that dies now keeps the call so far
    assert len(part[1]) >= 90 * RATE and np.count_nonzero(part[1]) >= 30 * RATE // 2
    caller, bot = channels(wav)
    assert not caller.any()
    assert np.array_equal(bot[:len(part[1])], part[1])
    # The same call recorded whole in memory, as before: the same file, sample for sample.
    _, held_before, _, wav_before = await _chat_call(tmp_path / "whole", spill=False)
    assert max(held_before) > 100 * RATE * 2  # (what the review saw)
    assert np.array_equal(np.stack(channels(wav)), np.stack(channels(wav_before)))
    assert len(stretches(bot)) == 40


async def test_a_chat_call_that_later_sends_audio_records_both_channels_aligned(tmp_path):
    """Review (stop 65): once the caller's silence counts as final, audio they send later
    (a chat that turns to voice) still lands where it was sent, and the file is the one
    recorded whole in memory."""
    h, held, _, wav = await _chat_call(tmp_path / "spilled", spill=True, knocks_after_s=60)
    assert max(held) <= 2 * (SPILL_S + GAP_SETTLES_S) * RATE * 2, max(held)
    caller, bot = channels(wav)
    knocks = stretches(caller)
    assert len(knocks) == 60 and all(end - first == RATE * 40 // 1000 for first, end in knocks)
    _, _, _, wav_before = await _chat_call(tmp_path / "whole", spill=False, knocks_after_s=60)
    assert np.array_equal(np.stack(channels(wav)), np.stack(channels(wav_before)))
