"""Call recording on the manual clock: a stereo WAV (caller left, bot right) aligned in time,
the bot channel cut where the caller stopped hearing it, and a JSON of the turns."""

from __future__ import annotations

import json
import wave

import numpy as np

from tests.call_harness import RATE, CallHarness


def channels(path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
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


async def test_nothing_is_recorded_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = await CallHarness().start()
    await h.text("hello")
    await h.wait(1000)
    await h.stop()
    assert list(tmp_path.rglob("*.wav")) == []
