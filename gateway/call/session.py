"""The transport side of a call that every endpoint shares.

An endpoint (native protocol, Twilio Media Streams) only translates its wire format;
``CallSession`` does the rest, the same way for both:

- admission: at most ``max_calls`` at once (``too_many_calls``, close 1013) and the
  optional call token, checked before the WebSocket is accepted (HTTP 403);
- a connection that does not ``start`` within ``start_timeout_s`` is closed;
- every outbound message goes through one bounded queue and one writer whose sends
  time out, so a client that does not read is closed (``client_not_reading``)
  instead of growing the server;
- inbound audio faster than ``max_audio_rate`` x real time for longer than
  ``audio_rate_grace_s`` is refused (``audio_too_fast``, close 1008);
- every bad input is counted; warnings are logged for the first few per call only; a
  flood of them (over ``bad_message_burst``, then ``max_bad_message_rate`` a second; or by
  size, over ``bad_bytes_burst`` bytes, then ``max_bad_bytes_rate`` a second, since each was
  read whole) closes the connection (``too_many_bad_messages``, 1008);
- a call that fails inside the gateway is counted, reported and closed with 1011.

Cancellation: ``close`` stops the call, drains the outbox for a bounded time, cancels
its writer and closes the socket; nothing outlives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import logs
from ..clock import SYSTEM_CLOCK, Clock
from ..credentials import bearer_token
from ..protocol import (CLOSE_INTERNAL_ERROR, CLOSE_INVALID_PAYLOAD, CLOSE_NORMAL, CLOSE_POLICY,
                        CLOSE_TOO_BIG, CLOSE_TRY_AGAIN_LATER, ProtocolError)
from ..settings import SUPPORTED_SAMPLE_RATES, Settings
from ..stats import Stats
from .engine import Call

log = logging.getLogger("voicegate.session")

SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)
# How long close() lets queued messages (a last error event) reach the client.
_DRAIN_S = 1.0


class Admission:
    """Concurrent calls of this replica, bounded; none at all once it drains."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.draining = False  # set by Services.begin_drain (SIGTERM)
        # Twilio streams upgraded with no `start` yet: their phone call is up, and a stream
        # cannot be retried, so a drain waits for them too (CallSession.hold_drain_until_start).
        self.awaiting_start = 0
        # Sessions flushing their last messages and closing their socket (CallSession.close):
        # a drain that ended meanwhile had uvicorn close them with 1012, under those messages.
        self.closing = 0

    @property
    def held(self) -> int:
        """What a drain waits for: the running calls, the Twilio streams not started yet and
        the sessions still closing."""
        return self.active + self.awaiting_start + self.closing

    def try_enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active = max(0, self.active - 1)


def presented_token(connection: HTTPConnection) -> str:
    """The call token a client presented: ``Authorization: Bearer`` or ``?token=``."""
    return bearer_token(connection) or connection.query_params.get("token", "")


# Audio time a real-time client may bank beyond the grace: a server that stalls (a busy
# event loop) and then reads the backlog in one burst must not look like a fast client.
STALL_ALLOWANCE_S = 8.0
# Audio sustained past this pace (x real time) beyond that backlog is no client catching
# up, though under max_audio_rate: named once (`audio_pace_mismatch`), the call goes on.
PACE_WARN_RATE = 1.5
# The stretch of the latest audio whose pace an error gives.
PACE_WINDOW_S = 10.0
# Frames that keep coming (each within 3x its own audio, + 50 ms, of the one before: no
# pause in sending) carrying at most this share of their time's audio, over PACE_WINDOW_S
# of them, are too slow: a `start` declaring twice the audio's rate (16000 for 8 kHz).
PACE_SLOW_RATE = 0.6


class TokenBucket:
    """Refilled at ``per_s`` a second up to ``capacity`` (it starts with ``start``, else
    full); ``take(amount)`` is False once what it takes leaves it below zero."""

    def __init__(self, per_s: float, capacity: float, clock: Clock = SYSTEM_CLOCK,
                 start: float | None = None) -> None:
        self._per_s = per_s
        self._capacity = float(capacity)
        self._tokens = self._capacity if start is None else float(start)
        self._clock = clock
        self._last = clock.now()

    def take(self, amount: float = 1.0) -> bool:
        now = self._clock.now()
        self._tokens = min(self._capacity, self._tokens + self._per_s * (now - self._last))
        self._last = now
        self._tokens -= amount
        return self._tokens >= 0.0


class AudioRateLimit:
    """Refuses inbound audio that runs faster than ``max_rate`` x real time for longer
    than ``grace_s``.

    A token bucket of audio seconds: it starts with ``grace_s`` plus the longest frame
    allowed (``max_frame_bytes``: a frame's audio arrives all at once, so a real-time
    client sending 2 s frames is 2 s ahead the moment each one lands), refills at
    ``max_rate`` seconds per second up to that plus ``STALL_ALLOWANCE_S``, and each frame
    takes its length. A 3x client empties it after ``grace_s`` (and a frame); a real-time
    client never does, even when the server reads several seconds of its audio late and
    all at once, because the bucket refilled at twice real time while the audio waited.

    A second bucket, the same but refilled at ``PACE_WARN_RATE``, tells audio sustained
    past real time that is no catching up, though under ``max_rate``: above all a `start`
    that declared half the audio's rate (8000 for 16 kHz audio), exactly 2x, which the
    first never refuses (``off_pace``; the call goes on). ``described`` names the rate such
    audio sounds like, from its pace over the last ``PACE_WINDOW_S``.
    """

    def __init__(self, sample_rate: int, max_rate: float, grace_s: float,
                 clock: Clock = SYSTEM_CLOCK, bytes_per_sample: int = 2,
                 max_frame_bytes: int = 0) -> None:
        self.sample_rate = sample_rate
        self._bytes_per_s = sample_rate * bytes_per_sample
        start_s = grace_s + max_frame_bytes / self._bytes_per_s
        self._seconds = TokenBucket(max_rate, start_s + STALL_ALLOWANCE_S, clock, start=start_s)
        self._pace = TokenBucket(min(PACE_WARN_RATE, max_rate), start_s + STALL_ALLOWANCE_S,
                                 clock, start=start_s)
        self._clock = clock
        self._audio_s = 0.0  # all audio taken
        self._marks: deque[tuple[float, float]] = deque()  # (time, audio before it), 1 s apart
        self._off_pace = False  # the pace bucket ran dry
        self._pace_said = False
        self._max_rate = max_rate
        # The flow: frames sent with no pause between, their audio and the time it took.
        self._last: tuple[float, float] | None = None  # (arrival, audio seconds) of the last
        self._flow_audio_s = 0.0
        self._flow_s = 0.0
        self._slow_pace: float | None = None  # the flow's pace, once found too slow

    def add(self, nbytes: int) -> bool:
        """Audio of ``nbytes`` arrived; True when the client is too fast."""
        seconds = nbytes / self._bytes_per_s
        now = self._clock.now()
        if not self._marks or now - self._marks[-1][0] >= 1.0:
            self._marks.append((now, self._audio_s))
            while len(self._marks) > 1 and now - self._marks[1][0] >= PACE_WINDOW_S:
                self._marks.popleft()
        self._audio_s += seconds
        if not self._pace.take(seconds):
            self._off_pace = True
        self._follow(now, seconds)
        return not self._seconds.take(seconds)

    def _follow(self, now: float, seconds: float) -> None:
        """Too slow cannot be told from the audio per second: a client may send only while
        its caller speaks. It is the frames that keep coming: each interval to the next
        frame is paired with the audio the frame before it held, and a pause in sending
        (longer than 3x that audio, + 50 ms) is left out; a burst read late only adds."""
        if self._last is not None and not self._pace_said:
            at, held = self._last
            gap = now - at
            if gap <= 3 * held + 0.05:
                self._flow_audio_s += held
                self._flow_s += gap
            if self._flow_s >= PACE_WINDOW_S:
                pace = self._flow_audio_s / self._flow_s
                if pace <= PACE_SLOW_RATE:
                    self._slow_pace = pace
                    self._off_pace = True
                self._flow_audio_s = self._flow_s = 0.0
        self._last = (now, seconds)

    def off_pace(self) -> bool:
        """True once: the first time audio ran past ``PACE_WARN_RATE`` beyond the backlog,
        at a pace the limit itself does not refuse (faster, ``add`` is about to: one error
        says it, not a warning that the call goes on and then its close)."""
        if not self._off_pace or self._pace_said:
            return False
        pace = self._slow_pace or self.pace()
        if pace is None or pace > self._max_rate:
            return False
        self._pace_said = True
        return True

    def pace(self) -> float | None:
        """Audio seconds a second over the last ``PACE_WINDOW_S``, from mark to mark (whole
        seconds: audio that lands in bursts is not counted ahead of its time); None before
        a second has passed."""
        if len(self._marks) < 2:
            return None
        (first, before), (last, upto) = self._marks[0], self._marks[-1]
        return (upto - before) / (last - first)

    def pace_fault(self) -> str:
        """What ``off_pace`` found, for its error."""
        if self._slow_pace is not None:
            return "slower than real time though it keeps coming: it is heard sped up"
        return "longer than a client catching up would: it is heard slowed down"

    def described(self, found: bool = False) -> str:
        """The pace, for an error: "2.0x real time for the declared 8000 Hz (it sounds
        like 16000 Hz audio)", the rate when the pace makes a supported one (within 5%).
        ``found``: the pace ``off_pace`` found (a flow too slow); else the last seconds'
        (a client going too fast after a slow stretch is closed for its own pace)."""
        pace = (self._slow_pace if found else None) or self.pace()
        if pace is None:
            return f"for the declared {self.sample_rate} Hz"
        heard = self.sample_rate * pace
        rate = min(SUPPORTED_SAMPLE_RATES, key=lambda r: abs(r - heard))
        like = (f" (it sounds like {rate} Hz audio)" if rate != self.sample_rate
                and abs(rate - heard) <= 0.05 * rate else "")
        return f"{pace:.1f}x real time for the declared {self.sample_rate} Hz{like}"


def message_bytes(message: dict[str, Any]) -> int:
    """The size on the wire of a WebSocket message (a text's UTF-8 bytes). For a refused
    message only, not the per-frame path: a text is encoded once more if it is not ASCII."""
    data = message.get("bytes")
    if data is not None:
        return len(data)
    text = message.get("text") or ""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _size(nbytes: float) -> str:
    """4194304 -> "4 MiB (4194304 bytes)", for the messages that name a limit."""
    exact = f"{nbytes:.0f} bytes"
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes / scale:g} {unit} ({exact})"
    return exact


class Outbox:
    """One writer per connection; senders never block and never grow the server."""

    def __init__(self, websocket: WebSocket, limit: int, send_timeout_s: float,
                 on_stuck: Callable[[str], None]) -> None:
        self._ws = websocket
        self._queue: asyncio.Queue[str | bytes] = asyncio.Queue(limit)
        self._send_timeout_s = send_timeout_s
        self._on_stuck = on_stuck
        self.closed = False  # the client is gone or stuck: later sends are dropped
        self._sending_since: float | None = None  # loop time the send under way began
        self._writer = asyncio.create_task(self._write(), name="vg-outbox")
        self._watchdog = asyncio.create_task(self._watch(), name="vg-outbox-watch")

    def send_text(self, text: str) -> None:
        self._put(text)

    def send_bytes(self, data: bytes) -> None:
        self._put(data)

    def _put(self, item: str | bytes) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._stuck(f"{self._queue.maxsize} messages are waiting for the client to read")

    def _stuck(self, why: str) -> None:
        self.closed = True
        self._on_stuck(why)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            self._sending_since = loop.time()
            try:
                if isinstance(item, bytes):
                    await self._ws.send_bytes(item)
                else:
                    await self._ws.send_text(item)
            except SEND_ERRORS:
                self.closed = True
                return
            self._sending_since = None

    async def _watch(self) -> None:
        """A send under way for ``send_timeout_s``: the client reads nothing. Checked four
        times a timeout (so noticed within 1.25 of it), not armed per message: a timer
        per frame, 50 a second per call, cost more than the send itself at 500 calls."""
        loop = asyncio.get_running_loop()
        while not self._writer.done():
            await asyncio.sleep(self._send_timeout_s / 4)
            since = self._sending_since
            if since is not None and loop.time() - since >= self._send_timeout_s:
                self._writer.cancel()
                self._stuck(f"the client read nothing for {self._send_timeout_s:g} s")
                return

    async def aclose(self) -> None:
        """Let what is queued go out (briefly), then stop the writer."""
        try:
            if not self.closed:
                deadline = asyncio.get_running_loop().time() + _DRAIN_S
                # The message the writer holds too: a client reading slowly (a full socket
                # buffer) still gets the last one, the `hangup`, an instant later.
                while (not self._queue.empty() or self._sending_since is not None) and \
                        not self._writer.done() and \
                        asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)
        finally:  # cancelled while it drains (a shutdown's cancel): nothing outlives us
            self.abort()
        await asyncio.gather(self._writer, self._watchdog, return_exceptions=True)

    def abort(self) -> None:
        """Stop the writer now, whatever is queued."""
        self.closed = True
        self._writer.cancel()
        self._watchdog.cancel()


class CallSession:
    """One connection's call, whatever its wire format."""

    def __init__(self, websocket: WebSocket, settings: Settings, stats: Stats,
                 admission: Admission, transport: str, clock: Clock = SYSTEM_CLOCK) -> None:
        self.ws = websocket
        self.settings = settings
        self.stats = stats
        self.admission = admission
        self.transport = transport
        self.clock = clock
        self.outbox = Outbox(websocket, settings.max_outbound_messages, settings.send_timeout_s,
                             self._client_stuck)
        self.call: Call | None = None
        self._call_task: asyncio.Task[None] | None = None
        self._admitted = False
        self._admit_while_draining = False
        self._awaiting_start = False
        self._rate: AudioRateLimit | None = None
        self._messages: TokenBucket | None = None  # a started call's messages, any kind
        self._start_deadline = asyncio.get_running_loop().time() + settings.start_timeout_s
        self.close_code = CLOSE_NORMAL
        self.errors = 0
        # Bad messages: a burst of bad_message_burst, then max_bad_message_rate a second.
        self._bad_messages = TokenBucket(settings.max_bad_message_rate,
                                         settings.bad_message_burst, clock)
        # and their bytes: each was read whole (up to ws_max_size) before it was refused.
        self._bad_bytes = TokenBucket(settings.max_bad_bytes_rate, settings.bad_bytes_burst,
                                      clock)
        self.done = asyncio.Event()  # set when the session must end (stuck client, failed call)
        self._ended: asyncio.Future[bool] | None = None
        self._receiving: asyncio.Task[Any] | None = None  # the task awaiting a frame
        self._interrupted = False
        # Filled by the endpoint: how an error reaches its client (Twilio has no channel).
        self.send_error: Callable[[dict[str, Any]], None] = lambda event: None

    @property
    def call_id(self) -> str | None:
        return self.call.id if self.call else None

    # ------------------------------------------------------------------ inbound

    async def receive(self) -> dict[str, Any] | None:
        """The next WebSocket message; None once the client has gone or the session ended.

        Until the call has started, waiting is bounded by ``start_timeout_s``. Once it
        has, this is the per-frame path: a plain ``await`` of the socket, interrupted by
        ``_end`` (a cancel of this task) rather than raced against an event, so a frame
        costs no task and no wait set.
        """
        if self.done.is_set():
            return None
        if self.call is None:
            return await self._receive_before_start()
        self._receiving = asyncio.current_task()
        try:
            message = await self.ws.receive()
        except asyncio.CancelledError:
            task = self._receiving
            if self._interrupted and task is not None and task.uncancel() == 0:
                return None  # _end interrupted the wait: the session is over
            raise
        finally:
            self._receiving = None
        if message["type"] == "websocket.disconnect":
            self._gone(message)
            return None
        if self._messages is not None and not self._messages.take():
            rate = self.settings.max_message_rate
            raise ProtocolError("messages_too_fast",
                                f"more than {rate:g} messages a second (beyond a backlog of "
                                f"{rate * STALL_ALLOWANCE_S:g}): send audio in frames of "
                                "10-40 ms, keys and texts as they are typed", CLOSE_POLICY)
        return message

    async def _receive_before_start(self) -> dict[str, Any] | None:
        if self._ended is None:  # one waiter for the whole session, not one per message
            self._ended = asyncio.ensure_future(self.done.wait())
        receive = asyncio.ensure_future(self.ws.receive())
        timeout = max(0.0, self._start_deadline - asyncio.get_running_loop().time())
        try:
            finished, _ = await asyncio.wait({receive, self._ended}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receive.done():
                receive.cancel()
        if receive in finished:
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                self._gone(message)
                return None
            return message
        if not finished:
            raise ProtocolError("start_timeout",
                                f"no `start` within {self.settings.start_timeout_s:g} s",
                                CLOSE_POLICY)
        return None

    def _gone(self, disconnect: dict[str, Any]) -> None:
        """The connection is closed. A 1007 read here is the WebSocket layer's (the session
        reads nothing once it closes the socket itself, whatever its code): uvicorn fails a
        connection whose text message is not UTF-8 with 1007 and no reason (its traceback for
        it is dropped from the log: logs.quiet_invalid_utf8). That is this client's bad
        input: counted and logged here, once, as any other. (A client that closes with 1007
        itself, saying our text was not UTF-8, looks the same here.) So is a 1009: uvicorn's
        refusal of a message over ``ws_max_size``, on its header (the payload is never read),
        counted as ``frame_too_large``, the code a smaller oversized message gets (a client
        closing with 1009 itself, our message too big for it, looks the same)."""
        self.outbox.closed = True
        if disconnect.get("code") == CLOSE_TOO_BIG:
            # A message over ws_max_size: refused on its frame header, its payload never read.
            self.bad_input(ProtocolError(
                "frame_too_large", f"a message over {self.settings.ws_max_size} bytes "
                                   "(ws_max_size): the WebSocket layer closed the connection "
                                   "without reading it", CLOSE_TOO_BIG))
        elif disconnect.get("code") == CLOSE_INVALID_PAYLOAD:
            self.bad_input(ProtocolError(
                "invalid_utf8", "a text message was not valid UTF-8 (RFC 6455 requires text "
                                "to be): the WebSocket layer closed the connection",
                CLOSE_INVALID_PAYLOAD))

    def _end(self) -> None:
        """The session must end (stuck client, failed call): wake the receiving loop."""
        self.done.set()
        if self._receiving is not None and not self._interrupted:
            self._interrupted = True
            self._receiving.cancel()

    def hold_drain_until_start(self) -> None:
        """For a client that cannot retry (a Twilio stream: refused, its phone call is
        dropped). An upgrade while draining is refused with HTTP 503 (the balancer retries
        it); a stream upgraded before the drain began is this replica's call: its `start`
        is admitted even while draining, and the drain counts it until then."""
        self._admit_while_draining = True
        if not self._awaiting_start:
            self._awaiting_start = True
            self.admission.awaiting_start += 1

    def _leave(self) -> None:
        """The call is over: its start hold and its max_calls slot freed, once."""
        self._release_start_hold()
        if self._admitted:
            self._admitted = False
            self.admission.leave()
        if self._ended is not None:
            self._ended.cancel()

    def _release_start_hold(self) -> None:
        if self._awaiting_start:
            self._awaiting_start = False
            self.admission.awaiting_start = max(0, self.admission.awaiting_start - 1)

    def start_call(self, build: Callable[[], Call]) -> Call:
        """Admit and start the call ``build`` makes. Raises ``draining``, ``too_many_calls``."""
        self._release_start_hold()  # from here the call is counted as active, or refused
        if self.admission.draining and not self._admit_while_draining:
            raise ProtocolError("draining",
                                "this replica is shutting down and takes no new calls; "
                                "retry (the balancer sends you to another replica)",
                                CLOSE_TRY_AGAIN_LATER)
        if not self.admission.try_enter():
            raise ProtocolError("too_many_calls",
                                f"this gateway is at its limit of {self.admission.limit} "
                                "concurrent calls; retry shortly or use another replica",
                                CLOSE_TRY_AGAIN_LATER)
        self._admitted = True
        call = build()
        self.call = call
        self._rate = AudioRateLimit(call.sample_rate, self.settings.max_audio_rate,
                                    self.settings.audio_rate_grace_s, self.clock,
                                    max_frame_bytes=self.settings.max_frame_bytes)
        rate = self.settings.max_message_rate
        self._messages = TokenBucket(rate, rate * STALL_ALLOWANCE_S, self.clock)
        self._call_task = asyncio.create_task(call.run(), name=f"vg-call-{call.id}")
        self._call_task.add_done_callback(self._call_done)
        return call

    def feed_audio(self, pcm16: bytes) -> None:
        """Caller audio (pcm16 at the call's rate) for the started call."""
        assert self.call is not None and self._rate is not None
        if self._rate.add(len(pcm16)):
            raise ProtocolError("audio_too_fast",
                                f"audio arrives faster than {self.settings.max_audio_rate:g}x "
                                f"real time for over {self.settings.audio_rate_grace_s:g} s "
                                f"({self._rate.described()}); {self._pace_advice()}",
                                CLOSE_POLICY)
        if self._rate.off_pace():
            self.bad_input(ProtocolError(
                "audio_pace_mismatch",
                f"audio has kept arriving at {self._rate.described(found=True)}, "
                f"{self._rate.pace_fault()}: the call goes on, but it will not be understood; "
                f"{self._pace_advice()}"))
        self.call.feed_audio(pcm16)

    def _pace_advice(self) -> str:
        """What a client whose audio runs past real time should do. The commonest cause is
        no client racing but a native `start` whose sample_rate is not the audio's (48 kHz
        audio sent as 16000 is 3x, 16 kHz sent as 8000 is 2x), streamed at the pace spoken."""
        if self.transport == "native":
            return ("`start` must give the audio's own sample_rate, and audio be streamed at "
                    "the pace it is spoken")
        return "stream it at the pace it is spoken"

    def feed_dtmf(self, digit: str) -> None:
        """A keypad key (already checked by the endpoint's parser)."""
        assert self.call is not None
        try:
            self.call.feed_dtmf(digit)
        except asyncio.QueueFull:
            raise ProtocolError("too_many_messages", "too many keypad presses are waiting; "
                                                     "this one was dropped") from None

    def feed_text(self, text: str, final: bool) -> None:
        assert self.call is not None
        try:
            self.call.feed_text(text, final)
        except asyncio.QueueFull:
            raise ProtocolError("too_many_messages",
                                f"{self.settings.max_queued_texts} text messages are already "
                                "waiting; this one was dropped") from None

    # ------------------------------------------------------------------ failures

    def bad_input(self, exc: ProtocolError, message: dict[str, Any] | None = None) -> None:
        """Count a bad message, tell the client, log the first few of this connection.
        ``message``: the WebSocket message refused, whose bytes count against the budget."""
        self.errors += 1
        self.stats.error(exc.code)
        if self.errors <= self.settings.max_logged_errors:
            logs.event(log, "bad_input", logging.WARNING, transport=self.transport,
                       code=exc.code, detail=exc.message[:200], call_id=self.call_id)
        self.send_error(exc.event())
        if exc.close_code is not None:
            self.close_code = exc.close_code
        else:
            counted = self._bad_messages.take()
            sized = self._bad_bytes.take(message_bytes(message)) if message else True
            if not counted:
                s = self.settings
                self._flooded(f"more than {s.bad_message_burst} bad messages, then over "
                              f"{s.max_bad_message_rate:g} a second")
            elif not sized:
                s = self.settings
                self._flooded(f"bad messages of more than {_size(s.bad_bytes_burst)} in all, "
                              f"then over {_size(s.max_bad_bytes_rate)} a second (each was "
                              "read whole before it was refused)")

    def _flooded(self, why: str) -> None:
        """Bad messages faster (or bigger) than any client with a bug sends them: a flood,
        which costs every call on this replica the event loop's time (and its memory, for
        messages read whole). The connection is closed."""
        flood = ProtocolError(
            "too_many_bad_messages",
            f"{why}: the connection is closed (the errors before this one said what was "
            "wrong)", CLOSE_POLICY)
        self.stats.error(flood.code)
        logs.event(log, "bad_input_flood", logging.WARNING, transport=self.transport,
                   errors=self.errors, call_id=self.call_id)
        self.send_error(flood.event())
        self.close_code = CLOSE_POLICY
        self._end()

    def _client_stuck(self, why: str) -> None:
        self.stats.error("client_not_reading")
        logs.event(log, "client_not_reading", logging.WARNING, transport=self.transport,
                   detail=why, call_id=self.call_id)
        self.close_code = CLOSE_POLICY
        self._end()

    def input_stopped(self, code: str, detail: str) -> None:
        """The client's input stopped though its connection looks open (a Twilio stream
        with no media): counted, logged and closed (1011). The call is not hung up: a line
        that can resume it on a new connection does."""
        self.stats.error(code)
        logs.event(log, code, logging.WARNING, transport=self.transport, detail=detail,
                   call_id=self.call_id)
        self.close_code = CLOSE_INTERNAL_ERROR
        self._end()

    def _call_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is None:
            if self.call is not None and self.call.ended is not None:
                self._end()  # the bot hung up (idle): close the connection normally
            return
        self.failed(task.exception())

    def failed(self, exc: BaseException | None) -> None:
        """The call (or its start: building it, on the endpoint's receive loop) failed inside
        the gateway, no fault of the client's: logged with its traceback, counted, reported
        and closed (1011), whichever transport and whenever it happened."""
        log.error("call_failed", exc_info=exc,
                  extra={"fields": {"call_id": self.call_id, "transport": self.transport}})
        self.stats.error("internal_error")
        self.send_error({"type": "error", "code": "internal_error",
                         "message": "the call failed inside the gateway"})
        self.close_code = CLOSE_INTERNAL_ERROR
        self._end()

    # ------------------------------------------------------------------ end

    async def close(self) -> None:
        """End the call (if any), flush briefly and close the socket; safe to call twice."""
        # Held for the drain until the socket is closed, not only until the slot is freed:
        # the client gets its last messages and our close code, not uvicorn's 1012.
        self.admission.closing += 1
        try:
            await self._close()
        finally:
            self.admission.closing -= 1

    async def _close(self) -> None:
        if self.call is not None:
            self.call.stop()
        task, self._call_task = self._call_task, None
        try:
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        except asyncio.CancelledError:
            # The server's cancel at the end of its shutdown grace, while the call closed
            # its stages: the outbox's tasks are stopped and (below) the slot freed all the
            # same (the shutdown waits for max_calls' count to fall; nothing outlives us).
            self.outbox.abort()
            raise
        finally:
            self._leave()
        if self.errors > self.settings.max_logged_errors:
            logs.event(log, "bad_input_not_logged", logging.WARNING, transport=self.transport,
                       call_id=self.call_id, count=self.errors - self.settings.max_logged_errors)
        await self.outbox.aclose()
        try:
            # Bounded whatever ended the call: a client that stopped reading blocks the
            # close frame too, and the call may end (its stop, a bad frame) before the
            # outbox's watchdog has found it stuck.
            async with asyncio.timeout(_DRAIN_S):  # not wait_for: it can swallow a cancel
                await self.ws.close(code=self.close_code)
        except (*SEND_ERRORS, TimeoutError):
            pass


async def refuse_while_unavailable(websocket: WebSocket, stats: Stats | None,
                                   overload_refuses: bool = True) -> bool:
    """A draining replica, one whose models are still loading, or one too far behind on its
    calls (gateway/overload.py), answers the upgrade with HTTP 503 (a balancer retries it on
    another replica; past a 101 it could not); True when it did. ``overload_refuses``
    False (a Twilio stream): an overloaded replica takes it anyway. Its upgrade cannot say
    whether it resumes a live call (Twilio's stream URL takes no query), and a refused one
    is reconnected at once, refused again within the same seconds and, past
    MAX_STREAM_RECONNECTS, handed off or hung up: a phone call already answered is kept,
    late, rather than dropped."""
    services = websocket.app.state.services
    if services.admission.draining:
        code, message = "draining", "this replica is shutting down; use another"
    elif not services.ready:
        code, message = "not_ready", "models are still loading; retry shortly or use another"
    elif overload_refuses and services.overload.overloaded:
        services.overload.refused += 1
        code, message = "overloaded", ("this replica is behind on the calls it has and takes "
                                       "no new one until it catches up; retry shortly or use "
                                       "another")
    else:
        return False
    if stats is not None:
        stats.error(code)
    logs.denial_sent()  # so logs.quiet_denial_handshake_error drops uvicorn's spurious line
    await websocket.send_denial_response(JSONResponse(
        {"error": code, "message": message}, status_code=503, headers={"retry-after": "1"}))
    return True


async def refuse_before_accept(websocket: WebSocket, why: str, stats: Stats | None,
                               code: str) -> None:
    """Close the handshake (the client gets HTTP 403) and count why."""
    if stats is not None:
        stats.error(code)
    logs.event(log, code, logging.WARNING, detail=why)
    await websocket.close(code=CLOSE_POLICY)

