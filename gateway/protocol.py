"""The native wire protocol: message parsing, validation and error codes.

docs/protocol.md is the human-readable version of this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .settings import SUPPORTED_SAMPLE_RATES

# WebSocket close codes (RFC 6455 section 7.4.1, plus IANA-registered 1012/1013).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

SUPPORTED_ENCODINGS = ("pcm16",)


class ProtocolError(Exception):
    """A client sent something the protocol does not allow.

    ``close_code`` is None when the call can go on after the error event.
    """

    def __init__(self, code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code

    def event(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


@dataclass(frozen=True)
class StartMessage:
    sample_rate: int
    encoding: str = "pcm16"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextMessage:
    text: str
    final: bool


@dataclass(frozen=True)
class StopMessage:
    pass


@dataclass(frozen=True)
class DtmfMessage:
    digit: str  # one keypad key: 0-9, * or #


ClientMessage = StartMessage | TextMessage | StopMessage | DtmfMessage

# Keys of a telephone keypad (the same set Twilio's `dtmf` events carry).
DTMF_KEYS = frozenset("0123456789*#")


def parse_dtmf_digit(digit: Any, code: str) -> str:
    """One keypad key, or a ProtocolError ``code`` saying what is allowed (the call goes on).

    The error says what kind of value came, never the value: it is logged (``bad_input``),
    and keys sent together in one message ("4921") may be the caller's PIN."""
    if not isinstance(digit, str) or digit not in DTMF_KEYS:
        raise ProtocolError(code, f"`digit` is not a keypad key ({json_kind(digit)}); send one "
                                  "of 0-9, * or # per message, as a string")
    return digit


def json_kind(value: Any) -> str:
    """What ``value`` is, without what it holds."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if len(value) != 1 else "another character"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null or missing"
    return "a list" if isinstance(value, list) else "an object"


def present_kind(value: Any) -> str:
    """What a JSON value given with the wrong type is (``json_kind``; null is given)."""
    return "null" if value is None else json_kind(value)


def unnamed(data: dict[str, Any], field: str, names: str) -> str:
    """Why a message whose ``field`` (the name of its kind: native `type`, Twilio's `event`)
    is not a string names no kind: absent, or of another JSON type (never "unknown": no
    name was sent at all). ``names``: the kinds there are, for the error."""
    if field not in data:
        return f"message has no `{field}` field"
    return f"`{field}` must be a string: {names} (this one is {present_kind(data[field])})"


class _NotJson(ValueError):
    """What json.loads takes and RFC 8259 JSON is not (or parsers read differently)."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"message is not JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: json.loads reads inf
        raise _NotJson(f"message is not JSON a parser can read: number {text[:24]} is past "
                       "a double's range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):  # the last would silently win; other parsers take the first
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotJson(f"message gives the key {json.dumps(key)[:40]} twice in one "
                               "object (JSON parsers differ on which one counts)")
            seen.add(key)
    return data


# One decoder for every message (json.loads with hooks would build one per call).
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_keys)


def parse_json(raw: str, code: str, strict: bool = False) -> Any:
    """``json.loads`` whose every failure is a ProtocolError ``code`` (the call goes on).

    Besides syntax errors: nesting deeper than the parser's recursion limit
    (RecursionError) and integers longer than Python converts (ValueError). ``strict``
    (the native protocol): also what json.loads takes but RFC 8259 does not, or parsers
    read differently: NaN, Infinity, numbers past a double's range (1e999) and an object
    with a key given twice. (Twilio's stream reads its `start` leniently: a `mediaFormat`
    rate of 1e999 is refused by name there, 1003, not left to the start timeout.)
    """
    try:
        data = _STRICT.decode(raw) if strict else json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProtocolError(code, f"message is not JSON: {exc.msg} at position {exc.pos}"
                            ) from None
    except _NotJson as exc:
        raise ProtocolError(code, str(exc)) from None
    except RecursionError:
        raise ProtocolError(code, "message is nested too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ProtocolError(code, f"message cannot be parsed: {str(exc)[:120]}") from None
    # Only an escape can make one (the frame itself was UTF-8): audio frames skip the walk.
    if "\\u" in raw and has_lone_surrogate(data):
        raise ProtocolError(code, LONE_SURROGATE)
    return data


LONE_SURROGATE = ("a string holds a lone UTF-16 surrogate (an escape \\ud800-\\udfff without "
                  "its pair): text must be valid Unicode")


def has_lone_surrogate(value: Any) -> bool:
    """Whether parsed JSON holds a string (or key) that is not valid Unicode: JSON lets
    ``"\\ud800"`` through, and such a string breaks whatever encodes it later (a tokenizer,
    a log line, a UTF-8 file), far from the client that sent it."""
    todo = [value]
    while todo:  # iterative: as deep as the parser went, without recursion
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def utf8_bytes_over(raw: str, max_bytes: int) -> int | None:
    """The UTF-8 size of ``raw`` when it exceeds ``max_bytes``, else None. A character is 1-4
    bytes: encode only when the length alone cannot decide (never for a short message)."""
    if len(raw) > max_bytes or len(raw) * 4 > max_bytes:
        size = len(raw.encode("utf-8", "surrogatepass"))
        return size if size > max_bytes else None
    return None


def parse_text_frame(raw: str, max_bytes: int, *, started: bool = False) -> ClientMessage:
    """One text message of the native protocol. ``started``: the call is running, so a
    `start` is ``already_started`` whatever its fields (ignored; the call stays open), and
    a message over ``max_bytes`` is dropped, not closed (``too_large``)."""
    size = utf8_bytes_over(raw, max_bytes)
    if size is not None:
        raise too_large("text message", size, max_bytes, started)
    data = parse_json(raw, "invalid_json", strict=True)
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", "a message must be a JSON object")
    kind = data.get("type")
    if kind == "start":
        if started:
            # Said whole: a client changing rate mid-call would stream on at the new one.
            raise ProtocolError("already_started",
                                "this call has already started: a second `start` is ignored "
                                "whatever it asks; the call keeps its sample_rate and "
                                "encoding (to change them, end it and start a new call)")
        _check_fields(data, kind, CLOSE_POLICY)
        return _parse_start(data)
    if isinstance(kind, str) and kind in FIELDS:
        _check_fields(data, kind, None)
    if kind == "text":
        text = data.get("text")
        if not isinstance(text, str):
            raise ProtocolError("invalid_message", "`text` message needs a string field `text`")
        final = data.get("final", True)
        if not isinstance(final, bool):
            raise ProtocolError("invalid_message", "`final` must be true or false")
        return TextMessage(text=text, final=final)
    if kind == "stop":
        return StopMessage()
    if kind == "dtmf":
        return DtmfMessage(parse_dtmf_digit(data.get("digit"), "invalid_dtmf"))
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", unnamed(data, "type", "start, text, dtmf or stop"))
    raise ProtocolError("unknown_message_type",
                        f"unknown message type {as_json(kind, 64)}; expected start, text, "
                        "dtmf or stop")


# The fields of each message. Any other is refused by name: a typo ignored is silent and
# costly (`"encodng": "mulaw"` heard as pcm16, `"fnal": false` a final). `metadata` holds
# anything the client wants. A `stop` is taken whatever else it carries: refused, it would
# keep open a call its client wants ended.
FIELDS = {"start": ("type", "sample_rate", "encoding", "channels", "metadata"),
          "text": ("type", "text", "final"), "dtmf": ("type", "digit")}


def _check_fields(data: dict[str, Any], kind: str, close_code: int | None) -> None:
    unknown = [key for key in data if key not in FIELDS[kind]]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ProtocolError("invalid_message",
                            f"`{kind}` has no field {as_json(unknown[0], 40)}{more}; its "
                            f"fields are {', '.join(FIELDS[kind])}", close_code)


def as_json(value: Any, limit: int) -> str:
    """A value received, as JSON writes it (cut short, a string's quote closed), a list or
    object by its kind: never Python's repr (None, True, single quotes). For error messages
    of both transports."""
    if isinstance(value, (list, dict)):
        return json_kind(value)
    text = json.dumps(value, ensure_ascii=False)  # 1e999 is Infinity
    if len(text) <= limit:
        return text
    return text[:limit - 3] + ('..."' if isinstance(value, str) else "...")


def _parse_start(data: dict[str, Any]) -> StartMessage:
    rate = data.get("sample_rate")
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise ProtocolError("invalid_message", "`start` needs an integer `sample_rate`",
                            CLOSE_POLICY)
    if rate not in SUPPORTED_SAMPLE_RATES:
        raise ProtocolError("unsupported_sample_rate",
                            f"sample rate {as_json(rate, 24)} Hz is not supported; use one of "
                            f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))}",
                            CLOSE_UNSUPPORTED_DATA)
    encoding = data.get("encoding", "pcm16")
    if encoding not in SUPPORTED_ENCODINGS:
        raise ProtocolError("unsupported_encoding",
                            f"encoding {as_json(encoding, 32)} is not supported; use pcm16 "
                            "(16-bit little-endian mono)", CLOSE_UNSUPPORTED_DATA)
    # Frames are mono: a stereo client's interleaved samples would be heard as mono at
    # twice the rate (garbled, then `audio_too_fast`, which names the wrong fault).
    channels = data.get("channels", 1)
    if channels != 1 or isinstance(channels, bool) or not isinstance(channels, int):
        raise ProtocolError("unsupported_channels",
                            f"`channels` {as_json(channels, 32)} is not supported; audio is "
                            "mono: send 1 (or leave it out)", CLOSE_UNSUPPORTED_DATA)
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ProtocolError("invalid_message", "`metadata` must be a JSON object", CLOSE_POLICY)
    return StartMessage(sample_rate=rate, encoding=encoding, metadata=metadata)


def too_large(what: str, size: int, max_bytes: int, started: bool) -> ProtocolError:
    """``frame_too_large``. The message was read whole (the WebSocket layer closes 1009
    itself past ``ws_max_size``): a running call drops it and goes on (the bad-message
    limits, by count and by bytes, stop a flood of them). Before `start` there is no call to
    keep, and a text may be the `start` itself: closed 1009, not left to wait for the start
    timeout. An oversized message is never parsed (what the limit guards against), so a
    text one is dropped whatever its type: a `stop` too, which then ends nothing (the
    message says so; docs/protocol.md: a `stop` must fit the limit)."""
    if started:
        dropped = "dropped unread (whatever its type, a `stop` too)" if what.startswith(
            "text") else "dropped"
        return ProtocolError("frame_too_large", f"{what} of {size} bytes exceeds {max_bytes} "
                                                f"bytes: {dropped}, the call goes on")
    return ProtocolError("frame_too_large", f"{what} of {size} bytes exceeds {max_bytes} bytes",
                         CLOSE_TOO_BIG)


def check_frame_size(frame: bytes, max_bytes: int, *, started: bool = False) -> None:
    if len(frame) > max_bytes:
        raise too_large("audio frame", len(frame), max_bytes, started)


def check_audio_frame(frame: bytes, max_bytes: int) -> None:
    """A started call's binary frame: each refusal drops the frame and the call goes on."""
    check_frame_size(frame, max_bytes, started=True)
    if not frame:  # nothing to hear, and free for the rate limit: refused, counted
        raise ProtocolError("empty_audio_frame", "a binary frame holds no audio; send whole "
                                                 "16-bit samples (20 ms recommended)")
    # Each frame is whole samples on its own: dropped, the next one starts on a sample
    # boundary, so the audio stays aligned (a hang-up over a few bytes would be worse).
    if len(frame) % 2:
        raise ProtocolError("odd_pcm_length",
                            f"audio frame of {len(frame)} bytes is not whole 16-bit samples "
                            "(2 bytes each): dropped, the call goes on")
