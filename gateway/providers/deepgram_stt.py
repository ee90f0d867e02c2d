"""Deepgram live streaming recognition through the official ``deepgram-sdk``.

One WebSocket per call (``/v1/listen``, linear16 mono, interim results on). Mapping
onto ``STTStream``:

- interim ``Results`` (``is_final: false``): a partial (finalized segments so far + the interim).
- ``Results`` with ``is_final: true``: the segment is committed to the utterance;
  ``speech_final: true`` or an ``UtteranceEnd`` marks Deepgram's endpoint. An
  ``UtteranceEnd`` never commits the interim: it marks a gap after the last finalized
  word, so an interim pending then is of newer words, which their own final (or the
  Finalize reply) commits; committed twice, they would be said twice. Such an
  ``UtteranceEnd``, or one of words before the cut (or before the caller spoke again),
  arriving late, is ignored: no endpoint of the words under way.
- ``speech_paused()`` (the caller paused): the words so far once Deepgram endpoints after
  them (``speech_final``: every word final), the early transcript the engine routes before
  the turn ends; ``speech_resumed()`` makes an endpoint so far stale. No endpoint within
  ``early_timeout_s`` (on the stream's ``clock``; by default the endpointing silence plus
  ``ENDPOINT_DELAY_S``): no early words (the turn waits its silence).
- ``finalize()``: if Deepgram has already endpointed with nothing pending, the committed
  text is returned at once; otherwise a ``Finalize`` message flushes the server and the
  reply marked ``from_finalize`` completes the transcript. Each finalize waits for its own
  reply (a next one may be cut before it arrives): a result is the utterance's whose audio
  it ends in, and Deepgram answers Finalize messages in order, so a ``from_finalize``
  reply also completes any earlier finalize still waiting. No reply within
  ``finalize_timeout_s`` (on the stream's ``clock``): Deepgram does not promise one (none
  when too little audio is buffered: a turn cut after every word was final, the caller's
  noise), so the live socket is then sent a WebSocket ping. A pong within
  ``ping_timeout_s`` (the stream's ``clock``): the socket is alive and kept, and the words
  so far are the final (an utterance with no word at all is an empty final, as a reply
  with no words is). No pong in
  time, or no live socket (its handshake hangs): it has stalled, and is dropped and
  reopened like a failed one; the utterance then fails (``ProviderError``: the call
  apologises), never an empty final (a caller who spoke would hear nothing) nor the words
  heard before the stall (the audio after it never reached the service: they may be only
  the start of the question). The SDK has no public way to the connection to ping (``_websocket``); a
  socket client without it is taken for a stalled one, as before there was a ping.
- ``KeepAlive`` is sent when no audio has gone out for ``keepalive_s`` (Deepgram closes
  an idle socket after about 10 s); ``aclose()`` sends ``CloseStream`` and waits up to
  2 s (on the stream's ``clock``) for the server's last results and its close. With no
  live socket open (the first handshake, or a reopen's backoff or handshake) there is
  nothing to flush: the stream ends at once.
- A socket ended from our side (that wait over, or dropped as stalled) is cut at once
  (TCP abort): websockets' own close handshake waits ``close_timeout`` (10 s) a step for a
  peer gone dead, about 30 s in all, and a call's teardown or a reopen would wait with it.
- A socket that fails (dropped by the service or the network) is reopened, after
  ``reconnect_s`` doubling to 5 s (starting over after a socket that stayed open 5 s of
  the ``clock``: it worked, its failure is a new one); audio meanwhile is refused. The utterance that lost
  audio to it, or had audio refused meanwhile (its start: the rest alone would be answered
  as the question), fails at its ``finalize()`` (the call apologises), and the next one is
  recognised on the new socket. A refused connection (HTTP 4xx: a wrong key) is final,
  but for 429 (too many concurrent streams) and 408, which are retried the same way.
  Audio that cannot go out yet (a handshake slow to answer) queues, up to
  ``_OUTBOX_LIMIT`` messages; audio refused past that fails its utterance the same way.

Results that end before the last finalize/reset (audio time) are dropped, so a late
reply for an old utterance never leaks into the next one.

A malformed message (the SDK builds its models unchecked: a ``Results`` with no
``channel``, alternatives that are not a list, a ``start`` that is not a number; or a
message it matches to no type, which it yields as None) is dropped alone and logged
(``deepgram_malformed_message``: its type and the field, at most once per
``_MALFORMED_LOG_EVERY_S`` a type and field); the socket goes on. A dropped interim's words
come again in the next result; a final's never do, so its utterance fails as one whose
audio was lost does (the turn apologises rather than answer part of a question). Text
that is not JSON never reaches us: the SDK skips it with a warning of its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable

from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment

from gateway.clock import SYSTEM_CLOCK, Clock, Expired, deadline
from gateway.providers.base import ProviderError, Transcript, drop_queued_partials
from gateway.settings import Settings
from .. import logs

log = logging.getLogger("voicegate.deepgram")

NAME = "deepgram"
_OUTBOX_LIMIT = 1000  # 20 s of 20 ms frames waiting for a connection that does not come
_EPSILON_S = 0.02
_RECONNECT_MAX_S = 5.0
_CLOSE_WAIT_S = 2.0  # aclose: the server's last results after CloseStream, then its close
_RETRIED_STATUSES = (408, 429)  # refused handshakes worth another try (other 4xx are final)
_MALFORMED_LOG_EVERY_S = 10.0  # a service sending garbage logs one line a kind this often


class DeepgramStream:
    """``STTStream`` over one live WebSocket. Create it inside a running event loop."""

    def __init__(self, client: AsyncDeepgramClient, options: dict[str, Any], sample_rate: int,
                 finalize_timeout_s: float, keepalive_s: float, early_timeout_s: float,
                 reconnect_s: float = 0.5, clock: Clock = SYSTEM_CLOCK,
                 ping_timeout_s: float = 0.5) -> None:
        self._client = client
        # The Finalize replies' and the early words' deadlines (a test's ManualClock).
        self._clock = clock
        self._reconnect_s = reconnect_s
        self._early_timeout_s = early_timeout_s
        self._options = options
        self._sample_rate = sample_rate
        self._finalize_timeout_s = finalize_timeout_s
        # An unanswered Finalize: a socket whose pong takes longer than this has stalled.
        self._ping_timeout_s = ping_timeout_s
        self._keepalive_s = keepalive_s
        self._outbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._partials: asyncio.Queue[Transcript | None] = asyncio.Queue()
        self._committed: list[str] = []
        self._interim = ""
        self._last_partial = ""
        self._endpointed = False
        self._sent_s = 0.0  # audio time sent on this stream (over every socket)
        self._offset_s = 0.0  # stream audio time at which the current socket's audio starts
        self._connected = False
        self._socket: Any = None  # the SDK's socket client while a live socket is open
        self._sockets = 0  # live sockets opened so far
        self._heard = 0  # messages received so far (over every socket)
        self._socket_task: asyncio.Task[tuple[ProviderError | None, bool]] | None = None
        self._opened_at: float | None = None  # when the current socket opened (clock time)
        self._stalled: ProviderError | None = None  # why _drop_socket ended the socket
        # Why the current utterance lost audio (to a failed socket), if it did.
        self._lost: ProviderError | None = None
        self._cut_s = 0.0  # audio time of the last finalize/reset
        self._resumed_s = 0.0  # audio time the caller last spoke again after a pause
        self._early_task: asyncio.Task[Transcript] | None = None  # the pause's early words
        # Utterances cut by finalize() whose Finalize reply is still on its way, oldest
        # first (a caller's next utterance may end before the last one's reply arrives).
        self._closings: list[_Closing] = []
        self._error: ProviderError | None = None
        self._closing = False
        self._malformed_logs = logs.Throttle(_MALFORMED_LOG_EVERY_S)
        self.endpoint = asyncio.Event()  # set on speech_final / UtteranceEnd (optional for callers)
        self._runner = asyncio.create_task(self._run(), name="deepgram-stream")

    # ------------------------------------------------------------ STTStream API

    async def send_audio(self, pcm16: bytes) -> None:
        if self._error is not None:
            # Refused: this utterance's words are incomplete, whether audio of it went out
            # before (mid-utterance) or not (its start, while the socket reopens: what comes
            # after would be recognised, and answered, as if it were the whole question).
            self._lost = self._error
        self._check()
        if self._outbox.qsize() >= _OUTBOX_LIMIT:
            # Refused too: what goes out of this utterance, once the socket drains, has a
            # piece cut out (answered, it would be answered as the whole question).
            self._lost = ProviderError(NAME, "audio is not draining: the live socket is not "
                                             "connected")
            raise self._lost
        self._outbox.put_nowait(pcm16)
        self._sent_s += len(pcm16) / 2 / self._sample_rate

    def finalize(self) -> Awaitable[Transcript]:
        """Cut the utterance now (audio sent later is the next one's); await its final."""
        if self._lost is not None:  # its audio went to a socket that failed: words lost
            lost, self._lost = self._lost, None
            self._start_utterance()
            raise lost
        try:
            self._check()
        except ProviderError:
            self._start_utterance()  # this turn fails; the next one's words start here
            raise
        pending = self._interim or self._utterance_has_audio()
        flush = pending and not (self._endpointed and not self._interim)
        closing = _Closing(committed=list(self._committed), interim=self._interim,
                           start_s=self._cut_s, cut_s=self._sent_s, heard=self._heard)
        self._start_utterance()
        if flush:
            closing.done = asyncio.get_running_loop().create_future()
            self._closings.append(closing)
            self._outbox.put_nowait("Finalize")
        return self._final(closing)

    async def _final(self, closing: "_Closing") -> Transcript:
        answered = alive = True
        try:
            if closing.done is not None:
                try:
                    async with deadline(self._clock, self._finalize_timeout_s):
                        await asyncio.shield(closing.done)
                except Expired:
                    # Deepgram does not promise a reply (none for too little audio to
                    # process): is the socket alive? (Its reply, late, still completes this.)
                    alive = await self._answers_ping()
                    answered = closing.done.done()
        finally:
            self._closings = [other for other in self._closings if other is not closing]
        self._check()
        if closing.lost is not None:
            raise closing.lost
        text = closing.text()
        if not answered:
            self._unanswered(closing, text, alive)
        return Transcript(text=text, final=True)

    def _unanswered(self, closing: "_Closing", text: str, alive: bool) -> None:
        """No reply to the Finalize of ``closing`` in time. On a socket that answered a ping
        the words so far are the final, an empty one (the caller's noise) included. One that
        did not is dropped (reopened for the next utterance), and the utterance fails, as
        one whose socket failed does: never an empty final (a caller who spoke would hear
        nothing), nor the words heard before the stall (the audio after it never reached
        the service: they may be only the start of the question)."""
        waited = f"{self._finalize_timeout_s:g} s"
        logs.event(log, "deepgram_finalize_late", logging.WARNING, after_s=self._finalize_timeout_s,
                   words=bool(text), silent=self._heard == closing.heard, alive=alive)
        if alive:
            return
        self._drop_socket(ProviderError(NAME, f"no reply within {waited} of Finalize: the "
                                              "live socket is not answering"))
        raise ProviderError(NAME, f"no final transcript within {waited} of Finalize; the "
                                  "live socket is not answering")

    async def _answers_ping(self) -> bool:
        """The live socket answers a WebSocket ping within ``ping_timeout_s`` (on the
        stream's ``clock``). False with no live socket (failed, reopening) or none to ping."""
        connection = _websocket(self._socket) if self._connected else None
        if connection is None:
            return False
        try:
            async with deadline(self._clock, self._ping_timeout_s):
                # Sending may wait too: a peer that reads nothing fills the socket's buffer.
                pong = await connection.ping()
                await asyncio.shield(pong)
        except Expired:
            return False
        except Exception:  # closed meanwhile (ConnectionClosed), or not a connection at all
            return False
        return True

    def _drop_socket(self, error: ProviderError) -> None:
        """End the live socket (or its handshake) as failed with ``error``: audio is refused
        until ``_run`` has reopened it."""
        task = self._socket_task
        if task is None or task.done() or self._stalled is not None or self._closing:
            return
        self._stalled = self._error = error
        task.cancel()

    def speech_paused(self) -> Awaitable[Transcript]:
        """The caller paused: the words so far, once Deepgram has endpointed after them.
        A task, so it runs (and ends) even if the engine drops the pause unawaited."""
        self._drop_early()
        self._early_task = asyncio.ensure_future(self._early())
        return self._early_task

    def _drop_early(self) -> None:
        if self._early_task is not None:
            self._early_task.cancel()
            self._early_task = None

    def speech_resumed(self) -> None:
        """The caller speaks again: an endpoint so far is not the end of these words."""
        self._drop_early()
        self._forget_endpoint()
        # An endpoint of the audio before this, arriving late, is not one of these words.
        self._resumed_s = self._sent_s

    async def _early(self) -> Transcript:
        self._check()
        # TimeoutError (Expired): no early words; the engine lets the silence decide.
        async with deadline(self._clock, self._early_timeout_s):
            await self.endpoint.wait()
        self._check()
        return Transcript(text=self._text(), final=False)

    def partials(self) -> AsyncIterator[Transcript]:
        return self._iter_partials()

    async def reset(self) -> None:
        if self._utterance_has_audio():
            self._outbox.put_nowait("Finalize")  # flush the server; its reply is dropped by time
        self._start_utterance()

    async def aclose(self) -> None:
        self._drop_early()
        if self._closing:
            await asyncio.gather(self._runner, return_exceptions=True)
            return
        self._closing = True
        if not self._connected:
            # No live socket (reopening: in its backoff, or a handshake that may never come):
            # nothing to flush, no server to wait for. A call that hung up lets go now.
            self._runner.cancel()
        elif not self._runner.done():
            self._outbox.put_nowait("CloseStream")
            self._outbox.put_nowait(None)
            # The server answers CloseStream with its last results and Metadata, then
            # closes; one that does not in time is cut (_connection aborts the socket).
            try:
                async with deadline(self._clock, _CLOSE_WAIT_S):
                    await asyncio.wait({self._runner})
            except Expired:
                self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)

    @property
    def closed(self) -> bool:
        return self._closing or self._runner.done()

    @property
    def connected(self) -> bool:
        """A live socket is open (False while a failed one is being reopened)."""
        return self._connected

    # ------------------------------------------------------------ internals

    async def _iter_partials(self) -> AsyncIterator[Transcript]:
        while True:
            item = await self._partials.get()
            if item is None:
                return
            yield item

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise ProviderError(NAME, "stream is closed")

    def _text(self) -> str:
        return " ".join(part for part in (*self._committed, self._interim) if part)

    def _start_utterance(self) -> None:
        self._drop_early()
        # A loss is the utterance's it happened to (finalize raises it; reset drops it with
        # its utterance): kept, it would fail the next one, recognised whole.
        self._lost = None
        self._committed = []
        self._interim = ""
        self._last_partial = ""
        self._forget_endpoint()
        drop_queued_partials(self._partials)
        self._cut_s = self._resumed_s = self._sent_s

    async def _run(self) -> None:
        backoff = self._reconnect_s
        try:
            while not self._closing:
                self._opened_at = None
                failure, final = await self._socket_connection()
                if failure is None or self._closing:
                    return
                opened = self._opened_at
                if opened is not None and self._clock.now() - opened >= _RECONNECT_MAX_S:
                    # That socket worked a while: this failure is a new one, and the wait
                    # (audio refused meanwhile) starts over, not at the last one's double.
                    backoff = self._reconnect_s
                self._error = failure
                if self._utterance_has_audio():
                    self._lost = failure  # the utterance under way lost audio with it
                logs.event(log, "deepgram_stream_ended", logging.WARNING, error=str(failure),
                           reconnect_s=None if final else backoff)
                self._release_final()
                if final:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX_S)
        finally:
            self._release_final()
            self._partials.put_nowait(None)

    def _utterance_has_audio(self) -> bool:
        return self._sent_s > self._cut_s + _EPSILON_S

    def _release_final(self) -> None:
        """The finals waiting for their Finalize replies get what they have: no reply will come."""
        for closing in self._closings:
            closing.finish()

    async def _socket_connection(self) -> tuple[ProviderError | None, bool]:
        """``_connection`` in a task of its own, which ``_drop_socket`` may cancel."""
        task = asyncio.create_task(self._connection(), name="deepgram-socket")
        self._socket_task = task
        try:
            await asyncio.wait({task})
        finally:
            if not task.done():  # the stream itself is cancelled (aclose)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self._socket_task = None
        stalled, self._stalled = self._stalled, None
        if task.cancelled():
            return stalled or ProviderError(NAME, "the live socket was cancelled"), False
        return task.result()

    async def _connection(self) -> tuple[ProviderError | None, bool]:
        """One live socket, until it ends: (why it failed, whether that is final), or
        (None, True) when it was closed by ``aclose``."""
        try:
            async with self._client.listen.v1.connect(**self._options) as socket:
                if self._sockets:
                    # Reopened: what was queued for the dead socket is stale (its audio is
                    # lost: that utterance fails at its final), and this socket's clock
                    # starts at zero. (The first socket sends what queued before it opened.)
                    while not self._outbox.empty():
                        self._outbox.get_nowait()
                    self._offset_s = self._sent_s
                self._sockets += 1
                self._error = None
                self._socket, self._connected = socket, True
                self._opened_at = self._clock.now()
                sender = asyncio.create_task(self._send_loop(socket), name="deepgram-send")
                try:
                    async for message in socket:
                        self._on_message(message)
                except asyncio.CancelledError:
                    # Dropped as stalled, or closed and past its wait: the peer has had
                    # its chance. Leaving `async with` runs websockets' close handshake,
                    # ~30 s on a dead peer; cut the connection so it returns at once.
                    _abort(socket)
                    raise
                finally:
                    self._socket, self._connected = None, False
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                if self._closing:
                    return None, True
                return self._error or ProviderError(NAME, "the live socket was closed by the "
                                                          "server"), False
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            # Never str(exc): its headers are the request's, including the key.
            # A wrong key stays wrong; 429 (the account's concurrent streams all in use: a
            # burst of calls) and 408 say "not now": a call begun then is not deaf for good.
            status = exc.status_code or 0
            final = 400 <= status < 500 and status not in _RETRIED_STATUSES
            return ProviderError(NAME, f"connection refused: HTTP {exc.status_code}: "
                                       f"{exc.body}"), final
        except Exception as exc:
            return ProviderError(NAME, f"live socket failed: {type(exc).__name__}: {exc}"), False

    async def _send_loop(self, socket: Any) -> None:
        try:
            await self._send_items(socket)
        except Exception as exc:  # the socket closed under us; the receive loop reports it
            logs.event(log, "deepgram_send_stopped", error=type(exc).__name__)

    async def _send_items(self, socket: Any) -> None:
        outbox = self._outbox
        while True:
            if outbox.empty():
                try:
                    # asyncio.timeout, not wait_for: no task per item on the audio path.
                    async with asyncio.timeout(self._keepalive_s):
                        item = await outbox.get()
                except TimeoutError:
                    await socket.send_keep_alive()
                    continue
            else:
                item = outbox.get_nowait()
            if item is None:
                return
            if isinstance(item, bytes):
                # Windows queued meanwhile go out as one message of up to 100 ms: fewer
                # WebSocket frames (Deepgram takes 20-250 ms chunks), never later ones.
                limit = self._sample_rate // 5  # bytes of 100 ms of pcm16
                while len(item) < limit and not outbox.empty() and \
                        isinstance(outbox._queue[0], bytes):  # type: ignore[attr-defined]
                    item += outbox.get_nowait()
                await socket.send_media(item)
            elif item == "Finalize":
                await socket.send_finalize()
            elif item == "CloseStream":
                await socket.send_close_stream()

    def _on_message(self, message: Any) -> None:
        self._heard += 1  # even a malformed one: the socket is alive
        kind = getattr(message, "type", None)
        try:
            if kind == "Results":
                self._on_results(_Result.of(message))
            elif kind == "UtteranceEnd":
                last_word_end = getattr(message, "last_word_end", None)
                self._on_utterance_end(None if last_word_end is None
                                       else _seconds(last_word_end, "last_word_end"))
            elif kind == "Error":
                error = ProviderError(NAME, f"{message.variant}: {message.description}")
                self._error = error
                # The socket is done for: cut and reopened as a stalled one is. Left open
                # (its KeepAlives keep it so), it would refuse every window for good.
                self._drop_socket(error)
            elif message is None:  # the SDK matched it to no message type it knows
                raise _Malformed("type")
            # Metadata, SpeechStarted: nothing to map.
        except _Malformed as exc:
            # One bad message costs that message, never the socket (and the utterance's
            # audio with it). An interim's words come again in the next result; a final's
            # never do: its utterance fails rather than be answered without them.
            self._malformed(message, kind, exc)
            if kind == "Results" and getattr(message, "is_final", None):
                self._lose_words(exc)

    def _lose_words(self, exc: "_Malformed") -> None:
        """A final result could not be read: the words it committed are lost. They are the
        cut utterance's when one waits for its Finalize reply (the reply itself, likeliest),
        else the utterance's under way."""
        lost = ProviderError(NAME, f"a final result was malformed ({exc.field}): words of "
                                   f"the utterance are lost")
        # Replies come in the order of the Finalize messages: the oldest still waiting.
        closing = next((c for c in self._closings if c.done is not None and not c.done.done()),
                       None)
        if closing is not None:
            closing.lost = lost
            closing.finish()  # no readable reply will complete it
        elif self._utterance_has_audio():
            self._lost = lost

    def _malformed(self, message: Any, kind: str | None, exc: "_Malformed") -> None:
        held = self._malformed_logs.admit(f"{kind}.{exc.field}", self._clock.now())
        if held is not None:  # the field and the value's type, never the message's words
            logs.event(log, "deepgram_malformed_message", logging.WARNING, message_type=kind,
                       field=exc.field, got=exc.got,
                       is_final=getattr(message, "is_final", None), held_back=held)

    def _on_utterance_end(self, last_word_end: float | None) -> None:
        audio_s = self._sent_s if last_word_end is None else self._offset_s + last_word_end
        if audio_s <= self._resumed_s or self._interim:
            # The end of words before the cut (or before the caller spoke again), or a gap
            # after the last finalized word with an interim pending: that interim is of
            # later words (the caller went on), which their own final (or the Finalize
            # reply) commits. It is never committed here: its words would be said twice
            # ("what what are your opening hours"), and a cut then would ask no Finalize
            # for the words after it. Nor is it an endpoint of those words.
            return
        self._mark_endpoint(audio_s)

    def _on_results(self, result: "_Result") -> None:
        # The socket's audio time, on the stream's clock (a reopened socket starts at 0).
        end_s = self._offset_s + result.start_s + result.duration_s
        text = result.text
        if end_s <= self._cut_s + _EPSILON_S:
            # Audio of an utterance already cut: it completes the one being finalized whose
            # audio it is, or (the reply to a reset's Finalize) is dropped; never leaks into
            # the next one.
            for index, closing in enumerate(self._closings):
                if closing.start_s + _EPSILON_S < end_s <= closing.cut_s + _EPSILON_S:
                    closing.add(text, result.is_final)
                    if result.from_finalize:
                        # Deepgram answers Finalize messages in order: this reply is the
                        # last of any earlier one's too (which may send no from_finalize).
                        for answered in self._closings[:index + 1]:
                            answered.finish()
                    break
            return
        if result.is_final:
            if text:
                self._committed.append(text)
            self._interim = ""
            if result.speech_final:
                self._mark_endpoint(end_s)
        else:
            self._interim = text
            if text:  # the caller is still (or again) speaking
                self._forget_endpoint()
        partial = self._text()
        if partial and partial != self._last_partial:
            self._last_partial = partial
            self._partials.put_nowait(Transcript(text=partial, final=False))

    def _forget_endpoint(self) -> None:
        self._endpointed = False
        self.endpoint.clear()

    def _mark_endpoint(self, audio_s: float) -> None:
        """Deepgram endpointed at ``audio_s`` (stream audio time); stale (ignored) when the
        caller has spoken again since."""
        if audio_s <= self._resumed_s:
            return
        self._endpointed = True
        self.endpoint.set()


def _websocket(socket: Any) -> Any:
    """The websockets connection under the SDK's socket client, or None. deepgram-sdk
    7.17.0 (checked with websockets 17.4: its legacy client protocol) has no public way to
    it; ``AsyncV1SocketClient`` keeps it in ``_websocket``. Should a later SDK drop that
    attribute, the callers fall back: an unanswered Finalize drops the socket as stalled
    (no ping), and an abort leaves the socket to websockets' own (slow) close."""
    return getattr(socket, "_websocket", None)


def _abort(socket: Any) -> None:
    """Close the TCP connection under the SDK's socket now, without a close handshake.
    (The SDK's connect() takes no close_timeout; without the transport, the slow close.)"""
    transport = getattr(_websocket(socket), "transport", None)
    if transport is not None:
        transport.abort()


class _Malformed(Exception):
    """A message from the service lacks ``field`` or has a value of the wrong type there."""

    def __init__(self, field: str, value: Any = None) -> None:
        super().__init__(field)
        self.field = field
        self.got = type(value).__name__


def _seconds(value: Any, field: str) -> float:
    """``value`` of ``field``, a finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise _Malformed(field, value)
    return float(value)


@dataclass(frozen=True)
class _Result:
    """A ``Results`` message, checked: every field ``_on_results`` reads, of its type."""

    start_s: float  # audio time of the socket
    duration_s: float
    text: str  # the first alternative's transcript
    is_final: bool
    speech_final: bool
    from_finalize: bool

    @classmethod
    def of(cls, message: Any) -> "_Result":
        """Raises ``_Malformed`` (before the stream has changed) for a field it cannot read."""
        channel = getattr(message, "channel", None)
        if channel is None:
            raise _Malformed("channel")
        alternatives = getattr(channel, "alternatives", None)
        if not isinstance(alternatives, list):
            raise _Malformed("channel.alternatives", alternatives)
        text = ""
        if alternatives:
            text = getattr(alternatives[0], "transcript", None)
            if not isinstance(text, str):
                raise _Malformed("channel.alternatives[0].transcript", text)
        # The SDK has already made booleans of the flags (absent: None).
        return cls(start_s=_seconds(getattr(message, "start", None), "start"),
                   duration_s=_seconds(getattr(message, "duration", None), "duration"),
                   text=text.strip(),
                   is_final=bool(message.is_final), speech_final=bool(message.speech_final),
                   from_finalize=bool(message.from_finalize))


@dataclass
class _Closing:
    """An utterance cut by ``finalize``, completed by Deepgram's reply to Finalize."""

    committed: list[str]
    interim: str
    start_s: float  # audio time of the cut before it: older results are not its own
    cut_s: float
    heard: int = 0  # the stream's messages received when it was cut
    done: asyncio.Future[None] | None = None
    lost: ProviderError | None = None  # a final result of it could not be read

    def add(self, text: str, is_final: bool) -> None:
        if is_final:
            if text:
                self.committed.append(text)
            self.interim = ""
        else:
            self.interim = text

    def finish(self) -> None:
        """Its reply is in (or will not come): ``finalize`` returns what it has."""
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def text(self) -> str:
        return " ".join(part for part in (*self.committed, self.interim) if part)


# Deepgram's usual delay from the end of its endpointing silence to the endpoint's result
# (the network and its decoding): a pause waits endpointing_ms plus this for early words.
ENDPOINT_DELAY_S = 0.5


class DeepgramSTT:
    """``SpeechToText`` factory of live streams; one SDK client for every call."""

    name = NAME

    def __init__(self, api_key: str, *, base_url: str = "", model: str = "nova-3",
                 language: str = "en-US", sample_rate: int = 16000, endpointing_ms: int = 300,
                 utterance_end_ms: int = 1000, finalize_timeout_s: float = 1.0,
                 keepalive_s: float = 4.0, early_timeout_s: float | None = None,
                 reconnect_s: float = 0.5, clock: Clock = SYSTEM_CLOCK,
                 ping_timeout_s: float = 0.5) -> None:
        if not api_key:
            raise ProviderError(NAME, "no API key (set VOICEGATE_DEEPGRAM_API_KEY)")
        self.sample_rate = sample_rate
        environment = DeepgramClientEnvironment.PRODUCTION
        if base_url:
            ws = base_url.rstrip("/")
            http = ws.replace("wss://", "https://").replace("ws://", "http://")
            environment = DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)
        self._client = AsyncDeepgramClient(api_key=api_key, environment=environment)
        self._options: dict[str, Any] = {
            "model": model, "language": language, "encoding": "linear16", "sample_rate": sample_rate,
            "channels": 1, "interim_results": "true", "punctuate": "true", "smart_format": "true",
            "endpointing": endpointing_ms, "utterance_end_ms": utterance_end_ms, "vad_events": "true",
        }
        self._finalize_timeout_s = finalize_timeout_s
        self._keepalive_s = keepalive_s
        # A pause's early transcript waits this long for Deepgram's endpoint (endpointing_ms
        # of silence plus the service's delay); later, the silence alone ends the turn.
        # Follows endpointing_ms: a fixed wait shorter than it would never see an endpoint.
        self._early_timeout_s = (endpointing_ms / 1000.0 + ENDPOINT_DELAY_S
                                 if early_timeout_s is None else early_timeout_s)
        self._reconnect_s = reconnect_s  # a failed live socket is reopened after this
        self._clock = clock  # times each stream's wait for a Finalize reply
        self._ping_timeout_s = ping_timeout_s  # and then for a pong (is the socket alive?)
        self._streams: set[DeepgramStream] = set()

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> "DeepgramSTT":
        return cls(settings.deepgram_api_key, base_url=settings.deepgram_url, model=settings.deepgram_model,
                   language=settings.deepgram_language, endpointing_ms=settings.deepgram_endpointing_ms,
                   utterance_end_ms=settings.deepgram_utterance_end_ms, clock=clock)

    def open_stream(self) -> DeepgramStream:
        self._streams = {s for s in self._streams if not s.closed}
        stream = DeepgramStream(self._client, self._options, self.sample_rate,
                                self._finalize_timeout_s, self._keepalive_s,
                                self._early_timeout_s, self._reconnect_s, self._clock,
                                self._ping_timeout_s)
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        streams, self._streams = list(self._streams), set()
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
