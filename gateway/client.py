"""A native-protocol caller: streams audio in real time and collects what comes back.

Used by ``voicegate call``, the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from .audio import frame_bytes
from .providers.rate_limits import retry_after_s

EventHook = Callable[[dict[str, Any]], None]
# How long a line found down waits for the reader to take the gateway's last messages.
_CLOSING_S = 1.0


class MessageRefused(ValueError):
    """The gateway refused a message the client sent (its `error` with no turn, the call
    going on): ``code`` and ``message`` are the gateway's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"the gateway refused the message: {code}: {message}")
        self.code = code
        self.message = message


class CallClosed(ConnectionError):
    """The connection closed before what was waited for. ``close_code``: its WebSocket
    close code (1006: lost, no close frame; None: none known); ``error``: the code of the
    gateway's last `error` outside a turn, when that is its last word (too_many_calls and
    draining, 1013, are worth a retry; unsupported_sample_rate, 1003, is not), and
    ``hangup`` the reason of its `hangup` (idle, time_limit) when the bot ended the call;
    None when it said neither. The message says the same in words."""

    def __init__(self, message: str, close_code: int | None, error: str | None = None,
                 hangup: str | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.error = error
        self.hangup = hangup


class CallRefused(ConnectionError, InvalidStatus):
    """The gateway refused the call at its WebSocket upgrade, with an HTTP ``status``
    (docs/protocol.md): 403, the call token missing or wrong; 503, a replica still loading
    (``not_ready``), shutting down (``draining``) or ``overloaded``, worth a retry, on
    another replica or after ``retry_after_s`` (its Retry-After; None: none). ``error`` and
    ``message`` are the gateway's own (its JSON body's; None when it gave none: its 403
    has no body, a proxy's page is not its word). The message says the same in words.
    Still websockets' ``InvalidStatus`` (its ``response``), which was raised before."""

    def __init__(self, response: Response) -> None:
        said = _refusal(response.body)
        self.status = response.status_code
        self.error = said.get("error")
        self.message = said.get("message")
        self.retry_after_s = _retry_after(response.headers)
        why = f"{self.error}: {self.message}" if self.error else _REFUSALS.get(self.status)
        ConnectionError.__init__(self, f"the gateway refused the call (HTTP {self.status})"
                                       + (f": {why}" if why else ""))
        self.response = response


# Why a status refuses a call when the gateway's body does not say (docs/protocol.md).
_REFUSALS = {403: "it takes calls that carry its call token (VOICEGATE_CALL_TOKEN), and this "
                  "one carried none or another",
             503: "it is still loading, shutting down or overloaded; try again"}


def _retry_after(headers: Headers) -> float | None:
    """The refusal's Retry-After in seconds; None when absent, unreadable or given twice (a
    proxy's beside the gateway's: no one wait, as the provider adapters read it). websockets'
    Headers raises MultipleValuesError on a name given twice: not a refusal's exception."""
    try:
        return retry_after_s(headers)
    except MultipleValuesError:
        return None


def _refusal(body: bytes | None) -> dict[str, str]:
    """The gateway's `error` and `message` in a refused upgrade's JSON body (a 503's:
    not_ready, draining, overloaded), cut short; {} when the body says none (none at all,
    or a proxy's page)."""
    try:
        said = json.loads(body or b"")
    except ValueError:
        return {}
    if not isinstance(said, dict) or not isinstance(said.get("error"), str):
        return {}
    return {"error": said["error"][:64], "message": str(said.get("message", ""))[:300]}


class NoReply(TimeoutError):
    """``say()``'s utterance got no reply: the gateway heard no words in it (no transcript
    came, or only turns that ended empty: noise), or its reply did not end within the
    timeout. ``result`` is what came of it meanwhile (the words heard, a reply begun), as
    a reply's TurnResult holds it, with no turn (``number`` 0)."""

    def __init__(self, message: str, result: "TurnResult") -> None:
        super().__init__(message)
        self.result = result


# The codes of a text message the gateway dropped (docs/protocol.md, "Errors"): no turn
# follows it, so a wait for its turn would only end at its timeout.
TEXT_REFUSALS = frozenset({"invalid_json", "invalid_message", "unknown_message_type",
                           "not_started", "frame_too_large", "too_many_messages"})


@dataclass
class TurnResult:
    number: int
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)

    def first(self, kind: str, **match: Any) -> dict[str, Any] | None:
        for event in self.events:
            if event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                return event
        return None

    @property
    def transcript(self) -> str | None:
        event = self.first("transcript", final=True)
        return event["text"] if event else None

    @property
    def metrics(self) -> dict[str, Any] | None:
        """This result's turn's (``number``) metrics: not those of a turn that ended before
        it in the same wait (noise, words cut off and continued, words a text superseded)."""
        return next((e for e in self.events if e.get("type") == "turn_metrics"
                     and e.get("turn") == self.number and _asked(e)), None)


class Caller:
    """One call to a voicegate server over the native protocol."""

    def __init__(self, url: str, sample_rate: int = 16000, frame_ms: int = 20,
                 on_event: EventHook | None = None, metadata: dict[str, Any] | None = None,
                 token: str | None = None, on_audio: Callable[[bytes], None] | None = None,
                 keep_audio: bool = True, line_noise: bytes = b""):
        """``keep_audio=False``: reply audio goes to ``on_audio`` only, never kept (a load
        generator's hundreds of callers would otherwise hold gigabytes of it).
        ``line_noise``: what the line carries between utterances, looped (pcm16 at the
        call's rate; empty: digital silence).

        ``frame_ms`` is the line's own (the gateway never sees it): one that is not a whole
        number of milliseconds above 0 is refused here (ValueError), not left to stop the
        line at its first frame, every wait for the audio to go out then waiting for ever."""
        if not isinstance(frame_ms, int) or isinstance(frame_ms, bool) or frame_ms <= 0:
            raise ValueError(f"frame_ms must be a whole number of milliseconds above 0 (20 "
                             f"recommended), not {frame_ms!r}")
        self.url = url
        self.token = token  # sent as `Authorization: Bearer` (VOICEGATE_CALL_TOKEN)
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.metadata = metadata or {}
        self._on_event = on_event
        self._on_audio = on_audio  # every reply frame as it arrives (benchmarks time them)
        self._keep_audio = keep_audio
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._line_noise = line_noise
        self._new_call()

    def _new_call(self) -> None:
        """The state of one call, fresh at each ``connect``: nothing of the last call's (its
        `ready`, its events, its line) passes for the new one's."""
        self.events: list[dict[str, Any]] = []
        self.audio = bytearray()  # all reply audio received, in order
        self.closed_code: int | None = None
        self.ready: dict[str, Any] | None = None
        self._read_error: Exception | None = None  # what stopped the reader, if not a close
        self._new_event = asyncio.Event()
        self._turn_audio: dict[int, bytearray] = {}
        self._current_turn = 0
        self._speech = bytearray()  # caller audio waiting to go out on the line
        self._drained = asyncio.Event()
        self._line: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Caller":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self, start: bool = True, ready_timeout: float = 30.0) -> None:
        """Open the call; with ``start``, send `start` and wait up to ``ready_timeout`` s for
        `ready` (TimeoutError naming it; ConnectionError, with the gateway's `error`, when it
        closed first). Failed or cancelled once the socket is open, it closes the socket
        and its reader before the error goes on: a program that retries leaks neither.

        A gateway that refuses the call at the upgrade (HTTP 403, 503) raises CallRefused,
        saying why. Each connect is a new call: the last one's events, audio and line are
        dropped (a call still open is refused, RuntimeError: ``close`` it first)."""
        if self._reader is not None and not self._reader.done():
            raise RuntimeError("this Caller's call is still open: close() it before "
                               "connecting again")
        if self._ws is not None:
            await self.close()  # the last call's line, if it ended without a close()
        self._new_call()
        # No permessage-deflate: audio does not compress; deflating only costs CPU.
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws = await connect(self.url, max_size=2 ** 20, compression=None,
                                     additional_headers=headers)
        except InvalidStatus as refused:  # its reason is in the response: said, as values
            raise CallRefused(refused.response) from refused
        self._reader = asyncio.create_task(self._read())
        if not start:
            return
        try:
            await self.send_json({"type": "start", "sample_rate": self.sample_rate,
                                  "encoding": "pcm16", "metadata": self.metadata})
            self.ready = await self.wait_for("ready", timeout=ready_timeout)
        except BaseException:  # a timeout, the gateway's close, a cancel (Ctrl-C)
            await self.close()
            raise

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message))

    async def send_raw(self, data: bytes | str) -> None:
        """One message; a call closed under it raises CallClosed saying why, as every wait
        does (not the WebSocket library's own exception)."""
        assert self._ws is not None
        try:
            await self._ws.send(data)
        except ConnectionClosed:
            if self._reader is not None:  # it takes what the gateway said before its close
                await asyncio.wait({self._reader}, timeout=_CLOSING_S)
            raise self._closed("the message was sent") from None

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    if self._on_audio is not None:
                        self._on_audio(message)
                    if self._keep_audio:
                        self.audio += message
                        self._turn_audio.setdefault(self._current_turn,
                                                    bytearray()).extend(message)
                    continue
                event = json.loads(message)
                if event.get("type") == "response":
                    self._current_turn = int(event.get("turn", self._current_turn))
                self.events.append(event)
                if self._on_event:
                    self._on_event(event)
                self._new_event.set()
        except ConnectionClosed:
            pass  # closed abnormally (lost, a protocol error): closed_code says how
        except Exception as exc:  # the caller's own on_event or on_audio raised (or a
            self._read_error = exc  # message was not JSON: no gateway sends one)
            # Nothing reads this call any more: end it (the gateway would only find the
            # client stuck), and say why in every wait (_closed) rather than "closed (None)".
            await self._ws.close()
        finally:
            self.closed_code = self._ws.close_code
            self._new_event.set()

    async def wait_for(self, kind: str, timeout: float = 30.0, start: int = 0,
                       where: Callable[[dict[str, Any]], bool] | None = None,
                       refused: frozenset[str] = frozenset(),
                       refused_where: Callable[[dict[str, Any]], bool] | None = None,
                       **match: Any) -> dict[str, Any]:
        """The first event of ``kind`` (matching ``match``, and ``where`` holding for it) at
        or after index ``start``. An `error` of no turn whose code is in ``refused`` (and
        ``refused_where`` holds for it: it can be the message's) before it raises
        MessageRefused: the message waited on was dropped."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[start:]:
                if (event.get("type") == kind and all(event.get(k) == v for k, v in match.items())
                        and (where is None or where(event))):
                    return event
                if (event.get("type") == "error" and "turn" not in event
                        and event.get("code") in refused
                        and (refused_where is None or refused_where(event))):
                    raise MessageRefused(str(event.get("code")), str(event.get("message")))
            if self._reader is not None and self._reader.done():
                raise self._closed(repr(kind))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind!r} event within {timeout}s")
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), remaining)
            except TimeoutError:
                pass

    def _closed(self, before: str) -> CallClosed:
        """The connection closed ``before`` what the caller waited for: its close code, and
        the gateway's own word on why when it sent one (its last `error` outside a turn, or
        its `hangup`). The code alone hides it: 1003 is any refused `start`, 1008 one of
        half a dozen limits, and the `error` before it names which."""
        code = self.closed_code if self.closed_code is not None else (
            self._ws.close_code if self._ws is not None else None)
        said = _gateway_said(self.events) or {}
        kind = said.get("type")
        error = said.get("code") if kind == "error" else None
        hangup = said.get("reason") if kind == "hangup" else None
        why = {"hangup": f"the gateway hung up ({hangup})",
               "error": f"the gateway's last error: {error}: {said.get('message')}"}.get(kind)
        if self._read_error is not None:
            why = (f"the client closed it: reading raised {self._read_error!r} (in on_event "
                   "or on_audio, or a message that is not JSON)")
            error = hangup = None  # the client's own close, not the gateway's word
        closed = CallClosed(f"connection closed ({code}) before {before}"
                            + (f"; {why}" if why else ""), code, error, hangup)
        closed.__cause__ = self._read_error
        return closed

    async def wait_for_answered_turn(self, start: int = 0, timeout: float = 30.0
                                     ) -> dict[str, Any]:
        """The first ``turn_metrics`` at or after index ``start`` of a turn that asked
        something: an empty turn's (noise heard as speech, ``empty``) are skipped."""
        return await self.wait_for("turn_metrics", timeout, start, where=_asked)

    async def stream_audio(self, pcm16: bytes) -> None:
        """Speak ``pcm16`` (at the call's rate) into the line; returns once it has been sent.

        The line is a real-time microphone: 20 ms frames at real pace, silence between
        utterances, so VAD hears pauses and turn ends as it would on a real call. No audio
        returns at once (only a frame sent of it would end the wait for the line to drain).
        A line that is down (the connection closed) raises ConnectionError: none of the
        audio, or not all of it, went out.
        """
        if not pcm16:
            return
        if self._line is None:
            self._line = asyncio.create_task(self._run_line())
        elif self._line.done():  # down since an earlier utterance: nothing would send this
            raise await self._line_down()
        self._speech += pcm16
        self._drained.clear()
        await self._drained.wait()
        if self._line.done():  # it went down under this audio, before its end went out
            raise await self._line_down()

    async def _line_down(self) -> ConnectionError:
        """The line stopped (its send failed: the connection closed). Said once the reader
        has taken what the gateway sent before its close: the `error` that says why."""
        self._speech.clear()  # never to be sent
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=_CLOSING_S)
        return self._closed("the audio was sent")

    async def _run_line(self) -> None:
        assert self._ws is not None
        size = frame_bytes(self.sample_rate, self.frame_ms)
        noise = self._line_noise[:len(self._line_noise) // size * size] or b"\x00" * size
        period = self.frame_ms / 1000.0
        started = time.perf_counter()
        i = 0
        while True:
            delay = started + i * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            if self._speech:
                frame = bytes(self._speech[:size]).ljust(size, b"\x00")
                del self._speech[:size]
                if not self._speech:
                    self._drained.set()
            else:
                at = i * size % len(noise)
                frame = noise[at:at + size]
            try:
                await self._ws.send(frame)
            except Exception:
                self._drained.set()
                return

    async def say(self, pcm16: bytes, timeout: float = 60.0,
                  nothing_heard_ms: int = 2000) -> TurnResult:
        """Speak one utterance and wait (line open, silence flowing) for the reply to finish.

        A turn the utterance's own later words cut off (the gateway answered at a pause
        mid-sentence and the caller talked on) is not the end: those words continue in a
        later turn, whose reply is waited for too, unless nothing (no event, no audio)
        comes for ``nothing_heard_ms`` after the cut turn ended (what stopped the reply
        held no words, so no turn follows). A turn under way before it began (a reply it
        talks over, ending as the utterance starts) is none of its answer (``_latest_turn``),
        nor in its result.

        No audio (``b""``) is refused (ValueError): there is nothing to hear, no turn. No
        reply raises NoReply (a TimeoutError; ``result`` holds what came): no transcript
        within ``nothing_heard_ms`` of the utterance's end, or only turns that ended empty
        (noise) and then nothing for as long (the gateway heard no words in it), or no
        answered turn within ``timeout`` s. A connection that closes before the utterance
        is answered raises ConnectionError."""
        if not pcm16:
            raise ValueError("say() needs audio: no audio is no utterance, the gateway hears "
                             "nothing to answer")
        index = len(self.events)
        earlier = _latest_turn(self.events)  # turns under way: none of them answers this
        await self.stream_audio(pcm16)
        deadline = time.monotonic() + timeout
        quiet_until = time.monotonic() + nothing_heard_ms / 1000.0
        seen, changed_at = (len(self.events), len(self.audio)), time.monotonic()
        while True:
            events = self._events_since(index, earlier)
            if utterance_answered(events):
                break
            if self._reader is not None and self._reader.done():
                # Closed before its answer: nothing more comes (say_text's wait raises too).
                raise self._closed("the utterance was answered")
            now = time.monotonic()
            if (len(self.events), len(self.audio)) != seen:
                seen, changed_at = (len(self.events), len(self.audio)), now
            quiet = now - changed_at > nothing_heard_ms / 1000.0
            if _ended_turns(events) and quiet:
                break  # the cut turn ended and nothing came of the words after it
            if now > quiet_until and not any(e.get("type") == "transcript" for e in events):
                raise NoReply("no reply: the gateway heard no words in the utterance (no "
                              f"transcript came within {nothing_heard_ms} ms of its end)",
                              self._turn_since(index, earlier))
            if quiet and (empty := _only_empty_turns(events)):
                turns = "turns" if "," in empty else "turn"
                raise NoReply("no reply: the gateway heard no words in the utterance (its "
                              f"{turns} {empty} ended empty: noise)",
                              self._turn_since(index, earlier))
            if now >= deadline:
                raise NoReply(f"no reply to the utterance within {timeout:g} s "
                              f"({_what_came(events)})", self._turn_since(index, earlier))
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), min(0.1, deadline - now))
            except TimeoutError:
                pass
        return self._turn_since(index, earlier)

    async def say_text(self, text: str, partial_words: bool = False,
                       word_interval_s: float = 0.15, timeout: float = 60.0) -> TurnResult:
        """Send a transcript and wait for its turn to end (its own: a spoken turn that ends
        first, words the text superseded or noise, is not it, nor one under way before it
        was sent: a reply it stops, ``_latest_turn``); with ``partial_words`` word by word as
        STT partials would come.

        A blank text (empty, or spaces only) is refused at once (ValueError): the gateway
        answers nothing to it (docs/protocol.md: an empty text with nothing typed before it
        says nothing), so no ``turn_metrics`` would ever come to end the wait. A text the
        gateway refuses (over 64 KiB, not valid Unicode, too many waiting) raises
        MessageRefused with its error, at once: no turn follows it either. (A refusal that
        cannot be of these messages, one sent before them refused late, is not theirs.)"""
        if not text.strip():
            raise ValueError(f"say_text() got a blank text ({text!r}): the gateway answers "
                             "nothing to an empty text (no turn, no turn_metrics); give words")
        index = len(self.events)
        earlier = _latest_turn(self.events)
        sent = _text_messages(text, partial_words)
        started = self.ready is not None
        await self._send_texts(sent, word_interval_s)
        await self.wait_for("turn_metrics", timeout=timeout, start=index,
                            where=lambda m: (int(m.get("turn", 0)) > earlier
                                             and _answers_text(m, self.events, text)),
                            refused=TEXT_REFUSALS,
                            refused_where=lambda error: _can_refuse(error, sent, started))
        return self._turn_since(index, earlier)

    async def send_transcript(self, text: str, partial_words: bool = True,
                              word_interval_s: float = 0.15) -> None:
        """The final transcript, after (``partial_words``) one partial per word at speaking pace."""
        await self._send_texts(_text_messages(text, partial_words), word_interval_s)

    async def _send_texts(self, messages: list[str], word_interval_s: float) -> None:
        """``_text_messages``' messages, the partials ``word_interval_s`` apart."""
        for message in messages[:-1]:
            await self.send_raw(message)
            await asyncio.sleep(word_interval_s)
        await self.send_raw(messages[-1])

    def _events_since(self, index: int, earlier: int) -> list[dict[str, Any]]:
        """The events since ``index`` but those of turns up to ``earlier``: under way
        before it, their late reply segments, `interrupt` and `turn_metrics` are not of
        what was said or sent at ``index``."""
        return [e for e in self.events[index:]
                if e.get("turn") is None or int(e["turn"]) > earlier]

    def _turn_since(self, index: int, earlier: int) -> TurnResult:
        """The events since ``index`` (``_events_since``); the number and audio of the
        last turn that ended."""
        events = self._events_since(index, earlier)
        number = (_ended_turns(events) or [0])[-1]
        return TurnResult(number=number, events=events,
                          audio=self._turn_audio.get(number, bytearray()))

    async def close(self) -> None:
        if self._ws is None:
            return
        if self._line is not None:
            self._line.cancel()
            await asyncio.gather(self._line, return_exceptions=True)
            self._drained.set()  # audio still going out never will: its wait raises (down)
        try:
            await self.send_json({"type": "stop"})
        except Exception:
            pass
        await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def _gateway_said(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The gateway's last word on a call it may have ended: its last `hangup`, or `error`
    that is no turn's (a turn's stage failing leaves the call open)."""
    for event in reversed(events):
        if event.get("type") == "hangup":
            return event
        if event.get("type") == "error" and "turn" not in event:
            return event
    return None


def _text_messages(text: str, partial_words: bool) -> list[str]:
    """The `text` messages of a transcript, as sent: with ``partial_words`` one partial per
    word first, then the final."""
    words = text.split() if partial_words else []
    return [json.dumps({"type": "text", "text": " ".join(words[:n]), "final": False})
            for n in range(1, len(words) + 1)] + [
        json.dumps({"type": "text", "text": text, "final": True})]


def _can_refuse(error: dict[str, Any], sent: list[str], started: bool) -> bool:
    """Whether the gateway's refusal ``error`` (a TEXT_REFUSALS code) can be of one of the
    text messages ``sent`` (as sent; ``started``: the call had started). The gateway names
    no message it refuses, and one sent before them (a malformed message, a key while too
    many wait, an audio frame or another text over the limit) is refused with the same
    codes, its error perhaps arriving once these went out: it is not theirs. What each
    refusal says tells (docs/protocol.md, "Errors")."""
    code, said = error.get("code"), str(error.get("message", ""))
    if code == "too_many_messages":  # a text's, not a key's ("keypad presses are waiting")
        return "text message" in said
    if code == "frame_too_large":  # names the size it dropped; json.dumps writes ASCII
        return any(said.startswith(f"text message of {len(message)} bytes ")
                   for message in sent)
    if code == "invalid_json":  # json.dumps writes JSON; the gateway refuses a lone surrogate
        return any(not _valid_unicode(json.loads(message)["text"]) for message in sent)
    if code == "not_started":
        return not started
    return False  # invalid_message, unknown_message_type: no message of these is either


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def utterance_answered(events: list[dict[str, Any]]) -> bool:
    """Some turn ended that the caller's own speech did not cut off for good."""
    return bool(set(_ended_turns(events)) - _cut_by_the_caller(events))


# The events that name a turn already begun (its words heard, routed, answered or ended).
# Not `keypad`: it names the turn the caller's words will end, perhaps one yet to come.
_BEGUN = frozenset({"transcript", "route", "response", "turn_metrics"})


def _latest_turn(events: list[dict[str, Any]]) -> int:
    """The latest turn ``events`` name as begun (0: none). The gateway numbers turns as it
    takes them up (a spoken one as its words end, a text as it comes), so one that words
    or a text sent after ``events`` open has a later number: those up to it were under way
    before (a reply still playing, its `turn_metrics` to come) and answer nothing sent
    after them."""
    return max((int(e["turn"]) for e in events
                if e.get("type") in _BEGUN and e.get("turn") is not None), default=0)


def _asked(metrics: dict[str, Any]) -> bool:
    """A turn's metrics, but an empty turn's (its final transcript held no words: noise, a
    cough over the reply): it ends with its metrics too, and answers nothing."""
    return not metrics.get("empty")


def _answers_text(metrics: dict[str, Any], events: list[dict[str, Any]], text: str) -> bool:
    """Whether ``metrics`` end the turn that answered the text message ``text``: its own
    (``input`` text, or not given), not a spoken turn's: words a text supersedes end their
    turn, unanswered, before the text's (docs/protocol.md), and noise heard as speech ends
    an empty one (``_asked``). Or the spoken turn the text was carried into: stopped by the
    caller's speech before its reply spoke, a text opens the next spoken turn, which asks
    it with those words (its final `transcript` holds both) and sends the only metrics."""
    if not _asked(metrics):
        return False
    if metrics.get("input", "text") == "text":
        return True
    wanted = " ".join(text.casefold().split())
    return any(e.get("type") == "transcript" and e.get("final") and
               e.get("turn") == metrics.get("turn") and
               wanted in " ".join(str(e.get("text", "")).casefold().split())
               for e in events)


def _ended_turns(events: list[dict[str, Any]]) -> list[int]:
    """Turns that ended, but empty ones (``_asked``)."""
    return [int(e["turn"]) for e in events if e.get("type") == "turn_metrics" and _asked(e)]


def _only_empty_turns(events: list[dict[str, Any]]) -> str:
    """The turns that ended empty (noise heard as speech: no words), as "1" or "1, 2",
    when every turn that ended was empty and no words have come since the last (a
    transcript after it: words whose turn has not ended yet); else ""."""
    ends = [i for i, e in enumerate(events) if e.get("type") == "turn_metrics"]
    if not ends or _ended_turns(events) or any(
            e.get("type") == "transcript" for e in events[ends[-1] + 1:]):
        return ""
    return ", ".join(str(events[i].get("turn")) for i in ends)


_UNASKED = ("greeting", "prompt", "goodbye")


def _what_came(events: list[dict[str, Any]]) -> str:
    """What an unanswered utterance got, for NoReply: the last words heard, a reply begun."""
    words = [e.get("text") for e in events if e.get("type") == "transcript" and e.get("text")]
    if not words:
        return "the gateway heard no words"
    # A line the bot says unasked (the greeting, the idle prompt) answers nothing.
    began = any(e.get("type") == "response" and e.get("source") not in _UNASKED
                for e in events)
    return (f"the gateway heard {words[-1]!r}; "
            + ("its reply began and did not end" if began else "no reply began"))


def _cut_by_the_caller(events: list[dict[str, Any]]) -> set[int]:
    """Turns whose reply the caller's speech stopped for good (not resumed as noise)."""
    cut = {e.get("turn") for e in events if e.get("type") == "interrupt"
           and e.get("cause") == "speech"}
    return cut - {e.get("turn") for e in events if e.get("type") == "resume"}


def format_event(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if kind == "transcript":
        return f"  {'heard' if event.get('final') else '...  '} {event.get('text')!r}"
    if kind == "route":
        return (f"  route  intent={event.get('intent')} action={event.get('action')} "
                f"hit={event.get('hit')} score={event.get('score', 0):.3f} ({event.get('reason')})")
    if kind == "response":
        return f"  reply  [{event.get('source')}] {event.get('text')!r}"
    if kind == "turn_metrics":
        keys = ("end_of_turn_ms", "final_transcript_ms", "route_decided_ms", "first_token_ms",
                "first_audio_ms", "reply_latency_ms")
        parts = [f"{k[:-3]}={event[k]:.1f}" for k in keys if event.get(k) is not None]
        return "  timing " + " ".join(parts) + " (ms)"
    return f"  {kind}: " + json.dumps({k: v for k, v in event.items() if k != "type"})
