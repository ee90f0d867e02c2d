import json

import pytest

from gateway.protocol import (CLOSE_INVALID_PAYLOAD, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED_DATA,
                              ProtocolError, StartMessage, StopMessage, TextMessage,
                              check_audio_frame, parse_text_frame)

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
    raw = json.dumps({"type": "text", "text": "é" * (MAX // 2)})
    assert code_of(raw) == ("frame_too_large", CLOSE_TOO_BIG)


def test_audio_frame_checks():
    check_audio_frame(b"\x00" * 640, MAX)
    with pytest.raises(ProtocolError) as odd:
        check_audio_frame(b"\x00" * 641, MAX)
    assert (odd.value.code, odd.value.close_code) == ("odd_pcm_length", CLOSE_INVALID_PAYLOAD)
    with pytest.raises(ProtocolError) as big:
        check_audio_frame(b"\x00" * (MAX + 2), MAX)
    assert (big.value.code, big.value.close_code) == ("frame_too_large", CLOSE_TOO_BIG)
