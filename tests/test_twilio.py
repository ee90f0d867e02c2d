"""Twilio Media Streams end to end: Twilio's documented messages over a real WebSocket to a
real uvicorn server, caller speech synthesized by the local TTS; and the TwiML webhook."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from types import SimpleNamespace
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.audio import rms_dbfs
from gateway.audio_bank import AudioBank, Clip
from gateway.call import Call
from gateway.call.session import AudioRateLimit, CallSession
from gateway.codec import MULAW, encode, ulaw_to_pcm16
from gateway.playout import Playout
from gateway.protocol import ProtocolError
from gateway.server import BackgroundServer
from gateway.clock import ManualClock
from gateway.transports.twilio import (TWILIO_RATE, MediaWatch, TwilioError, TwilioOutput,
                                       TwilioStream, parse_start)
from gateway.transports.twilio_voice import stream_key
from tests.call_harness import CallHarness, tone
from tests.fakes.twilio_media import FRAME_BYTES, TwilioLine
from tests.test_miss_e2e import agent_gateway, long_answer  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

QUESTION = "What time do your branches open on Saturday?"
BARGE_IN = "Actually, stop. I want to talk about something else."


def stream_url(server: BackgroundServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/twilio/stream"


def sid(prefix: str, n: int) -> str:
    return f"{prefix}{n:032x}"


def logged(caplog: pytest.LogCaptureFixture, name: str, call_id: str) -> list[dict[str, Any]]:
    """Structured log events ``name`` of one call (the Twilio call id is the CallSid)."""
    return [r.fields for r in list(caplog.records)  # type: ignore[attr-defined]
            if r.getMessage() == name and getattr(r, "fields", {}).get("call_id") == call_id]


async def wait_logged(caplog, name: str, call_id: str, timeout: float = 60) -> dict[str, Any]:
    for _ in range(int(timeout / 0.05)):
        found = logged(caplog, name, call_id)
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no {name} logged for {call_id}")


def mark_ms(name: str) -> tuple[int, int]:
    turn, ms = name.split(":")
    return int(turn), int(ms)


@pytest.fixture
def voicegate_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="voicegate")
    return caplog


async def test_spoken_question_gets_mulaw_reply_frames_and_marks(server, speak, runtime,
                                                                  voicegate_logs):
    call_sid = sid("CA", 1)
    line = TwilioLine(stream_url(server), call_sid=call_sid, stream_sid=sid("MZ", 1),
                      parameters={"From": "+15550100", "CallSid": call_sid})
    errors_before = sum(runtime.stats.errors.values())
    async with line:
        speaking = asyncio.create_task(line.say(speak(QUESTION, 8000), silence_s=1.0))
        turn = await wait_logged(voicegate_logs, "turn", call_sid)
        await speaking
        await line.wait_until(lambda: not line._buffer, timeout=30)  # heard to the end
    assert line.close_code == 1000  # `stop` ends the stream normally
    assert turn["input"] == "audio" and turn["interrupted"] is False

    media = line.of("media")
    assert media and all(m["streamSid"] == line.stream_sid for m in media)
    # whole 20 ms frames, at most playout_chunk_ms (200 ms) of them in one message
    sizes = [len(base64.b64decode(m["media"]["payload"])) for m in media]
    assert all(n % FRAME_BYTES == 0 and 0 < n <= 10 * FRAME_BYTES for n in sizes)
    assert max(sizes) == 10 * FRAME_BYTES
    assert rms_dbfs(ulaw_to_pcm16(bytes(line.media))) > -35  # real speech, not silence
    first_reply = len(line.media)
    # No number to transfer to: nothing hands off, nor tries a transfer bound to fail.
    assert "handoff" not in turn and "transferred" not in turn
    if turn.get("handoff_unavailable"):
        # No LLM here (a miss is a handoff): no handoff message promising a colleague, but
        # "I can't put you through ... on this line", pre-rendered audio sent exactly as the
        # bank holds it in μ-law 8 kHz.
        assert turn["source"] == "apology"
        clip = runtime.prompts.audio("handoff_unavailable", 8000, MULAW)
        assert bytes(line.media) == clip + b"\xff" * (-len(clip) % FRAME_BYTES)

    marks = [m["mark"]["name"] for m in line.of("mark")]
    assert marks and all(m["streamSid"] == line.stream_sid for m in line.of("mark"))
    assert line.echoed == marks and not line.of("clear")
    marks = [name for name in marks if name.split(":")[0] == str(turn["turn"])]
    positions = [mark_ms(name) for name in marks]
    assert positions and {t for t, _ in positions} == {turn["turn"]}
    # A mark after each message that crosses a 100 ms line (one a 200 ms message), and
    # where the audio sent stops (a sentence's end, the last frame), at the audio sent by
    # then: the reply's end is marked, so all of it can be confirmed heard.
    at = [ms for _, ms in positions]
    assert all(a < b <= a + 200 for a, b in zip([0, *at], at)), at
    assert at[-1] == first_reply // 8, (at, first_reply)
    unavailable = 1 if turn.get("handoff_unavailable") else 0
    assert sum(runtime.stats.errors.values()) == errors_before + unavailable


async def test_barge_in_clears_and_heard_ms_is_what_twilio_confirmed(agent_gateway, speak,
                                                                     voicegate_logs):
    # A reply far longer than a loaded machine's barge-in takes (the ~4 s apology on the
    # session's gateway could be over before it, and no `clear` came).
    server, fake, _ = agent_gateway
    long_answer(fake, 9)
    call_sid = sid("CA", 2)
    line = TwilioLine(stream_url(server), call_sid=call_sid, stream_sid=sid("MZ", 2))
    async with line:
        speaking = asyncio.create_task(line.say(speak(QUESTION, 8000), silence_s=1.2))
        # the reply is playing: Twilio has confirmed at least 400 ms of it
        await line.wait_until(lambda: len(line.echoed) >= 4, timeout=60)
        await speaking
        echoed_before = list(line.echoed)
        interrupting = asyncio.create_task(line.say(speak(BARGE_IN, 8000), silence_s=1.0))
        await line.wait_until(lambda: bool(line.of("clear")), timeout=30)
        echoed_at_clear = list(line.echoed)
        barge_in = await wait_logged(voicegate_logs, "barge_in", call_sid)
        first = await wait_logged(voicegate_logs, "turn", call_sid)
        interrupting.cancel()
    clear = line.of("clear")[0]
    assert clear == {"event": "clear", "streamSid": line.stream_sid}
    assert first["interrupted"] is True and first["turn"] == barge_in["turn"]
    # heard_ms is a mark Twilio echoed as played before the clear, not a clock estimate
    confirmed = {ms for t, ms in map(mark_ms, echoed_at_clear) if t == first["turn"]}
    assert barge_in["heard_ms"] in confirmed
    assert barge_in["heard_ms"] >= max(mark_ms(n)[1] for n in echoed_before)
    assert first["heard_ms"] == barge_in["heard_ms"]
    # marks still queued when the clear came were echoed back, and did not count as heard
    assert all(mark_ms(n)[1] > barge_in["heard_ms"] for n in line.echoed_on_clear
               if mark_ms(n)[0] == first["turn"])


async def test_without_mark_echoes_heard_ms_falls_back_to_the_clock(agent_gateway, speak,
                                                                    voicegate_logs):
    server, fake, _ = agent_gateway
    long_answer(fake, 9)  # as above: still playing when the barge-in comes
    call_sid = sid("CA", 3)
    line = TwilioLine(stream_url(server), call_sid=call_sid, stream_sid=sid("MZ", 3),
                      echo_marks=False)
    async with line:
        speaking = asyncio.create_task(line.say(speak(QUESTION, 8000), silence_s=1.2))
        await line.wait_until(lambda: len(line.played) >= 8 * 400, timeout=60)
        await speaking
        interrupting = asyncio.create_task(line.say(speak(BARGE_IN, 8000), silence_s=1.0))
        await line.wait_until(lambda: bool(line.of("clear")), timeout=30)
        barge_in = await wait_logged(voicegate_logs, "barge_in", call_sid)
        clear = await wait_logged(voicegate_logs, "twilio_clear", call_sid)
        interrupting.cancel()
    assert clear["confirmed"] is False  # Twilio never confirmed playback on this line
    assert 0 < barge_in["heard_ms"] <= clear["sent_ms"]


# ---------------------------------------------------------------- bad input

def media(payload: str, stream_sid: str = sid("MZ", 9)) -> str:
    return json.dumps({"event": "media", "streamSid": stream_sid, "sequenceNumber": "3",
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "20",
                                 "payload": payload}})


GOOD_FRAME = base64.b64encode(b"\xff" * FRAME_BYTES).decode()
# (messages after connected+start, expected error code); the stream goes on after each
RECOVERABLE = [
    ("{not json", "twilio_invalid_json"),
    (json.dumps(["start"]), "twilio_invalid_message"),
    (json.dumps({"streamSid": "MZ"}), "twilio_invalid_message"),
    (json.dumps({"event": "dance"}), "twilio_unknown_event"),
    (json.dumps({"event": 5}), "twilio_invalid_message"),  # not a name: malformed, not unknown
    (media("@@@not base64@@@"), "twilio_invalid_base64"),
    (media(GOOD_FRAME[:-1]), "twilio_invalid_base64"),  # odd length: not whole base64 quanta
    (media(""), "twilio_empty_media"),
    (json.dumps({"event": "media", "media": {}}), "twilio_invalid_message"),
    (json.dumps({"event": "media", "media": {"track": None, "payload": GOOD_FRAME}}),
     "twilio_invalid_message"),
    (media("A" * (64 * 1024 + 4)), "twilio_frame_too_large"),
    (json.dumps({"event": "mark", "mark": {"name": "not ours"}}), "twilio_unknown_mark"),
    (json.dumps({"event": "dtmf", "dtmf": {}}), "twilio_invalid_message"),
    (b"\x00" * 160, "twilio_binary_frame"),
    # another stream's messages (here the healthy one's): refused, ignored, not a `stop`
    (media(GOOD_FRAME, stream_sid=sid("MZ", 4)), "twilio_wrong_stream"),
    (json.dumps({"event": "stop", "streamSid": sid("MZ", 4)}), "twilio_wrong_stream"),
]


async def test_bad_input_is_counted_and_a_parallel_stream_is_untouched(server, speak, runtime,
                                                                       voicegate_logs):
    call_sid = sid("CA", 4)
    healthy = TwilioLine(stream_url(server), call_sid=call_sid, stream_sid=sid("MZ", 4))
    async with healthy:
        speaking = asyncio.create_task(healthy.say(speak(QUESTION, 8000), silence_s=1.0))
        before = dict(runtime.stats.errors)

        # media before start, then a stream that starts and keeps going after each bad message
        broken = TwilioLine(stream_url(server), stream_sid=sid("MZ", 9), call_sid=sid("CA", 9))
        await broken.connect(start=False)
        await broken.send(media(GOOD_FRAME))
        await broken.send(json.dumps({"event": "mark", "mark": {"name": "1:100"}}))
        await broken.send(broken.start_message())
        for message, _ in RECOVERABLE:
            await broken.send(message)
        await broken.send(broken.start_message())  # a second start
        await broken.send(media(GOOD_FRAME))  # still accepted
        await broken.send(json.dumps({"event": "dtmf", "streamSid": broken.stream_sid,
                                      "dtmf": {"track": "inbound_track", "digit": "1"}}))
        await broken.hang_up()
        assert broken.close_code == 1000  # it survived everything and stopped normally

        turn = await wait_logged(voicegate_logs, "turn", call_sid)
        await speaking
    expected: dict[str, int] = {"twilio_media_before_start": 1, "twilio_not_started": 1,
                                "twilio_already_started": 1}
    for _, code in RECOVERABLE:
        expected[code] = expected.get(code, 0) + 1
    counted = {code: runtime.stats.errors[code] - before.get(code, 0) for code in expected}
    assert counted == expected
    assert turn["interrupted"] is False and healthy.of("media") and healthy.of("mark")
    assert rms_dbfs(ulaw_to_pcm16(bytes(healthy.media))) > -35


@pytest.mark.parametrize("start, code, close", [
    ({"event": "start", "start": {"callSid": "CA1"}}, "twilio_invalid_start", 1008),
    ({"event": "start", "streamSid": "MZ1",
      "start": {"streamSid": "MZ1", "mediaFormat": {"encoding": "audio/x-l16",
                                                    "sampleRate": 16000, "channels": 1}}},
     "twilio_unsupported_media_format", 1003),
])
async def test_a_start_the_stream_cannot_run_with_closes_it(server, runtime, start, code, close):
    before = runtime.stats.errors[code]
    async with connect(stream_url(server)) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps(start))
        with pytest.raises(Exception):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == close
    assert runtime.stats.errors[code] == before + 1


@pytest.mark.parametrize("media_format", [
    {"encoding": "audio/x-mulaw", "sampleRate": 8000.9, "channels": 1},
    {"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": 1},
    {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": True},
    {"encoding": "audio/x-mulaw", "sampleRate": 1e999, "channels": 1},
    {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
])
def test_a_start_with_a_format_not_exactly_mulaw_8k_mono_is_refused(media_format):
    # 8000.9 Hz is no 8 kHz stream, nor is the string "8000" a rate: a wrong rate is refused
    # by name (1003), never cut to an integer and accepted.
    start = {"event": "start", "start": {"streamSid": "MZ1", "mediaFormat": media_format}}
    with pytest.raises(TwilioError) as refused:
        parse_start(start)
    assert refused.value.code == "twilio_unsupported_media_format"
    assert parse_start({"event": "start", "start": {"streamSid": "MZ1", "mediaFormat": {
        "encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}).stream_sid == "MZ1"


SUPPORTED_FORMAT = 'supported: "audio/x-mulaw", 8000 Hz, 1 channel'


@pytest.mark.parametrize("media_format, received", [
    ({"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1},
     'encoding "audio/x-l16", sampleRate 16000, channels 1'),
    ({"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": 1},
     'sampleRate "8000" (not a number)'),
    ({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": True},
     "channels true (not a number)"),
    ({"encoding": "audio/x-mulaw", "sampleRate": 8000.9}, "sampleRate 8000.9, channels absent"),
    ({"encoding": ["audio/x-mulaw"], "sampleRate": 8000, "channels": 2},
     "encoding a list, sampleRate 8000, channels 2"),
    ({"encoding": "x" * 500, "sampleRate": 10 ** 300, "channels": 1e999}, "channels Infinity"),
    ({"encoding": "\x00" * 500, "sampleRate": "\x01" * 500, "channels": "\x02" * 500},
     "channels "),
], ids=["l16-16k", "rate-a-string", "channels-true", "rate-8000.9", "encoding-a-list", "huge",
        "long-escapes"])
def test_an_unsupported_media_format_is_named_field_by_field_not_a_python_repr(media_format,
                                                                               received):
    """Review (stop 62): `twilio_unsupported_media_format` said "media format {'encoding':
    'audio/x-l16', 'sampleRate': 16000, 'channels': 1} is not supported": Python's repr of
    the `mediaFormat` object (single quotes, True for JSON's true, a string "8000" looking
    like the number but for its quotes), cut at 120 characters wherever that fell, in the
    log line the operator reads (`bad_input`, detail). It now names the encoding,
    sampleRate and channels received, each as JSON writes it (a field absent says so, one
    that should be a number and is not says so, a list or object says what kind it is),
    then the format supported; short enough for the log's 200 characters."""
    with pytest.raises(TwilioError) as refused:
        parse_start({"event": "start", "start": {"streamSid": "MZ1",
                                                 "mediaFormat": media_format}})
    message = refused.value.message
    assert (refused.value.code, refused.value.close_code) == (
        "twilio_unsupported_media_format", 1003)
    assert received in message, message
    assert message.endswith(SUPPORTED_FORMAT), message
    assert "{" not in message and "'" not in message and "True" not in message, message
    assert len(message) <= 200, message


@pytest.mark.parametrize("field", ["callSid", "accountSid"])
@pytest.mark.parametrize("value", ["../Calls/CA2", "CA1?Status=completed", "CA 1", "x" * 65])
def test_a_start_whose_sid_is_not_an_id_is_refused(field, value):
    # The SIDs address the REST API's hang-up and transfer (Calls/{CallSid}); `start` is not
    # signed, so one that could point a request at another resource is refused, not used.
    start = {"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1",
                                         "accountSid": "AC1", field: value}}
    with pytest.raises(TwilioError) as refused:
        parse_start(start)
    assert refused.value.code == "twilio_invalid_start" and field in str(refused.value)


@pytest.mark.parametrize("value", [0, 2, 1.0, -0.0, 1e999, None])
def test_a_custom_parameter_that_is_a_number_or_null_is_refused_like_any_other_non_string(
        value):
    """Review (stop 62): stop 61 refused a custom parameter of true/false, a list or an
    object, but a number still went through `str()` (parse_start's dict comprehension):
    `{"resumed": 0}` became "0", a non-empty and so true value, the resumed stream stop 61
    kept `false` from making (counted in voicegate_twilio_calls_resumed_total, its lost
    conversation looked up); 1.0 became "1.0", 1e999 "inf", -0.0 "-0.0", none of them "its
    digits" as docs/protocol.md said; and a null was dropped without a word. Twilio sends
    every custom parameter as a string (TwiML's <Parameter value="...">, an XML attribute):
    any other value comes from a client that is not Twilio, and now gets what the others
    get: `twilio_invalid_start` (closed 1008) naming the parameter and the kind of value,
    never the value (it may be the token)."""
    start = {"streamSid": "MZ1", "callSid": "CA1",
             "customParameters": {"token": "s3cret", "resumed": value}}
    with pytest.raises(TwilioError) as refused:
        parse_start({"event": "start", "start": start})
    assert (refused.value.code, refused.value.close_code) == ("twilio_invalid_start", 1008)
    kind = "null" if value is None else "a number"
    assert (f"`customParameters.resumed` must be a string (this one is {kind})"
            in refused.value.message), refused.value.message
    assert "s3cret" not in refused.value.message
    strings = {"token": "s3cret", "resumed": "1", "n": "2", "empty": ""}
    assert parse_start({"event": "start", "start": {
        "streamSid": "MZ1", "customParameters": strings}}).parameters == strings


@pytest.mark.parametrize("event", [5, ["media"], None, True, {}, {"name": "media"}, 1.5])
def test_an_event_that_is_not_a_string_is_an_invalid_message_by_name(event):
    """Review (stop 61): `{"event": 5}` or `{"event": ["media"]}` got `twilio_unknown_event`,
    "unknown event '5'" (or Python's repr of the list), the answer the string "5" gets: the
    stream is told its event is unknown when it sent no event name at all, and
    `{"event": null}` was told the message "has no `event` field" though it had one. As the
    native protocol's `type`: `twilio_invalid_message`, saying `event` must be a string and
    what came instead; the stream goes on, as for any malformed message."""
    stream, _ = started_stream()
    with pytest.raises(TwilioError) as info:
        stream.handle(json.dumps({"event": event, "streamSid": "MZ1"}))
    assert (info.value.code, info.value.close_code) == ("twilio_invalid_message", None)
    assert "`event` must be a string" in info.value.message, info.value.message
    assert "[" not in info.value.message and "'" not in info.value.message  # no repr
    with pytest.raises(TwilioError) as missing:  # no `event` at all still says so
        stream.handle(json.dumps({"streamSid": "MZ1"}))
    assert missing.value.code == "twilio_invalid_message"
    assert "no `event` field" in missing.value.message
    with pytest.raises(TwilioError) as unknown:  # a name we do not know is still unknown
        stream.handle(json.dumps({"event": "5"}))
    assert unknown.value.code == "twilio_unknown_event"


@pytest.mark.parametrize("track", [5, None, ["inbound"], {"name": "inbound"}, True])
def test_a_media_track_that_is_not_a_string_is_an_invalid_message_not_dropped(track):
    """Review (stop 61): a `media` whose `media.track` was not a string (5, null, a list) was
    taken for another track than `inbound` and dropped without a word: the caller's audio
    lost, no error counted. It is `twilio_invalid_message` naming `media.track`; the
    stream goes on, and a string track other than `inbound` is still skipped quietly."""
    stream, _ = started_stream()
    fed: list[bytes] = []
    stream._session.feed_audio = fed.append  # type: ignore[attr-defined]
    message = {"event": "media", "streamSid": "MZ1",
               "media": {"track": track, "payload": GOOD_FRAME}}
    with pytest.raises(TwilioError) as info:
        stream.handle(json.dumps(message))
    assert (info.value.code, info.value.close_code) == ("twilio_invalid_message", None)
    assert "`media.track` must be a string" in info.value.message, info.value.message
    stream.handle(json.dumps({**message, "media": {"track": "outbound", "payload": GOOD_FRAME}}))
    assert fed == []
    stream.handle(json.dumps({**message, "media": {"payload": GOOD_FRAME}}))  # inbound by default
    assert fed == [ulaw_to_pcm16(b"\xff" * FRAME_BYTES)]


@pytest.mark.parametrize("where, field, value", [
    ("start", "streamSid", 5),
    ("start", "streamSid", ["MZ1"]),
    ("message", "streamSid", {"sid": "MZ1"}),
    ("start", "callSid", 12345),
    ("start", "callSid", ["CA1"]),
    ("start", "accountSid", True),
    ("start", "customParameters", ["token", "s3cret"]),
    ("start", "customParameters", "token=s3cret"),
    ("start", "mediaFormat", "audio/x-mulaw"),
    ("start", "mediaFormat", ["audio/x-mulaw", 8000, 1]),
])
def test_a_start_field_of_the_wrong_type_is_an_invalid_start_by_name(where, field, value):
    """Review (stop 61): `start` fields of the wrong JSON type were misnamed or not seen:
    a `streamSid` of 5 was "`start` has no `streamSid`" (it had one); a `callSid` or
    `accountSid` that is a number was taken for none (the call then had no SID for the REST
    hang-up and transfer, and a generated id); `customParameters` that is not an object was
    taken for no parameters (a required token then read `unauthorized`); a `mediaFormat`
    "audio/x-mulaw" was `twilio_unsupported_media_format`, "media format audio/x-mulaw is
    not supported; expected audio/x-mulaw ...". Each is a malformed `start`:
    `twilio_invalid_start` (closed 1008), naming the field and what came instead of it."""
    start: dict[str, Any] = {"streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1"}
    message: dict[str, Any] = {"event": "start", "start": start}
    if where == "start":
        start[field] = value
    else:  # the message's own streamSid, read when `start` has none
        del start[field]
        message[field] = value
    with pytest.raises(TwilioError) as refused:
        parse_start(message)
    assert (refused.value.code, refused.value.close_code) == ("twilio_invalid_start", 1008)
    assert f"`{field}` must be" in refused.value.message, refused.value.message
    assert "s3cret" not in refused.value.message and "[" not in refused.value.message


@pytest.mark.parametrize("value", [False, True, ["1"], {"n": "1"}])
def test_a_custom_parameter_that_is_not_a_string_is_refused_not_read_as_set(value):
    """Review (stop 61): a custom parameter's value went through `str()`: `{"resumed":
    false}` became "False", a non-empty and so true value, and the stream was taken for a
    resumed one (its call counted in voicegate_twilio_calls_resumed_total, its lost
    conversation looked up); a list became Python's repr "['1']". TwiML's <Parameter> values
    are strings: another value is a malformed `start`, `twilio_invalid_start` (closed 1008),
    naming the parameter, never its value (it may be the token). (Since stop 62 a number
    and null are refused too.)"""
    start = {"streamSid": "MZ1", "callSid": "CA1",
             "customParameters": {"token": "s3cret", "resumed": value}}
    with pytest.raises(TwilioError) as refused:
        parse_start({"event": "start", "start": start})
    assert (refused.value.code, refused.value.close_code) == ("twilio_invalid_start", 1008)
    assert "`customParameters.resumed` must be a string" in refused.value.message, (
        refused.value.message)
    assert "s3cret" not in refused.value.message
    ok = {"streamSid": "MZ1", "customParameters": {"token": "s3cret", "n": "2"}}
    assert parse_start({"event": "start", "start": ok}).parameters == {"token": "s3cret",
                                                                        "n": "2"}


async def test_twilio_vanishing_mid_call_ends_the_call(server, runtime):
    before = runtime.stats.active_calls
    line = TwilioLine(stream_url(server), call_sid=sid("CA", 6), stream_sid=sid("MZ", 6))
    await line.connect()
    await line.say(b"\x00\x00" * 1600)  # 200 ms of silence: the call is running
    for _ in range(600):  # 30 s: a bound on a hang, not a pace (a loaded machine is slow)
        if runtime.stats.active_calls == before + 1:
            break
        await asyncio.sleep(0.05)
    assert runtime.stats.active_calls == before + 1
    line._ws.transport.abort()  # type: ignore[union-attr]  # no stop, no close frame
    for _ in range(600):
        if runtime.stats.active_calls == before:
            break
        await asyncio.sleep(0.05)
    assert runtime.stats.active_calls == before
    await line.hang_up()


async def _until(condition, timeout: float = 30) -> bool:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def test_a_stream_upgraded_before_the_drain_is_served_and_the_drain_waits_for_it(server):
    """Twilio cannot retry a stream: refused at its `start` (or closed by a drain that
    did not count it), the phone call is dropped. A stream upgraded before the drain began
    is the replica's call: its `start` is admitted, and the drain waits for it meanwhile."""
    admission = server.app.state.services.admission
    before = admission.active
    started = TwilioLine(stream_url(server), call_sid=sid("CA", 21), stream_sid=sid("MZ", 21))
    pending = TwilioLine(stream_url(server), call_sid=sid("CA", 22), stream_sid=sid("MZ", 22))
    await started.connect(start=False)
    await pending.connect(start=False)
    server.app.state.services.begin_drain()
    try:
        await started.send(started.start_message())
        await _until(lambda: admission.active == before + 1 or started.close_code is not None)
        assert (started.close_code, admission.active) == (None, before + 1), \
            "a Twilio stream upgraded before the drain was refused at its `start`"
        # The other one has not sent its `start` yet: the drain counts it (its caller is on
        # the phone), until it starts or start_timeout_s closes it.
        assert await _until(lambda: admission.held == admission.active + 1)
        await pending.send(pending.start_message())
        assert await _until(lambda: admission.active == before + 2)
        assert admission.held == admission.active and pending.close_code is None
    finally:
        admission.draining = False
        await started.hang_up()
        await pending.hang_up()
    assert await _until(lambda: admission.held == before)


# ---------------------------------------------------------------- the voice webhook

FORM = {"CallSid": sid("CA", 5), "From": "+15550100", "To": "+15550199",
        "AccountSid": sid("AC", 5), "CallStatus": "ringing"}


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    root = ElementTree.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert stream is not None, twiml
    return stream.get("url", ""), {p.get("name", ""): p.get("value", "")
                                   for p in stream.findall("Parameter")}


def action_of(twiml: str) -> str | None:
    connect = ElementTree.fromstring(twiml).find("./Connect")
    assert connect is not None, twiml
    return connect.get("action")


def test_twiml_connects_the_call_to_the_stream_with_its_parameters(server):
    reply = httpx.post(server.base_url + "/twilio/voice", data=FORM)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/xml")
    url, params = stream_of(reply.text)
    assert url == stream_url(server)
    assert params == {"From": FORM["From"], "CallSid": FORM["CallSid"]}
    # the stream's end is Twilio's request to /twilio/stream-ended (a lost stream resumes)
    assert action_of(reply.text) == server.base_url + "/twilio/stream-ended?lost=0"
    # behind a TLS-terminating proxy the stream is wss:// on the public host
    proxied = httpx.post(server.base_url + "/twilio/voice", data=FORM,
                         headers={"Host": "voice.example.com", "X-Forwarded-Proto": "https"})
    assert stream_of(proxied.text)[0] == "wss://voice.example.com/twilio/stream"
    assert action_of(proxied.text) == "https://voice.example.com/twilio/stream-ended?lost=0"


def test_twiml_never_carries_a_character_xml_cannot(server, runtime):
    """Without an auth token anyone can post to the webhook, and its fields went into the
    TwiML as they came: XML 1.0 cannot carry most control characters (nor U+FFFE, U+FFFF),
    so the document was not XML at all and Twilio would reject it. Twilio never sends
    such a field: the request is refused, 400 with the field named, and counted."""
    before = runtime.stats.errors["twilio_invalid_webhook"]
    for field, value, char in (("From", "+1555\x010100", "U+0001"),
                               ("CallSid", "CA\x00" + "0" * 31, "U+0000"),
                               ("From", "\x1b[2Janonymous", "U+001B"),
                               ("From", "client:ann\ufffe", "U+FFFE")):
        reply = httpx.post(server.base_url + "/twilio/voice", data={**FORM, field: value})
        assert reply.status_code == 400, (field, value, reply.text)
        assert reply.text.startswith(f"{field} holds {char}, a character XML cannot carry")
    assert runtime.stats.errors["twilio_invalid_webhook"] == before + 4
    # Whitespace XML does carry (a tab, a line feed) goes through, escaped.
    reply = httpx.post(server.base_url + "/twilio/voice", data={**FORM, "From": "client:a\tb\nc"})
    assert reply.status_code == 200
    assert stream_of(reply.text)[1]["From"] == "client:a\tb\nc"  # an XML parser reads it


TOKEN = "12345678901234567890123456789012"


@pytest.fixture(scope="module")
def signed_server(settings, runtime):
    srv = BackgroundServer(settings.replace(twilio_auth_token=TOKEN,
                                            public_url="https://voice.example.com"),
                           runtime).start()
    yield srv
    srv.stop()


def test_signature_is_checked_when_an_auth_token_is_set(signed_server, runtime):
    url = "https://voice.example.com/twilio/voice?tenant=a"
    signature = RequestValidator(TOKEN).compute_signature(url, FORM)
    endpoint = signed_server.base_url + "/twilio/voice?tenant=a"
    good = httpx.post(endpoint, data=FORM, headers={"X-Twilio-Signature": signature})
    assert good.status_code == 200
    assert stream_of(good.text)[0] == "wss://voice.example.com/twilio/stream"

    before = runtime.stats.errors["twilio_bad_signature"]
    tampered = httpx.post(endpoint, data={**FORM, "From": "+15550666"},
                          headers={"X-Twilio-Signature": signature})
    assert tampered.status_code == 403 and "does not match" in tampered.text
    missing = httpx.post(endpoint, data=FORM)
    assert missing.status_code == 403 and "missing" in missing.text
    assert runtime.stats.errors["twilio_bad_signature"] == before + 2


def test_a_bad_signature_while_the_models_load_is_counted_too(tmp_path):
    """"Every refusal and failure is counted under its code" (docs/operations.md): the
    counters exist before the models load (Services.stats, handed to the runtime)."""
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import Settings

    app = create_app(Settings(store_dir=str(tmp_path / "store"), port=0,
                              twilio_auth_token=TOKEN, public_url="https://voice.example.com"))
    services = app.state.services
    client = TestClient(app)  # no lifespan: the models never load, the replica is not ready
    refused = client.post("/twilio/voice", data=FORM)
    assert refused.status_code == 403 and "missing" in refused.text and not services.ready
    assert services.stats.errors["twilio_bad_signature"] == 1


async def test_stream_upgrade_must_be_signed_when_an_auth_token_is_set(signed_server, runtime):
    # Twilio signs the WebSocket upgrade over the stream's public wss:// URL, no fields.
    url = "wss://voice.example.com/twilio/stream"
    endpoint = stream_url(signed_server)
    before = runtime.stats.errors["twilio_bad_signature"]
    for headers in ({}, {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(
            "wss://elsewhere.example.com/twilio/stream", {})}):
        with pytest.raises(InvalidStatus) as refused:
            async with TwilioLine(endpoint, headers=headers):
                pass
        assert refused.value.response.status_code == 403
    assert runtime.stats.errors["twilio_bad_signature"] == before + 2

    signature = RequestValidator(TOKEN).compute_signature(url, {})
    before_calls = runtime.stats.calls
    line = TwilioLine(endpoint, call_sid=sid("CA", 9), stream_sid=sid("MZ", 9),
                      headers={"X-Twilio-Signature": signature},
                      parameters={"stream_key": stream_key(TOKEN, sid("CA", 9))})
    await line.connect()
    await line.say(b"\x00\x00" * 1600)
    await line.hang_up()
    assert line.close_code == 1000  # served as a call, ended by its stop
    assert runtime.stats.calls == before_calls + 1
# ---------------------------------------------------------------- μ-law audio, marks (no server)

def test_audio_bank_holds_clips_ready_in_mulaw_8k():
    tone = b"\x00\x10\x00\xf0" * 4000  # 16 kHz pcm16, 0.5 s
    bank = AudioBank()
    bank.add(Clip("k", "text", tone, 16000))
    ulaw = bank.audio("k", 8000, MULAW)
    assert ulaw == encode(bank.audio("k", 8000), MULAW) and len(ulaw) == 4000
    assert bank.audio("k", 8000, MULAW) is ulaw  # held, not converted per call
    bank.replace_all([Clip("k2", "text", tone, 16000)])
    assert "k" not in bank and len(bank.audio("k2", 8000, MULAW)) == 4000


async def test_mulaw_playout_frames_are_160_bytes_padded_with_mulaw_silence():
    frames: list[bytes] = []

    async def send(frame: bytes) -> None:
        frames.append(frame)

    playout = Playout(send, 8000, frame_ms=20, lead_ms=1000, encoding=MULAW)
    await playout.write(b"\x01" * 200)
    await playout.flush()
    assert [len(f) for f in frames] == [160, 160]
    assert frames[1] == b"\x01" * 40 + b"\xff" * 120  # 0xFF is μ-law zero, 0x00 is a click
    assert playout.sent_ms == 40


async def test_marks_confirm_only_the_current_uncleared_reply():
    sent: list[dict[str, Any]] = []

    class Outbox:  # the session's outbox, as the output sees it
        def send_text(self, text: str) -> None:
            sent.append(json.loads(text))

    out = TwilioOutput(Outbox(), "MZ1", "call")  # type: ignore[arg-type]
    assert out.confirmed_heard_ms() is None  # no echo yet: the call uses its clock
    out.reply_started(1)
    for _ in range(12):
        await out.send_audio(b"\xff" * 160)
    marks = [m["mark"]["name"] for m in sent if m["event"] == "mark"]
    assert marks == ["1:100", "1:200"]
    assert out.mark_played("1:100") and out.confirmed_heard_ms() == 100.0
    await out.interrupt({"turn": 1, "heard_ms": 100.0})
    assert sent[-1] == {"event": "clear", "streamSid": "MZ1"}
    assert out.mark_played("1:200") and out.confirmed_heard_ms() == 100.0  # dropped, not heard
    out.reply_started(2)
    assert out.mark_played("1:200") and out.confirmed_heard_ms() == 0.0  # a stale reply's echo
    assert not out.mark_played("hello")


def test_a_twilio_line_can_transfer_only_with_a_number_and_the_rest_credentials():
    """Review (stop 62): the call hands off after a provider failed turn after turn only
    where the transfer has somewhere to go; without, the apology goes on (no promise of
    a colleague the line cannot keep)."""
    control = object()  # the REST side: only whether there is one matters here
    assert not TwilioOutput(None, "MZ1", "call").can_transfer  # type: ignore[arg-type]
    assert not TwilioOutput(None, "MZ1", "call", control,  # type: ignore[arg-type]
                            handoff_number="").can_transfer
    assert not TwilioOutput(None, "MZ1", "call",  # type: ignore[arg-type]
                            handoff_number="+15551230000").can_transfer
    assert TwilioOutput(None, "MZ1", "call", control,  # type: ignore[arg-type]
                        handoff_number="+15551230000").can_transfer


async def test_a_resumed_reply_counts_only_the_marks_sent_after_the_resume():
    sent: list[dict[str, Any]] = []

    class Outbox:
        def send_text(self, text: str) -> None:
            sent.append(json.loads(text))

    out = TwilioOutput(Outbox(), "MZ1", "call")  # type: ignore[arg-type]
    out.reply_started(3)
    for _ in range(15):  # 300 ms sent
        await out.send_audio(b"\xff" * 160)
    assert out.mark_played("3:100")
    await out.interrupt({"turn": 3, "heard_ms": 100.0})
    out.reply_resumed(100.0)  # noise: the reply is sent again from 100 ms
    assert out.mark_played("3:200") and out.confirmed_heard_ms() == 100.0  # dropped at clear
    for _ in range(10):
        await out.send_audio(b"\xff" * 160)
    marks = [m["mark"]["name"] for m in sent if m["event"] == "mark"]
    assert marks[-2:] == ["3.1:200", "3.1:300"]  # positions continue from the resume point
    assert out.mark_played("3.1:200") and out.confirmed_heard_ms() == 200.0
    assert not out.mark_played("3.x:200")


class SentMessages:
    """The session's outbox, as the output sees it: every message sent, parsed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


def started_stream() -> tuple[TwilioStream, TwilioOutput]:
    """A started stream's parser and output, without a server (the call is a stand-in)."""
    services = SimpleNamespace(settings=SimpleNamespace(max_frame_bytes=65536))
    session = SimpleNamespace(call=SimpleNamespace(id="CA1"), outbox=SentMessages())
    stream = TwilioStream(services, session, authenticated=True)  # type: ignore[arg-type]
    stream.output = TwilioOutput(session.outbox, "MZ1", "CA1")  # type: ignore[arg-type]
    return stream, stream.output


def echo(name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": name}})


async def test_an_echoed_mark_we_never_sent_is_twilio_unknown_mark():
    stream, out = started_stream()
    for name in ("7:100", "1:100"):  # shaped like ours, but no audio was sent yet
        with pytest.raises(TwilioError) as info:
            stream.handle(echo(name))
        assert info.value.code == "twilio_unknown_mark"
    out.reply_started(1)
    for _ in range(3):  # 300 ms sent: marks 1:100, 1:200, 1:300
        await out.send_audio(b"\xff" * 800)
    out.reply_started(2)
    stream.handle(echo("1:300"))  # an earlier reply's late echo: ours, ignored
    for name in ("1:400", "2:100", "1.1:100"):  # past what was sent, or a label never used
        with pytest.raises(TwilioError) as info:
            stream.handle(echo(name))
        assert info.value.code == "twilio_unknown_mark"


async def test_a_message_for_another_stream_is_twilio_wrong_stream_and_ignored():
    """Review (stop 62): the `streamSid` of `media`, `mark`, `dtmf` and `stop` was never
    compared with the stream's own (from `start`): another stream's audio was fed to this
    call as the caller's, its keys pressed here, its mark echo taken as this reply heard,
    and its `stop` ended this call. Twilio's messages each carry their stream's
    `streamSid`; one naming another stream is `twilio_wrong_stream` (counted, logged),
    naming both, and ignored: the stream goes on (it is not hung up), as after any bad
    message. A message without `streamSid` is still taken (the tests' Twilio fake and
    older messages here omit it on some); one that is not a string is
    `twilio_invalid_message`, naming the field."""
    stream, out = started_stream()
    fed: list[bytes] = []
    keys: list[str] = []
    stream._session.feed_audio = fed.append  # type: ignore[attr-defined]
    stream._session.feed_dtmf = keys.append  # type: ignore[attr-defined]
    out.reply_started(1)
    await out.send_audio(b"\xff" * 800)  # 100 ms sent: mark 1:100
    messages = [{"event": "media", "media": {"payload": GOOD_FRAME}},
                {"event": "mark", "mark": {"name": "1:100"}},
                {"event": "dtmf", "dtmf": {"digit": "1"}},
                {"event": "stop"}]
    for message in messages:
        with pytest.raises(TwilioError) as info:
            stream.handle(json.dumps({**message, "streamSid": "MZ2"}))
        assert (info.value.code, info.value.close_code) == ("twilio_wrong_stream", None)
        assert "MZ2" in info.value.message and "MZ1" in info.value.message
        assert f"`{message['event']}`" in info.value.message, info.value.message
        with pytest.raises(TwilioError) as info:
            stream.handle(json.dumps({**message, "streamSid": 5}))
        assert (info.value.code, info.value.close_code) == ("twilio_invalid_message", None)
        assert "`streamSid` must be a string" in info.value.message, info.value.message
    assert fed == [] and keys == [] and stream.media_frames == 0 and not stream.stopped
    assert out.confirmed_heard_ms() is None and out.marks_confirmed == 0
    for message in messages[:3]:  # this stream's own, and one that names none
        stream.handle(json.dumps({**message, "streamSid": "MZ1"}))
        stream.handle(json.dumps(message))
    assert len(fed) == 2 and len(keys) == 2 and stream.media_frames == 2
    assert out.confirmed_heard_ms() == 100.0
    stream.handle(json.dumps({"event": "stop", "streamSid": "MZ1"}))
    assert stream.stopped


def test_the_message_limit_counts_utf8_bytes_not_characters():
    # max_frame_bytes is a byte limit (the native protocol counts bytes): a message of
    # 3-byte characters under the limit in characters but over it in bytes is refused.
    stream, _ = started_stream()
    wide = json.dumps({"event": "dance", "note": "\u20ac" * 30000}, ensure_ascii=False)
    assert len(wide) < 65536 < len(wide.encode())
    with pytest.raises(TwilioError) as info:
        stream.handle(wide)
    assert info.value.code == "twilio_frame_too_large" and "bytes" in str(info.value)
    with pytest.raises(TwilioError) as info:  # the same in ASCII escapes is small: read on
        stream.handle(json.dumps({"event": "dance", "note": "x" * 30000}))
    assert info.value.code == "twilio_unknown_event"


def test_one_oversized_media_payload_is_its_own_error_not_audio_too_fast():
    """Twilio sends 20 ms (160 bytes) a message. A message just under max_frame_bytes
    (64 KiB) carries ~48 KiB of μ-law, 6.1 s of audio: more than the rate limit's allowance
    for one frame (sized on max_frame_bytes of pcm16), so the first such message closed the
    call as `audio_too_fast` (1008), as if a caller talked too fast. It is a malformed or
    non-Twilio client: refused as such, dropped, and the stream goes on."""
    settings = SimpleNamespace(max_frame_bytes=65536, max_audio_rate=2.0,
                               audio_rate_grace_s=2.0)
    fed: list[bytes] = []
    session = SimpleNamespace(call=SimpleNamespace(id="CA1", feed_audio=fed.append),
                              settings=settings, outbox=SentMessages(),
                              _rate=AudioRateLimit(TWILIO_RATE, 2.0, 2.0,
                                                   max_frame_bytes=settings.max_frame_bytes))
    session.feed_audio = lambda pcm16: CallSession.feed_audio(session, pcm16)  # the real limit
    stream = TwilioStream(SimpleNamespace(settings=settings), session,  # type: ignore[arg-type]
                          authenticated=True)
    room = settings.max_frame_bytes - len(media(""))
    largest = media(base64.b64encode(b"\xff" * (room // 4 * 3)).decode())
    assert len(largest) <= settings.max_frame_bytes
    with pytest.raises(ProtocolError) as info:
        stream.handle(largest)
    assert (info.value.code, info.value.close_code) == ("twilio_media_too_large", None), (
        f"one {len(largest)}-byte media message: {info.value.code} ({info.value.message})")
    assert "160" in info.value.message and fed == []
    stream.handle(media(GOOD_FRAME))  # the stream goes on
    assert fed == [ulaw_to_pcm16(b"\xff" * FRAME_BYTES)]


async def test_a_bogus_mark_does_not_turn_off_the_clock_estimate_of_heard_ms():
    # Until the stream echoes a mark of ours, heard_ms comes from the playout clock; a mark
    # we never sent must not switch that off (a barge-in would then record that the caller
    # heard nothing of a reply that has played for a second).
    _, out = started_stream()
    out.mark_played("7:100")  # no reply was ever sent
    out.reply_started(1)
    for _ in range(10):  # 1 s of reply audio, 100 ms a message
        await out.send_audio(b"\xff" * 800)
    out.mark_played("1:1100")  # past what was sent
    assert out.marks_sent == 10
    assert out.confirmed_heard_ms() is None  # no mark of ours echoed: the clock decides
    assert out.mark_played("1:300") and out.confirmed_heard_ms() == 300.0


async def test_marks_of_only_the_last_few_replies_are_remembered():
    # An echo is checked against what was sent, at a fixed cost however long the call.
    _, out = started_stream()
    for turn in range(1, 101):
        out.reply_started(turn)
        await out.send_audio(b"\xff" * 800)
    assert out.mark_played("100:100") and out.mark_played("90:100")
    assert not out.mark_played("1:100")  # long gone: no echo of it can still come


async def test_each_reply_of_a_turn_names_its_marks_apart():
    # A resumed reply and the apology after it (a second reply of the turn) each name
    # their marks anew, counting up in the turn; the next turn starts from its own number.
    _, out = started_stream()
    out.reply_started(3)
    await out.send_audio(b"\xff" * 800)
    out.reply_resumed(0.0)
    await out.send_audio(b"\xff" * 800)
    out.reply_started(3)  # the apology
    await out.send_audio(b"\xff" * 800)
    out.reply_started(4)
    await out.send_audio(b"\xff" * 800)
    assert [m["mark"]["name"] for m in out._outbox.sent if m["event"] == "mark"] == \
        ["3:100", "3.1:100", "3.2:100", "4:100"]


class PhoneCallOutput(TwilioOutput):
    """A Twilio stream's output with the call's events kept (Twilio itself has no channel
    for them): what a test of the call engine on a phone line reads."""

    def __init__(self, **line: Any) -> None:
        super().__init__(SentMessages(), "MZ1", "test-call", **line)  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []

    @property
    def marks(self) -> list[str]:
        return [m["mark"]["name"] for m in self._outbox.sent if m["event"] == "mark"]

    async def send_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    async def interrupt(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        await super().interrupt(event)


async def test_a_late_echo_of_a_failed_reply_is_not_taken_for_the_apology_heard():
    # Turn 1's answer breaks off after 1.2 s (its voice fails a sentence) and the apology
    # plays as a second reply of turn 1. Its marks were named as the failed reply's
    # ("1:100", "1:200", ...), so a late echo of the failed reply's "1:1100" was taken for
    # the apology's progress: the caller who cut the apology off 100 ms in was said to have
    # heard all of it that was sent.
    h = CallHarness()
    h.responder._prompts.add(Clip("apology", "Sorry.", tone(2000, 700), 16000))  # 2 s long
    h.llm.reply = "Here is the first part of a long answer to your question. FAIL this."
    out = PhoneCallOutput()
    h.call = Call(h.deps, out, 8000, call_id="test-call")  # a phone line: μ-law at 8 kHz
    await h.start()
    await h.text("explain my statement")
    for _ in range(200):  # the answer plays, its voice fails, the apology starts
        if [e for e in out.events if e.get("source") == "apology"]:
            break
        await h.clock.advance(0.02)
    failed = list(out.marks)
    assert failed[-1] == "1:1200", failed  # the answer's 1.2 s, then the voice failed
    for _ in range(15):  # 300 ms of the apology
        await h.clock.advance(0.02)
    apology = out.marks[len(failed):]
    assert len(apology) >= 3, apology
    assert out.mark_played(apology[0])  # the far end played the apology's first 100 ms
    assert out.mark_played("1:1100")  # the failed reply's echo, late: ours, not the apology's
    await h.text("hello")  # the caller cuts the apology off
    interrupt = next(e for e in out.events if e["type"] == "interrupt")
    assert interrupt["heard_ms"] == 100.0, interrupt
    assert not set(apology) & set(failed), (failed, apology)
    await h.stop()


class PlayingPhoneLine(PhoneCallOutput):
    """A phone line's output whose far end plays as Twilio does, on the call's manual clock:
    each message plays once the one before it has, ``delay_s`` after it was sent; each mark
    is echoed ``delay_s`` after the audio before it played; a ``clear`` drops what was not
    played and echoes the marks still pending. ``echo_due()`` delivers the echoes due."""

    def __init__(self, clock: ManualClock, delay_s: float = 0.05) -> None:
        super().__init__()
        self._clock, self._delay_s = clock, delay_s
        self._played_at = 0.0  # when what was sent so far has played (clock time)
        self._pending: list[tuple[float, str]] = []  # (echo due, mark name)
        self._seen = 0

    def _take_sent(self) -> None:
        for message in self._outbox.sent[self._seen:]:
            if message["event"] == "media":
                ms = len(base64.b64decode(message["media"]["payload"])) / 8
                self._played_at = max(self._played_at, self._clock.now() + self._delay_s) \
                    + ms / 1000
            elif message["event"] == "mark":
                self._pending.append((self._played_at + self._delay_s, message["mark"]["name"]))
            elif message["event"] == "clear":
                for _, name in self._pending:
                    self.mark_played(name)
                self._pending, self._played_at = [], self._clock.now()
        self._seen = len(self._outbox.sent)

    def echo_due(self) -> None:
        self._take_sent()
        now = self._clock.now() + 1e-9
        for due, name in [p for p in self._pending if p[0] <= now]:
            self.mark_played(name)
        self._pending = [p for p in self._pending if p[0] > now]


async def _play_until(h: CallHarness, out: PlayingPhoneLine, ms: int) -> None:
    """Advance the clock in 10 ms steps, echoing marks as they fall due, until ``ms`` after
    the reply's first frame."""
    first = None
    for _ in range(1000):
        out.echo_due()
        if first is None and any(m["event"] == "media" for m in out._outbox.sent):
            first = h.clock.now()
        if first is not None and h.clock.now() - first >= ms / 1000 - 1e-9:
            return
        await h.clock.advance(0.01)
    raise AssertionError("the reply never played")


def _said(h: CallHarness) -> list[str]:
    return [m["content"] for m in h.call.conversation.messages() if m["role"] == "assistant"]


async def test_a_sentence_played_out_before_a_pause_is_confirmed_heard_whole():
    """Review (stop 64): Twilio marks were sent only after a message crossing a 100 ms line
    of reply audio, so the audio after a reply's last line (a sentence ending at 1050 ms:
    its last 40 ms, all that was sent) was never confirmed heard, however long it had
    played. The caller heard "Your card is blocked." whole, the next sentence's voice took
    its time, they spoke in the pause: heard_ms said 1000 (the last line's mark) of the
    1040 ms sent, and the agent's context was cut to "Your card is", the word the caller
    heard last dropped (a line without marks, on the clock's estimate, kept it).
    A mark now goes out when a segment's audio has all been sent, and after a reply's
    last frame: what went out before a pause is confirmed once it has played."""
    h = CallHarness()
    h.llm.reply = "Your card is blocked. Call us back tomorrow."
    speak = h.tts.synthesize

    async def synthesize(text: str) -> Any:
        if text.startswith("Your"):  # 1050 ms: no whole number of 100 ms lines
            yield tone(1050)
            return
        await h.clock.sleep(1.5)  # the next sentence's voice is slow to start
        async for chunk in speak(text):
            yield chunk

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    out = PlayingPhoneLine(h.clock)
    h.call = Call(h.deps, out, 8000, call_id="test-call")
    await h.start()
    await h.text("is my card ok")
    await _play_until(h, out, 1400)  # the first sentence has played, and its marks are back
    await h.text("why")  # the caller speaks in the pause
    interrupt = next(e for e in out.events if e["type"] == "interrupt")
    assert (interrupt["heard_ms"], interrupt["sent_ms"]) == (1040.0, 1040.0), (interrupt,
                                                                                out.marks)
    assert _said(h)[0] == "Your card is blocked.", _said(h)
    await h.stop()


async def test_a_reply_end_is_marked_and_a_clear_after_it_leaves_it_unconfirmed():
    """Review (stop 64): a reply's last part under 100 ms (1000 -> 1060 ms) got no mark.
    Its whole frames now get one as the sentence's audio ends ("1:1040"), its last frame
    (padded) another ("1:1060"). Twilio echoes a mark only once played (here 50 ms each
    way): a barge-in after the whole reply was sent, before those echoes, is heard as far
    as was echoed (900), its `clear` echoes the dropped marks back, and they count neither
    as this reply heard nor as the next one's audio."""
    h = CallHarness()
    h.llm.reply = "Your card is blocked."

    async def synthesize(text: str) -> Any:
        yield tone(1050)  # no whole number of 100 ms lines

    h.tts.synthesize = synthesize  # type: ignore[method-assign]
    out = PlayingPhoneLine(h.clock)
    h.call = Call(h.deps, out, 8000, call_id="test-call")
    await h.start()
    await h.text("is my card ok")
    await _play_until(h, out, 1050)  # all sent; the end plays on, "1:1000" not echoed yet
    assert out.marks[-3:] == ["1:1000", "1:1040", "1:1060"], out.marks[-4:]
    await h.text("why")
    interrupt = next(e for e in out.events if e["type"] == "interrupt")
    assert (interrupt["heard_ms"], interrupt["sent_ms"]) == (900.0, 1060.0), interrupt
    out.echo_due()  # the clear's echoes of "1:1000", "1:1040" and "1:1060": not counted,
    assert out.marks_confirmed == 9  # nor heard of the next reply (under way: none yet)
    assert out.confirmed_heard_ms() == 0.0
    await _play_until(h, out, 3000)  # the next reply plays out, every mark echoed
    assert out.marks[-3:] == ["2:1000", "2:1040", "2:1060"], out.marks[-4:]
    assert out.confirmed_heard_ms() == 1060.0
    await h.stop()


class SlowRestApi:
    """Twilio's REST API as a stream's output uses it (TwilioCallControl), each request
    answered ``answer_s`` of the call's clock after it was made."""

    def __init__(self, clock: Any, answer_s: float) -> None:
        self._clock = clock
        self._answer_s = answer_s
        self.asked: list[str] = []
        self.answered: list[str] = []

    async def _request(self, what: str) -> None:
        self.asked.append(what)
        await self._clock.sleep(self._answer_s)
        self.answered.append(what)

    async def transfer(self, account_sid: str, call_sid: str, target: str,
                       action: str = "") -> None:
        await self._request("transfer")

    async def hang_up(self, account_sid: str, call_sid: str) -> None:
        await self._request("hang_up")


@pytest.mark.parametrize("request_kind", ["transfer", "hang_up"])
async def test_the_stream_ending_before_the_rest_answer_does_not_cut_the_request_off(
        request_kind):
    # A transfer (a handoff key) or an idle hang-up asks Twilio's REST API to move or end
    # the call; Twilio does, and ends the stream (`stop`), which may reach the gateway
    # before the request's own answer. The session then stops the call (as here), whose end
    # cancelled every reply task: the request was abandoned halfway and the handoff's turn
    # said it was not transferred (no `transferred`, no twilio_transferred line).
    h = CallHarness(settings={"keypad": {"0": "handoff"}, "idle_prompt_s": 1})
    api = SlowRestApi(h.clock, answer_s=0.5)
    out = PhoneCallOutput(control=api, account_sid="AC1", call_sid="CA1",  # type: ignore
                          handoff_number="+15551230000")
    h.call = Call(h.deps, out, 8000, call_id="test-call")
    await h.start()
    if request_kind == "transfer":
        h.call.feed_dtmf("0")
    else:
        h.call.feed_text("hello there", True)  # answered; then the caller says nothing
    for _ in range(500):  # the handoff message (or the prompt, then the goodbye) plays
        if api.asked:
            break
        await h.clock.advance(0.02)
    assert api.asked == [request_kind]
    await h.clock.advance(0.1)  # the request is under way: Twilio's `stop` arrives
    h.call.stop()
    assert h._task is not None
    for _ in range(100):
        if h._task.done():
            break
        await h.clock.advance(0.02)
    await asyncio.wait_for(h._task, 5)
    assert api.answered == [request_kind], "the request was cut off halfway"
    if request_kind == "transfer":
        (metrics,) = [e for e in out.events if e["type"] == "turn_metrics"]
        assert metrics.get("transferred") is True, metrics


async def test_media_watch_declares_a_stream_dead_only_after_a_whole_timeout_without_media():
    clock = ManualClock()
    frames = [0]
    dead: list[float] = []
    watch = asyncio.create_task(MediaWatch(clock, 4.0, lambda: frames[0], dead.append).run())
    for step in range(30):  # 6 s of frames arriving in bursts a second apart: alive
        await clock.advance(0.2)
        if step % 5 == 4:
            frames[0] += 50
    assert dead == [] and not watch.done()
    await clock.advance(3.9)  # the frames stop: not yet a whole timeout
    assert dead == []
    await clock.advance(1.2)  # noticed within 1.25 timeouts of the last frame
    assert watch.done() and len(dead) == 1 and 4.0 <= dead[0] <= 5.0
    await clock.advance(10.0)
    assert len(dead) == 1  # once


@pytest.mark.parametrize("transport", ["twilio", "native"])
async def test_a_call_that_fails_to_start_inside_the_gateway_is_an_internal_error(
        server, runtime, monkeypatch, caplog, transport):
    """Review (stop 64): an exception at `start` that is no protocol error (here from
    `new_call`) went past the session: the socket closed with the default 1000, as a call
    ended normally, with nothing logged by the gateway nor counted. It is what a call that
    fails inside the gateway is: logged with its traceback, counted `internal_error`,
    told so (native), and closed 1011, on both transports alike."""
    def broken(*args: Any, **kwargs: Any) -> Call:
        raise RuntimeError("the call could not be built")

    monkeypatch.setattr(server.app.state.services, "new_call", broken)
    caplog.set_level(logging.INFO)
    before = runtime.stats.errors["internal_error"]
    active = runtime.stats.active_calls
    received: list[Any] = []
    if transport == "twilio":
        url, start = stream_url(server), TwilioLine(stream_url(server)).start_message()
    else:
        url, start = server.base_url.replace("http://", "ws://") + "/v1/call", {
            "type": "start", "sample_rate": 16000}
    async with connect(url) as ws:
        await ws.send(json.dumps(start))
        with pytest.raises(Exception):
            while True:
                received.append(await asyncio.wait_for(ws.recv(), 10))
    assert ws.close_code == 1011
    assert runtime.stats.errors["internal_error"] == before + 1
    assert runtime.stats.active_calls == active  # its slot is freed
    failed = [r for r in caplog.records if r.name.startswith("voicegate")
              and r.levelno >= logging.ERROR]
    assert failed and failed[0].exc_info and "could not be built" in str(failed[0].exc_info[1])
    if transport == "native":
        assert [json.loads(m)["code"] for m in received] == ["internal_error"]


async def test_an_event_loop_stall_does_not_make_a_live_stream_look_dead():
    """Review (stop 64): the watch judged the silence from the session's clock alone. An
    event-loop stall of a timeout or more (5 s) stalls the receive loop as long,
    and the watch's overdue wake may run before the receive loop has counted the `media`
    queued meanwhile: every Twilio call on the replica was closed `twilio_no_media`,
    though the audio rate limit tolerates an 8 s stall. A stall is the loop's time, not
    the line's: only the receive side's progress over the watch's own wakes counts."""
    clock = ManualClock()
    frames = [0]
    dead: list[float] = []
    watch = asyncio.create_task(MediaWatch(clock, 5.0, lambda: frames[0], dead.append).run())
    for _ in range(25):  # 5 s of the line's frames, 20 ms each, counted as they come
        frames[0] += 10
        await clock.advance(0.2)  # the watch wakes at 1.25, 2.5, 3.75, 5 s: alive
    # Right after that wake the loop stalls for 6 s (the rate limit tolerates 8): nothing
    # runs, time passes, the line's frames queue unread.
    clock._now += 6.0  # type: ignore[attr-defined]
    await clock.advance(0)  # the watch's wake is overdue: it runs first
    frames[0] += 300  # then the receive loop counts the 6 s of queued media
    for _ in range(30):  # and the line goes on
        await clock.advance(0.2)
        frames[0] += 10
    assert dead == [] and not watch.done(), f"a live stream declared dead: {dead}"
    await clock.advance(5.0)  # then it really stops: still noticed within 1.25 timeouts
    assert dead == []
    await clock.advance(1.25)
    assert watch.done() and len(dead) == 1 and 5.0 <= dead[0] <= 6.25, dead


async def test_a_hang_up_on_a_stream_whose_media_stopped_leaves_the_call_to_be_resumed():
    """Review (stop 69): the idle goodbye (or the time limit) hung a call up through the
    REST API whatever its stream's state. A stream whose `media` stopped (a half-open
    connection: Twilio sends one every 20 ms) is dead, and its watch closes it without
    hanging up so that Twilio resumes the call; but the silence the idle watch counted may
    be that dead line's (the caller's "yes" after the prompt never arrived), and the
    goodbye came first whenever the count had begun before the stream died: the REST
    hang-up then dropped a call Twilio was resuming, or would have. A hang-up on a stream
    with no `media` since its watch last looked now leaves the call as the watch does: no
    REST request, no "ended" record (so `/twilio/stream-ended` resumes it), logged
    `twilio_hangup_skipped_no_media`. A live line is hung up as before."""
    from gateway.transports.twilio_ended import HUNG_UP, EndedCalls

    class Control:
        api_url = "https://api.twilio.com"

        def __init__(self) -> None:
            self.hung_up: list[str] = []

        async def hang_up(self, account_sid: str, call_sid: str) -> None:
            self.hung_up.append(call_sid)

    clock = ManualClock()
    frames = [0]
    watch = MediaWatch(clock, 5.0, lambda: frames[0], lambda silent: None)
    task = asyncio.create_task(watch.run())
    control, ended = Control(), EndedCalls(clock)

    def output(call_sid: str) -> TwilioOutput:
        return TwilioOutput(SentMessages(), "MZ1", call_sid, control=control,  # type: ignore[arg-type]
                            account_sid="AC1", call_sid=call_sid, ended=ended,
                            line_silent_s=lambda: watch.silent_s)

    for _ in range(15):  # 3 s of the line's frames: alive
        frames[0] += 10
        await clock.advance(0.2)
    await output("CA1").hang_up("idle")
    assert control.hung_up == ["CA1"] and await ended.ended("CA1") == HUNG_UP
    await clock.advance(2.2)  # then no media: the watch's look at 5 s finds none since 3.75
    await output("CA2").hang_up("idle")
    assert control.hung_up == ["CA1"] and await ended.ended("CA2") is None
    task.cancel()
