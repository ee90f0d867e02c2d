import json

import pytest

from gateway.protocol import (CLOSE_POLICY, CLOSE_TOO_BIG,
                              CLOSE_UNSUPPORTED_DATA, ProtocolError, StartMessage, StopMessage,
                              TextMessage, check_audio_frame, check_frame_size,
                              parse_text_frame)

MAX = 64 * 1024


def code_of(raw: str) -> tuple[str, int | None]:
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(raw, MAX)
    return info.value.code, info.value.close_code


def test_valid_messages():
    start = parse_text_frame(json.dumps({"type": "start", "sample_rate": 8000,
                                         "metadata": {"caller": "+1555"}}), MAX)
    assert start == StartMessage(sample_rate=8000, encoding="pcm16", metadata={"caller": "+1555"})
    assert parse_text_frame('{"type": "text", "text": "hi", "final": false}', MAX) == \
        TextMessage("hi", False)
    assert parse_text_frame('{"type": "stop"}', MAX) == StopMessage()


@pytest.mark.parametrize("raw, code, close", [
    ("not json", "invalid_json", None),
    ("[1, 2]", "invalid_message", None),
    ('{"text": "x"}', "invalid_message", None),
    ('{"type": "dance"}', "unknown_message_type", None),
    ('{"type": "text", "text": 5}', "invalid_message", None),
    ('{"type": "text", "text": "x", "final": "yes"}', "invalid_message", None),
    ('{"type": "start", "sample_rate": 11025}', "unsupported_sample_rate", CLOSE_UNSUPPORTED_DATA),
    ('{"type": "start", "sample_rate": 16000, "encoding": "opus"}', "unsupported_encoding",
     CLOSE_UNSUPPORTED_DATA),
])
def test_bad_text_frames(raw, code, close):
    assert code_of(raw) == (code, close)


def test_oversized_text_counts_utf8_bytes():
    # Before `start` (no call to keep: it may be the `start` itself) an oversized text
    # closes 1009; a running call's is dropped and the call goes on (stop 62, below).
    raw = json.dumps({"type": "text", "text": "é" * (MAX // 2)})
    assert code_of(raw) == ("frame_too_large", CLOSE_TOO_BIG)
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(raw, MAX, started=True)
    assert (info.value.code, info.value.close_code) == ("frame_too_large", None)


def test_audio_frame_checks():
    """A started call's frame checks. Since stop 62 neither an odd length (`odd_pcm_length`,
    was closed 1007) nor an oversized frame (`frame_too_large`, was closed 1009) closes the
    call: the frame, read whole, is dropped (the next one starts on a sample boundary), as an
    empty one is. Before `start` an oversized frame still closes 1009 (check_frame_size)."""
    check_audio_frame(b"\x00" * 640, MAX)
    with pytest.raises(ProtocolError) as odd:
        check_audio_frame(b"\x00" * 641, MAX)
    assert (odd.value.code, odd.value.close_code) == ("odd_pcm_length", None)
    with pytest.raises(ProtocolError) as big:
        check_audio_frame(b"\x00" * (MAX + 2), MAX)
    assert (big.value.code, big.value.close_code) == ("frame_too_large", None)
    with pytest.raises(ProtocolError) as empty:
        check_audio_frame(b"", MAX)
    assert (empty.value.code, empty.value.close_code) == ("empty_audio_frame", None)
    with pytest.raises(ProtocolError) as before:
        check_frame_size(b"\x00" * (MAX + 2), MAX)
    assert (before.value.code, before.value.close_code) == ("frame_too_large", CLOSE_TOO_BIG)


@pytest.mark.parametrize("kind, shown", [
    ("dial", '"dial"'), ("it's", '"it\'s"'), ('say "hi"', '"say \\"hi\\""'),
    ("", '""'), ("x" * 500, '"' + "x" * 40),
])
def test_an_unknown_message_type_is_quoted_as_json_not_a_python_repr(kind, shown):
    """Review (stop 62): `unknown_message_type` quoted the type with Python's repr: `{"type":
    "dial"}` came back as "unknown message type 'dial'" (single quotes, which JSON has not;
    "it's" in double quotes, a quote inside as \\' ), unlike the other refusals, which show
    what was received as JSON writes it since stop 62 (`as_json`). A long type is cut short."""
    for started in (False, True):
        with pytest.raises(ProtocolError) as info:
            parse_text_frame(json.dumps({"type": kind}), MAX, started=started)
        message = info.value.message
        assert (info.value.code, info.value.close_code) == ("unknown_message_type", None)
        assert f"unknown message type {shown}" in message, message
        assert "'dial'" not in message and len(message) < 160, message


def test_an_unsupported_sample_rate_is_not_echoed_whole():
    """Review (stop 62): an out-of-list `sample_rate` was echoed in full in its error: an
    integer of up to 4,300 digits (what Python converts) made a 4 KB error event and
    `bad_input` log line. It is cut short, as other values received are; the rates
    supported are still listed, and an ordinary wrong rate is still shown whole."""
    huge = int("9" * 4300)
    with pytest.raises(ProtocolError) as info:
        parse_text_frame('{"type": "start", "sample_rate": ' + str(huge) + "}", MAX)
    message = info.value.message
    assert (info.value.code, info.value.close_code) == ("unsupported_sample_rate",
                                                        CLOSE_UNSUPPORTED_DATA)
    assert len(message) < 200 and "99999" in message and "16000" in message, message
    with pytest.raises(ProtocolError) as ordinary:
        parse_text_frame('{"type": "start", "sample_rate": 11025}', MAX)
    assert "sample rate 11025 Hz" in ordinary.value.message


@pytest.mark.parametrize("channels", [2, 0, -1, "stereo", 1.5, True, None])
def test_a_start_that_is_not_mono_is_refused_by_name(channels):
    """Review (stop 60): binary frames are mono, but a `start` saying `"channels": 2` was
    accepted without a word: its interleaved stereo was heard as mono at twice the rate
    (garbled, then closed as `audio_too_fast`, "stream it at the pace it is spoken", which
    names the wrong fault). The Twilio stream refuses a `channels` other than 1; so must
    the native `start`, naming the field and what is allowed."""
    raw = json.dumps({"type": "start", "sample_rate": 16000, "channels": channels})
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(raw, MAX)
    assert (info.value.code, info.value.close_code) == ("unsupported_channels",
                                                        CLOSE_UNSUPPORTED_DATA)
    assert "`channels`" in info.value.message and "1" in info.value.message


def test_a_mono_start_may_say_so():
    raw = json.dumps({"type": "start", "sample_rate": 16000, "channels": 1})
    assert parse_text_frame(raw, MAX) == StartMessage(sample_rate=16000)


@pytest.mark.parametrize("kind", [5, ["start"], None, True, {"name": "start"}, 1.5])
def test_a_type_that_is_not_a_string_is_an_invalid_message_by_name(kind):
    """Review (stop 61): `{"type": 5}` or `{"type": ["start"]}` got `unknown_message_type`,
    "unknown message type '5'" (or Python's repr of the list), the same answer as the string
    "5": the client is told its type is unknown when it sent no type name at all, and
    `{"type": null}` was told the message "has no `type` field" though it had one.
    docs/protocol.md gives `invalid_message` for wrong field types; the message must say
    that `type` must be a string, and the call stays open as for any malformed message."""
    raw = json.dumps({"type": kind, "sample_rate": 16000})
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(raw, MAX)
    assert (info.value.code, info.value.close_code) == ("invalid_message", None)
    assert "`type` must be a string" in info.value.message, info.value.message
    with pytest.raises(ProtocolError) as started:  # a running call: the same, not already_started
        parse_text_frame(raw, MAX, started=True)
    assert (started.value.code, started.value.close_code) == ("invalid_message", None)


def test_a_message_without_type_still_says_so():
    assert code_of('{"text": "x"}') == ("invalid_message", None)
    with pytest.raises(ProtocolError) as info:
        parse_text_frame('{"text": "x"}', MAX)
    assert "no `type` field" in info.value.message


@pytest.mark.parametrize("raw, named", [
    ('{"type": "text", "text": "hi", "final": false, "final": true}', '"final"'),
    ('{"type": "stop", "type": "start", "sample_rate": 16000}', '"type"'),
    ('{"type": "start", "sample_rate": 16000, "metadata": {"a": 1, "a": 2}}', '"a"'),
    ('{"type": "start", "sample_rate": 16000, "metadata": {"score": NaN}}', "NaN"),
    ('{"type": "start", "sample_rate": 16000, "metadata": {"limit": Infinity}}', "Infinity"),
    ('{"type": "start", "sample_rate": 16000, "metadata": {"limit": -Infinity}}', "-Infinity"),
    ('{"type": "start", "sample_rate": 16000, "metadata": {"limit": 1e999}}', "1e999"),
], ids=["dup-final", "dup-type", "dup-nested", "nan", "inf", "minus-inf", "1e999"])
def test_json_that_parsers_read_differently_is_invalid_json_by_name(raw, named):
    """Review (stop 62): json.loads takes what RFC 8259 does not: NaN, Infinity and
    -Infinity (no JSON numbers), a number past a double's range (1e999, read as inf), and
    an object with the same key twice (the last one silently wins: `"final": false,
    "final": true` was a final, `"type": "stop", "type": "start"` a start). Each was
    accepted without a word (a NaN in `metadata` reached the call's log line as NaN); a
    strict parser, a proxy or a client library reads such a message differently, or not at
    all. docs/protocol.md promises `invalid_json` for a text frame that is not JSON; the
    error names the key or the number, and the call stays open."""
    for started in (False, True):
        with pytest.raises(ProtocolError) as info:
            parse_text_frame(raw, MAX, started=started)
        assert (info.value.code, info.value.close_code) == ("invalid_json", None)
        assert named in info.value.message, info.value.message


def test_ordinary_numbers_and_distinct_keys_still_parse():
    raw = json.dumps({"type": "start", "sample_rate": 16000,
                      "metadata": {"score": 0.25, "big": 1e300, "n": -3, "a": {"a": 1}}})
    assert parse_text_frame(raw, MAX).metadata == {"score": 0.25, "big": 1e300, "n": -3,
                                                   "a": {"a": 1}}


@pytest.mark.parametrize("message, field, close", [
    ({"type": "start", "sample_rate": 8000, "encodng": "mulaw"}, "encodng", CLOSE_POLICY),
    ({"type": "start", "sample_rate": 16000, "channel": 2}, "channel", CLOSE_POLICY),
    ({"type": "start", "sampleRate": 16000}, "sampleRate", CLOSE_POLICY),
    ({"type": "text", "text": "hi", "fnal": False}, "fnal", None),
    ({"type": "dtmf", "digit": "5", "duration_ms": 100}, "duration_ms", None),
], ids=["start-encodng", "start-channel", "start-sampleRate", "text-fnal", "dtmf-extra"])
def test_a_field_the_message_does_not_have_is_refused_by_name(message, field, close):
    """Review (stop 62): fields a message does not have were ignored without a word. A
    typo is then silent and costly: `"encodng": "mulaw"` started a call that heard its
    μ-law bytes as pcm16 (noise), `"channel": 2` interleaved stereo as mono at twice the
    rate (the fault stop 60's `unsupported_channels` names, missed by one letter), `"fnal":
    false` ended the caller's turn on a partial. Such a message is `invalid_message` naming
    the field and the fields the message has: a `start` is closed 1008 as any malformed
    `start`, the rest are dropped and the call goes on. (`metadata` holds anything.)"""
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(json.dumps(message), MAX)
    assert (info.value.code, info.value.close_code) == ("invalid_message", close)
    assert f'"{field}"' in info.value.message, info.value.message
    assert message["type"] in info.value.message


def test_a_stop_is_taken_whatever_else_it_carries() -> None:
    """A `stop` with a field it does not have (a newer client's reason) still ends the call:
    refused, it would keep open a call its client wants ended."""
    assert parse_text_frame(json.dumps({"type": "stop", "reason": "done"}), MAX) == StopMessage()


@pytest.mark.parametrize("fields, shown", [
    ({"encoding": None}, "encoding null"),
    ({"encoding": True}, "encoding true"),
    ({"encoding": ["pcm16"]}, "encoding a list"),
    ({"encoding": {"name": "pcm16"}}, "encoding an object"),
    ({"encoding": "PCM16"}, 'encoding "PCM16"'),
    ({"channels": None}, "`channels` null"),
    ({"channels": True}, "`channels` true"),
    ({"channels": "stereo"}, '`channels` "stereo"'),
    ({"channels": [1]}, "`channels` a list"),
    ({"channels": 2}, "`channels` 2"),
])
def test_an_unsupported_encoding_or_channels_is_shown_as_json_not_a_python_repr(fields, shown):
    """Review (stop 62): `unsupported_encoding` and `unsupported_channels` wrote the value
    received with Python's str/repr: `"encoding": null` came back as "encoding 'None'",
    `true` as True, a list as "['pcm16']" (single quotes), the string "stereo" without
    quotes: a JavaScript client is told of values it never sent. The Twilio stream's
    media-format refusal was fixed for the same (stop 62); the native `start` now shows the
    value as JSON writes it, a list or object by its kind."""
    with pytest.raises(ProtocolError) as info:
        parse_text_frame(json.dumps({"type": "start", "sample_rate": 16000, **fields}), MAX)
    message = info.value.message
    assert info.value.close_code == CLOSE_UNSUPPORTED_DATA
    assert shown in message, message
    assert "'" not in message and "None" not in message and "True" not in message, message
