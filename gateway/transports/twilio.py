"""Twilio Media Streams, bidirectional (``<Connect><Stream>``), at ``/twilio/stream``.

Twilio sends JSON text messages: ``connected``, ``start`` (stream and call ids, custom
parameters, media format), ``media`` (base64 μ-law 8 kHz caller audio), ``mark`` (echo
of a mark we sent, once the audio before it has played), ``dtmf`` and ``stop``. We send
``media`` (base64 μ-law 8 kHz, whole 20 ms frames, up to ``playout_chunk_ms`` a message),
``mark`` and ``clear`` (barge-in).

This module only translates between that wire and a ``Call`` running at 8 kHz: caller
audio is decoded μ-law -> pcm16 here; reply audio arrives already in μ-law (the call
asks its responder for the output's encoding, and cached clips are held ready in it).
See docs/protocol.md, "Twilio Media Streams".
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.websockets import WebSocket

from .. import logs
from ..call import Call, LineEnded
from ..call.session import (CallSession, Outbox, presented_token, refuse_before_accept,
                            refuse_while_unavailable)
from ..clock import Clock
from ..credentials import token_matches
from ..codec import MULAW, ulaw_to_pcm16
from ..protocol import (CLOSE_POLICY, CLOSE_UNSUPPORTED_DATA, ProtocolError, StartMessage, as_json,
                        parse_dtmf_digit, parse_json, present_kind, unnamed, utf8_bytes_over)
from ..services import Services
from ..stats import Stats
from .call_records import SAFE_ID
from .twilio_ended import HUNG_UP, TRANSFERRED, EndedCalls
from .twilio_rest import CallAlreadyEnded, CallControlError, TwilioCallControl
from .twilio_voice import (DIAL_BACK_PARAMETER, NO_ONE_FREE_SAY, RESUMED_PARAMETER,
                           STREAM_KEY_PARAMETER, TOKEN_PARAMETER, dial_ended_url,
                           public_base_url, signature_refusal, stream_generation, stream_key,
                           stream_url)

log = logging.getLogger("voicegate.twilio")

TWILIO_RATE = 8000
TWILIO_MEDIA_ENCODING = "audio/x-mulaw"
_ULAW_BYTES_PER_MS = TWILIO_RATE // 1000
# A mark every 100 ms of reply audio (after the media message that crosses each 100 ms
# line): the precision of the confirmed `heard_ms`, at the cost of one small message.
# Media messages of ``playout_chunk_ms`` (200 ms by default) make it one mark a message.
# And one where the audio sent stops for now (a segment's end, the reply's last frame,
# ``reply_audio_sent``): what went out before a pause or the end is confirmed whole.
_MARK_EVERY_BYTES = 100 * _ULAW_BYTES_PER_MS
# Replies (or resumes) whose marks an echo may still name: a cleared reply's marks are
# echoed at once, an earlier reply's late ones within a round trip; this is ample.
_MARK_LABELS_KEPT = 16


class TwilioError(ProtocolError):
    """A message Twilio's protocol does not allow. ``close_code`` None: the stream goes on."""


@dataclass(frozen=True)
class StreamStart:
    stream_sid: str
    call_sid: str
    account_sid: str
    parameters: dict[str, str] = field(default_factory=dict)


def parse_start(data: dict[str, Any]) -> StreamStart:
    start = data.get("start")
    if not isinstance(start, dict):
        raise TwilioError("twilio_invalid_start", "`start` message has no `start` object",
                          CLOSE_POLICY)
    stream_sid = start.get("streamSid")
    if stream_sid is None or stream_sid == "":  # the message's own, when `start` has none
        stream_sid = data.get("streamSid")
    if stream_sid is not None:
        _start_field_is(str, "streamSid", stream_sid)
    if not stream_sid:
        raise TwilioError("twilio_invalid_start", "`start` has no `streamSid`: replies cannot "
                                                  "be addressed", CLOSE_POLICY)
    media_format = start.get("mediaFormat")
    if media_format is not None:
        _start_field_is(dict, "mediaFormat", media_format)
        if not _is_twilio_format(media_format):
            raise TwilioError("twilio_unsupported_media_format",
                              f"media format not supported: {_format_text(media_format)}; "
                              f"supported: \"{TWILIO_MEDIA_ENCODING}\", {TWILIO_RATE} Hz, "
                              "1 channel", CLOSE_UNSUPPORTED_DATA)
    raw_params = start.get("customParameters")
    if raw_params is not None:
        _start_field_is(dict, "customParameters", raw_params)
    # TwiML's <Parameter> values are strings (an XML attribute), and Twilio sends them so.
    # Anything else is refused by name, never made text: null's "None", false's "False" or
    # 0's "0" would read as set (a `resumed` stream), 1e999 as "inf".
    for name, value in (raw_params or {}).items():
        _start_field_is(str, f"customParameters.{name[:64]}", value)
    parameters: dict[str, str] = dict(raw_params) if raw_params else {}
    return StreamStart(stream_sid=stream_sid, call_sid=_sid(start, "callSid"),
                       account_sid=_sid(start, "accountSid"), parameters=parameters)


def _sid(start: dict[str, Any], field: str) -> str:
    """A SID of `start`, "" when absent. It addresses the REST API's hang-up and transfer
    (Accounts/{AccountSid}/Calls/{CallSid}), and `start` itself is not signed: one that is
    not an id ("../Calls/CA2") is refused, never put in a request's path."""
    value = start.get(field)
    if value is None:
        return ""
    _start_field_is(str, field, value)
    if value and not SAFE_ID.fullmatch(value):
        raise TwilioError("twilio_invalid_start", f"`start` has a `{field}` that is not a "
                          f"Twilio SID (letters, digits, '_' or '-', at most 64)", CLOSE_POLICY)
    return value


def _start_field_is(kind: type, field: str, value: Any) -> None:
    """A `start` field of the wrong JSON type is a malformed `start`, named as such: never
    taken for an absent one, an unsupported value, or Python's repr of it."""
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else "a string"
        raise TwilioError("twilio_invalid_start", f"`{field}` must be {expected} (this one is "
                          f"{present_kind(value)})", CLOSE_POLICY)


def _is_twilio_format(media_format: Any) -> bool:
    """The only format a bidirectional stream carries: μ-law, 8 kHz, mono."""
    if not isinstance(media_format, dict):
        return False
    return (media_format.get("encoding", TWILIO_MEDIA_ENCODING) == TWILIO_MEDIA_ENCODING
            and _equals_number(media_format.get("sampleRate", TWILIO_RATE), TWILIO_RATE)
            and _equals_number(media_format.get("channels", 1), 1))


_ABSENT = object()


def _format_text(media_format: dict[str, Any]) -> str:
    """A refused `mediaFormat` in words: its encoding, sampleRate and channels as JSON
    writes them (cut short: the three and the format supported fit the log's 200
    characters), never Python's repr of the object."""
    return ", ".join([_format_field(media_format, "encoding", 24, number=False),
                      _format_field(media_format, "sampleRate", 13, number=True),
                      _format_field(media_format, "channels", 13, number=True)])


def _format_field(media_format: dict[str, Any], name: str, limit: int, number: bool) -> str:
    value = media_format.get(name, _ABSENT)
    if value is _ABSENT:
        return f"{name} absent"
    text = as_json(value, limit)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{name} {text}" + (" (not a number)" if number and not is_number else "")


def _equals_number(value: Any, expected: int) -> bool:
    """``value`` is a JSON number equal to ``expected``: not 8000.9 cut to 8000, not the
    string "8000", nor ``true`` taken for 1 channel."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == expected)


def call_id_from_sid(call_sid: str) -> str | None:
    """The CallSid as the call's id (logs then match Twilio's console) when it is safe as
    one: 1-64 letters, digits, "_" or "-" (Twilio's are "CA" and 32 hex digits). Anything
    else (an unsigned stream can send any string) gets a generated id: the id names
    recording files and log fields, where a "/" or a newline does not belong."""
    return call_sid if SAFE_ID.fullmatch(call_sid) else None


class TwilioOutput:
    """Reply audio, marks and clears for one stream.

    Marks are named ``<turn>:<ms>``: when Twilio echoes one, the caller has heard ``ms``
    of that turn's reply. After a ``clear`` Twilio echoes the marks it dropped too, so a
    cleared reply's echoes are ignored; a reply resumed after a false interruption, and
    another reply of the same turn (the apology after one that failed mid-way), name
    their marks ``<turn>.<n>:<ms>`` (n counting up in the turn), so the echoes of one are
    never counted for another. An echo must name a mark we sent (a label of the last
    few replies, up to the highest ms sent under it); anything else is not ours.
    """

    encoding = MULAW

    def __init__(self, outbox: Outbox, stream_sid: str, call_id: str,
                 control: TwilioCallControl | None = None, account_sid: str = "",
                 call_sid: str = "", handoff_number: str = "",
                 ended: EndedCalls | None = None, dial_action: str = "",
                 stats: Stats | None = None,
                 line_silent_s: Callable[[], float] | None = None) -> None:
        self._outbox = outbox
        # The stream's time without `media` as its MediaWatch last counted it (0 while the
        # line's frames come); None without a watch.
        self._line_silent_s = line_silent_s
        self._stats = stats  # counts a hang-up that found the call already over
        # The transfer's <Dial action> (/twilio/dial-ended): a desk that does not answer
        # gives the caller back to the bot instead of ending the call.
        self._dial_action = dial_action
        self.call_id = call_id
        # The REST side of this call (transfer, hang up); None without an auth token.
        self._control = control
        # Where a hang-up or transfer is recorded, so the stream's end does not resume it.
        self._ended = ended
        self._account_sid = account_sid
        self._call_sid = call_sid
        self._handoff_number = handoff_number
        self.stream_sid = stream_sid  # what Twilio's messages for this stream carry
        sid = json.dumps(stream_sid)
        # Per-frame messages are string concatenation around these, not json.dumps.
        self._media_head = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._mark_head = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":"'
        self._clear = '{"event":"clear","streamSid":' + sid + '}'
        self._turn = 0
        self._label = "0"  # the turn, with a count after its first label (``<turn>.<n>``)
        self._relabels = 0  # the turn's labels after its first: resumes, later replies
        self._reply_bytes = 0
        self._next_mark = _MARK_EVERY_BYTES
        self._marked_bytes = 0  # where the reply's last mark sent stands
        self._confirmed_ms = 0.0
        self._cleared = False
        self._echoes_marks = False  # the far end has echoed a mark: its figure can be trusted
        # The highest ms named by a mark sent, per label, for the last few labels (oldest
        # first): what an echo must match.
        self._sent_marks: dict[str, int] = {}
        self.marks_sent = 0
        self.marks_confirmed = 0

    # --- CallOutput --------------------------------------------------------------

    async def send_event(self, event: dict[str, Any]) -> None:
        # Twilio has no channel for the call's events; the call logs its own turns.
        if event.get("type") == "handoff":
            logs.event(log, "twilio_handoff", call_id=self.call_id, reason=event.get("reason"))

    async def send_audio(self, frame: bytes) -> None:
        payload = binascii.b2a_base64(frame, newline=False).decode("ascii")
        self._outbox.send_text(self._media_head + payload + '"}}')
        self._reply_bytes += len(frame)
        if self._reply_bytes >= self._next_mark:
            while self._next_mark <= self._reply_bytes:  # the next line not yet crossed
                self._next_mark += _MARK_EVERY_BYTES
            self._send_mark()

    def reply_audio_sent(self) -> None:
        """The reply's audio so far has all gone out, and more may not follow soon (a
        segment's end, the reply's last frame): a mark where it ends, unless one stands
        there. Without, the part after the last 100 ms line (1000 -> 1040 ms) was never
        confirmed heard, however long it had played: a barge-in in the pause after it (the
        next sentence's voice slow to start) cut the words the caller heard last. Not
        after a ``clear``: nothing of the reply is playing, nor will be until a resume."""
        if not self._cleared and self._reply_bytes > self._marked_bytes:
            self._send_mark()

    def _send_mark(self) -> None:
        ms = self._reply_bytes // _ULAW_BYTES_PER_MS
        self._marked_bytes = self._reply_bytes
        self._outbox.send_text(f'{self._mark_head}{self._label}:{ms}"}}}}')
        self.marks_sent += 1
        self._note_mark_sent(ms)

    def _note_mark_sent(self, ms: int) -> None:
        sent = self._sent_marks
        if self._label not in sent and len(sent) >= _MARK_LABELS_KEPT:
            del sent[next(iter(sent))]  # the oldest label: its echoes are long back
        sent[self._label] = max(ms, sent.get(self._label, 0))

    @property
    def can_transfer(self) -> bool:
        """A transfer has somewhere to go (a handoff number, the REST credentials): the call
        hands off to a person after providers failed turn after turn, not without."""
        return bool(self._handoff_number) and self._control is not None

    async def transfer(self, reason: str) -> bool:
        """The handoff message has played: redirect the live call to a person through
        Twilio's REST API. ``CallControlError`` when no number is configured: a failed
        transfer (the caller was told "stay on the line": they hear it did not happen, not
        silence). ``LineEnded`` when Twilio says the call is already over (the caller hung up)."""
        if not self._handoff_number or self._control is None:
            raise CallControlError("no one to transfer to: set VOICEGATE_HANDOFF_NUMBER (and "
                                   "VOICEGATE_TWILIO_AUTH_TOKEN) to put callers through")
        # Recorded first: Twilio ends the stream once it has the new TwiML, maybe before
        # our request is answered, and asks /twilio/stream-ended, which must not resume it;
        # a stream lost before the request landed (this replica killed meanwhile) is
        # answered the transfer there.
        await self._mark_ended(TRANSFERRED)
        try:
            await self._control.transfer(self._account_sid, self._call_sid,
                                         self._handoff_number, self._dial_action)
        except CallAlreadyEnded as exc:
            # No failure, and no apology played to nobody. The record stays: a call Twilio
            # could not see from here (a 20404) but still live gets its <Dial> as the
            # stream ends (/twilio/stream-ended).
            self._call_over("twilio_transfer_already_ended", exc)
            raise LineEnded(str(exc)) from None
        except Exception:
            if self._ended is not None:  # the caller stays with the bot: a lost stream resumes
                await self._ended.forget(self._call_sid)
            raise
        logs.event(log, "twilio_transferred", call_id=self.call_id, reason=reason[:200])
        return True

    async def hang_up(self, reason: str) -> None:
        """End the phone call (Status=completed). Recorded as ended first: if the REST
        request fails (or there are no REST credentials) closing the stream ends the
        call, and /twilio/stream-ended then answers ``<Hangup/>`` instead of resuming it.
        A call Twilio says is already over (the caller hung up as we did) is ended, as
        asked: no failure, counted apart and logged at info.

        Not on a stream whose `media` stopped (none since its watch last looked: Twilio
        sends one every 20 ms): the caller's "silence" that led here may be a dead
        connection's, and Twilio resumes such a call on a new stream once it finds the
        stream gone (maybe has already, elsewhere). Hung up, it would be dropped; it is
        left as a dead stream is (closed without an "ended" record)."""
        silent_s = self._line_silent_s() if self._line_silent_s is not None else 0.0
        if silent_s > 0:
            logs.event(log, "twilio_hangup_skipped_no_media", logging.WARNING,
                       call_id=self.call_id, reason=reason[:64], silent_s=round(silent_s, 2))
            return
        await self._mark_ended()
        if self._control is None:
            logs.event(log, "twilio_hangup_by_closing_stream", call_id=self.call_id)
            return
        try:
            await self._control.hang_up(self._account_sid, self._call_sid)
        except CallAlreadyEnded as exc:
            if self._stats is not None:
                self._stats.twilio_hangup_already_ended()
            self._call_over("twilio_hangup_already_ended", exc)

    def _call_over(self, name: str, exc: CallAlreadyEnded) -> None:
        """Log a request Twilio answered with the call already over: at info when it said
        so (21220); a 404 (20404) is also its answer for a call the API host does not see
        (the account's calls in another region): a warning naming where we asked."""
        if exc.certain:
            logs.event(log, name, call_id=self.call_id, detail=str(exc))
            return
        api_url = self._control.api_url if self._control is not None else ""
        logs.event(log, name, logging.WARNING, call_id=self.call_id, detail=str(exc),
                   account_sid=self._account_sid, api_url=api_url,
                   hint="the caller hung up first, or the account's calls are not at "
                        "api_url: if every call says so, set VOICEGATE_TWILIO_API_URL to "
                        "their region's API")

    async def _mark_ended(self, how: str = HUNG_UP) -> None:
        if self._ended is not None:
            await self._ended.mark(self._call_sid, how)

    async def interrupt(self, event: dict[str, Any]) -> None:
        # Freeze the confirmed figure first: the call read it for `event` just before this.
        self._cleared = True
        self._outbox.send_text(self._clear)
        logs.event(log, "twilio_clear", call_id=self.call_id, turn=event.get("turn"),
                   heard_ms=event.get("heard_ms"), sent_ms=event.get("sent_ms"),
                   confirmed=self._echoes_marks)

    # --- ConfirmsPlayback ----------------------------------------------------------

    def reply_started(self, turn: int) -> None:
        if turn == self._turn:
            # Another reply of this turn (the apology after one that failed mid-way): the
            # failed reply's late echoes must not count as the caller hearing this one.
            self._relabel()
        else:
            self._turn, self._label, self._relabels = turn, str(turn), 0
        self._reply_bytes = self._marked_bytes = 0
        self._next_mark = _MARK_EVERY_BYTES
        self._confirmed_ms = 0.0
        self._cleared = False

    def _relabel(self) -> None:
        """The turn's next label, ``<turn>.<n>``: the echoes of its earlier ones never count."""
        self._relabels += 1
        self._label = f"{self._turn}.{self._relabels}"

    def reply_resumed(self, from_ms: float) -> None:
        self._relabel()
        self._reply_bytes = self._marked_bytes = int(from_ms) * _ULAW_BYTES_PER_MS
        self._next_mark = self._reply_bytes + _MARK_EVERY_BYTES
        self._confirmed_ms = from_ms
        self._cleared = False

    def confirmed_heard_ms(self) -> float | None:
        return self._confirmed_ms if self._echoes_marks else None

    # --- inbound -----------------------------------------------------------------------

    def mark_played(self, name: str) -> bool:
        """Twilio echoed mark ``name``. False when it is not one we sent."""
        label, sep, ms_text = name.partition(":")
        highest = self._sent_marks.get(label)
        if not (sep and highest is not None and _is_number(ms_text)
                and int(ms_text) <= highest):
            return False
        # A mark we sent came back: the far end echoes them, its figure can be trusted
        # (a bogus one must not switch off the clock's estimate for the rest of the call).
        self._echoes_marks = True
        if label == self._label and not self._cleared:
            self._confirmed_ms = max(self._confirmed_ms, float(ms_text))
            self.marks_confirmed += 1
        return True



def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²", which ``int`` refuses."""
    return 0 < len(text) <= 12 and text.isascii() and text.isdecimal()


class MediaWatch:
    """A started stream whose `media` stopped is dead: Twilio sends the caller's line every
    20 ms, silence included, so none for ``timeout_s`` is a connection that only looks open
    (half-open TCP, a stalled proxy). ``on_dead`` is called once.

    The receive loop only counts frames (``media_frames``); this task looks four times a
    timeout (noticed within 1.25 of it), so no timer is armed per frame. Time is the
    session's clock.

    The silence is what the receive side had the time to end: each look adds the time
    since the previous one, at most two looks' worth. An event-loop stall (a GC pause, a
    blocking call) stalls the receive loop as long, and the overdue look may run before it
    has counted the `media` queued meanwhile; counted whole, a stall of a timeout would
    close every Twilio call on the replica as dead, though the audio rate limit tolerates
    stalls of 8 s. A line that really stopped is still noticed: the looks after the stall
    each add their own time. ``silent_s``: that count as of the last look (0 while frames
    come), which the output reads before it hangs up."""

    def __init__(self, clock: Clock, timeout_s: float, frames: Callable[[], int],
                 on_dead: Callable[[float], None]) -> None:
        self._clock = clock
        self._timeout_s = timeout_s
        self._frames = frames
        self._on_dead = on_dead
        self.silent_s = 0.0  # the receive side's time without a new frame, stalls cut short

    async def run(self) -> None:
        period = self._timeout_s / 4
        seen = self._frames()
        last = self._clock.now()
        while True:
            await self._clock.sleep(period)
            now = self._clock.now()
            self.silent_s += min(now - last, 2 * period)
            last = now
            if (frames := self._frames()) != seen:
                seen, self.silent_s = frames, 0.0
            elif self.silent_s >= self._timeout_s:
                self._on_dead(self.silent_s)
                return


class TwilioStream:
    """One Media Stream: parses Twilio's messages, starts the call, feeds it audio."""

    def __init__(self, services: Services, session: CallSession, authenticated: bool,
                 base_url: str = "") -> None:
        self._services = services
        self._session = session
        self._base_url = base_url  # the public URL Twilio reaches us at (webhooks' base)
        self._max_bytes = services.settings.max_frame_bytes
        # False: a call token is required and the upgrade did not carry it, so the
        # stream's `start` must (a <Parameter name="token"> of the TwiML <Stream>).
        self._authenticated = authenticated
        self.output: TwilioOutput | None = None
        self.stopped = False
        self.media_frames = 0  # every `media` message since `start`: the stream is alive
        self.watch: asyncio.Task[None] | None = None  # the MediaWatch, from `start`

    @property
    def call(self) -> Call | None:
        return self._session.call

    def handle(self, raw: str) -> None:
        """One text message. Hot path for ``media``: parse, decode, append."""
        size = utf8_bytes_over(raw, self._max_bytes)
        if size is not None:
            raise TwilioError("twilio_frame_too_large",
                              f"message of {size} bytes exceeds {self._max_bytes} bytes")
        data = parse_json(raw, "twilio_invalid_json")
        if not isinstance(data, dict):
            raise TwilioError("twilio_invalid_message", "a message must be a JSON object")
        event = data.get("event")
        if event == "media":
            self._on_media(data)
        elif event == "mark":
            self._on_mark(data)
        elif event == "start":
            self._on_start(data)
        elif event == "stop":
            self._check_stream(data, "stop")
            self.stopped = True
        elif event == "dtmf":
            self._on_dtmf(data)
        elif event == "connected":
            logs.event(log, "twilio_connected", logging.DEBUG, protocol=str(data.get("protocol")),
                       version=str(data.get("version")))
        elif not isinstance(event, str):
            raise TwilioError("twilio_invalid_message",
                              unnamed(data, "event", "connected, start, media, mark, dtmf or stop"))
        else:
            raise TwilioError("twilio_unknown_event",
                              f"unknown event {str(event)[:64]!r}; expected connected, start, "
                              "media, mark, dtmf or stop")

    def _on_media(self, data: dict[str, Any]) -> None:
        if self.call is None:
            raise TwilioError("twilio_media_before_start", "`media` before `start`: dropped")
        self._check_stream(data, "media")  # another stream's: not this line alive either
        self.media_frames += 1
        media = data.get("media")
        if not isinstance(media, dict) or not isinstance(payload := media.get("payload"), str):
            raise TwilioError("twilio_invalid_message", "`media` needs a string `media.payload`")
        track = media.get("track", "inbound")
        if not isinstance(track, str):
            raise TwilioError("twilio_invalid_message",
                              f"`media.track` must be a string (this one is {present_kind(track)})")
        if track != "inbound":
            return  # only the caller's side is the call's input
        try:
            ulaw = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise TwilioError("twilio_invalid_base64",
                              f"`media.payload` is not valid base64: {exc}") from None
        if not ulaw:
            raise TwilioError("twilio_empty_media", "`media.payload` holds no audio")
        # At most the audio of a native frame (max_frame_bytes of pcm16), which the rate
        # limit allows one of at once: a bigger payload is no caller talking too fast
        # (`audio_too_fast` closes the call) but a client that is not Twilio.
        if len(ulaw) * 2 > self._max_bytes:
            ms = len(ulaw) // _ULAW_BYTES_PER_MS
            raise TwilioError("twilio_media_too_large",
                              f"`media.payload` of {len(ulaw)} bytes ({ms} ms) exceeds "
                              f"{self._max_bytes // 2} bytes of μ-law in one message; Twilio "
                              "sends 160 (20 ms): dropped")
        # Any byte count is whole μ-law samples; 160 (20 ms) is Twilio's usual frame.
        self._session.feed_audio(ulaw_to_pcm16(ulaw))

    def _on_start(self, data: dict[str, Any]) -> None:
        if self.call is not None:
            raise TwilioError("twilio_already_started", "a second `start`: ignored")
        start = parse_start(data)
        if not self._authenticated and not token_matches(
                start.parameters.get(TOKEN_PARAMETER, ""), self._services.settings.call_token):
            raise TwilioError("unauthorized", "the stream carries no valid call token "
                                              f"(a `{TOKEN_PARAMETER}` custom parameter)",
                              CLOSE_POLICY)
        settings = self._services.settings
        # The upgrade's signature is every stream's (replayable): with the auth token set,
        # the stream proves it is the call's own by the key its TwiML gave it.
        if settings.twilio_auth_token and not token_matches(
                start.parameters.get(STREAM_KEY_PARAMETER, ""),
                stream_key(settings.twilio_auth_token, start.call_sid)):
            raise TwilioError("unauthorized", "the stream carries no valid key for its call "
                              f"(a `{STREAM_KEY_PARAMETER}` custom parameter, which the TwiML "
                              "of /twilio/voice gives each call's stream)", CLOSE_POLICY)
        # `start` is not signed: with the gateway's account configured, a stream naming
        # another is no call of ours, and its line is never controlled through that account.
        account_sid = settings.twilio_account_sid or start.account_sid
        if start.account_sid and start.account_sid != account_sid:
            raise TwilioError("twilio_wrong_account",
                              f"`start` names account {start.account_sid[:64]}, not this "
                              "gateway's (VOICEGATE_TWILIO_ACCOUNT_SID): refused", CLOSE_POLICY)
        call_id = call_id_from_sid(start.call_sid)
        parameters = {k: v for k, v in start.parameters.items()
                      if k not in (TOKEN_PARAMETER, STREAM_KEY_PARAMETER)}
        metadata = {"transport": "twilio", "stream_sid": start.stream_sid,
                    "call_sid": start.call_sid, "account_sid": start.account_sid,
                    "parameters": parameters}
        # A stream /twilio/stream-ended reconnected after one was lost, or /twilio/dial-
        # ended after a dial nobody took: the caller was greeted already (and has just
        # heard Twilio's apology).
        resumed = bool(parameters.get(RESUMED_PARAMETER))
        # Only on a resumed stream, as /twilio/dial-ended writes it: a lone one (no TwiML of
        # ours) is a new call, not a back-from-dial one with no stream before it.
        dial_back = resumed and bool(parameters.get(DIAL_BACK_PARAMETER))
        # Its conversation is kept at every turn's end, for a stream that resumes it; a
        # resumed one goes on from there, and its saves replace those of the streams before
        # it, never the reverse (gateway/transports/twilio_context.py).
        generation = stream_generation(parameters.get(RESUMED_PARAMETER, ""))
        # Back from a dial: the agent learns what the caller heard (nobody took the call).
        keeper = (self._services.twilio_contexts().keeper(
            call_id, generation, heard=NO_ONE_FREE_SAY if dial_back else "")
            if call_id is not None else None)
        # Made before the output, which asks it before hanging up; run once the call starts.
        watch = (MediaWatch(self._session.clock, settings.twilio_media_timeout_s,
                            lambda: self.media_frames, self._media_stopped)
                 if settings.twilio_media_timeout_s > 0 else None)
        # The call id is the CallSid when there is one, so logs match Twilio's console.
        output = TwilioOutput(self._session.outbox, start.stream_sid, call_id or "",
                              control=self._services.twilio_control(),
                              account_sid=account_sid, call_sid=start.call_sid,
                              handoff_number=settings.handoff_number,
                              ended=self._services.twilio_ended(),
                              dial_action=dial_ended_url(self._base_url, generation)
                              if self._base_url else "", stats=self._services.stats,
                              line_silent_s=(lambda: watch.silent_s) if watch else None)
        self.output = output
        call = self._session.start_call(lambda: self._services.new_call(
            output, StartMessage(sample_rate=TWILIO_RATE, metadata=metadata), call_id=call_id,
            resumed=resumed, keeper=keeper, transport="twilio"))
        output.call_id = call.id
        logs.event(log, "twilio_start", call_id=call.id, stream_sid=start.stream_sid)
        if watch is not None:
            self.watch = asyncio.create_task(watch.run(), name=f"vg-media-watch-{call.id}")
        if dial_back:
            # Not in voicegate_twilio_calls_resumed: that counts lost streams (replicas
            # gone, connections cut); a desk nobody answered is no fault of the line.
            logs.event(log, "twilio_call_back_from_dial", call_id=call.id,
                       stream=parameters[RESUMED_PARAMETER][:8])
        elif resumed:
            self._services.stats.twilio_call_resumed()
            logs.event(log, "twilio_call_resumed", call_id=call.id,
                       lost=parameters[RESUMED_PARAMETER][:8])

    def _check_stream(self, data: dict[str, Any], event: str) -> None:
        """A started stream's message names this stream, or none: Twilio's each carry their
        stream's `streamSid`. Another stream's (audio, keys, a mark, a `stop`) is not this
        call's: refused, so ignored, and the stream goes on."""
        if self.output is None or "streamSid" not in data:
            return
        sid = data["streamSid"]
        if not isinstance(sid, str):
            raise TwilioError("twilio_invalid_message", f"`streamSid` must be a string (this "
                                                        f"one is {present_kind(sid)}): ignored")
        if sid != self.output.stream_sid:
            raise TwilioError("twilio_wrong_stream",
                              f"`{event}` for stream {sid[:64]}, not this one "
                              f"({self.output.stream_sid[:64]}): ignored")

    def _media_stopped(self, silent_s: float) -> None:
        # Closed, not hung up: no "ended" record, so Twilio's request for the <Connect
        # action> (if Twilio is still there) resumes the call on a new stream.
        self._session.input_stopped(
            "twilio_no_media", f"no `media` for {silent_s:.1f} s (Twilio sends one every "
                               "20 ms): the stream is dead; closed without hanging up")

    def _on_mark(self, data: dict[str, Any]) -> None:
        mark = data.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            raise TwilioError("twilio_invalid_message", "`mark` needs a string `mark.name`")
        if self.output is None or self.call is None:
            raise TwilioError("twilio_not_started", "`mark` before `start`: ignored")
        self._check_stream(data, "mark")
        if not self.output.mark_played(name):
            raise TwilioError("twilio_unknown_mark", f"mark {name[:64]!r} was not sent by us")

    def _on_dtmf(self, data: dict[str, Any]) -> None:
        if self.call is None:
            raise TwilioError("twilio_not_started", "`dtmf` before `start`: ignored")
        self._check_stream(data, "dtmf")
        dtmf = data.get("dtmf")
        if not isinstance(dtmf, dict) or not isinstance(dtmf.get("digit"), str):
            raise TwilioError("twilio_invalid_message", "`dtmf` needs a string `dtmf.digit`")
        digit = parse_dtmf_digit(dtmf["digit"], "twilio_invalid_dtmf")
        # The digit itself stays out of logs (PINs).
        logs.event(log, "twilio_dtmf", call_id=self.call.id)
        self._session.feed_dtmf(digit)


async def twilio_stream(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    settings = services.settings
    base = public_base_url(websocket, settings.public_url)
    if signature_refusal(websocket, stream_url(base), {}) is not None:
        await websocket.close(code=CLOSE_POLICY)  # before accept: the upgrade gets HTTP 403
        return
    # A token presented at the upgrade (header or query) is checked now; Twilio itself
    # cannot send one there, so otherwise the stream's `start` must carry it.
    authenticated = token_matches(presented_token(websocket), settings.call_token)
    if not authenticated and presented_token(websocket):
        await refuse_before_accept(websocket, "wrong call token", services.stats,
                                   "unauthorized")
        return
    if await refuse_while_unavailable(websocket, services.stats, overload_refuses=False):
        return
    await websocket.accept()
    session = services.open_session(websocket, "twilio")
    session.hold_drain_until_start()  # Twilio cannot retry a stream: a drain must not drop it
    stream = TwilioStream(services, session, authenticated, base)
    try:
        while not stream.stopped and (message := await session.receive()) is not None:
            try:
                text = message.get("text")
                if text is None:
                    raise TwilioError("twilio_binary_frame",
                                      "binary frame: Twilio sends JSON text messages")
                stream.handle(text)
            except ProtocolError as exc:
                session.bad_input(exc, message)  # its bytes count too: it was read whole
                if exc.close_code is not None:
                    break
    except ProtocolError as exc:  # no `start` in time, or messages too fast
        session.bad_input(exc)
    except Exception as exc:  # the gateway's own failure (building the call): 1011, not 1000
        session.failed(exc)
    finally:
        if stream.watch is not None:
            stream.watch.cancel()
        if stream.output is not None:
            logs.event(log, "twilio_stop", call_id=session.call_id,
                       marks_sent=stream.output.marks_sent,
                       marks_confirmed=stream.output.marks_confirmed)
        await session.close()
