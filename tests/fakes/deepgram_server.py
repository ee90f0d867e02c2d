"""A fake Deepgram live-transcription WebSocket (``/v1/listen``).

Wire protocol as documented: binary frames are audio (linear16 at the ``sample_rate``
query parameter); text frames are control messages ``{"type": "KeepAlive" | "Finalize" |
"CloseStream"}``. The server sends ``Results`` (interim with ``is_final: false``, then
``is_final: true`` with ``speech_final`` at an endpoint, or ``from_finalize: true`` in
reply to Finalize), ``UtteranceEnd`` (``utterance_end_ms`` of silence after the last
word), and ``Metadata`` before closing on CloseStream.

"Recognition" is scripted: each utterance reveals the next entry of ``utterances``
one word per ``ms_per_word`` of non-silent audio; all-zero audio is silence (and, in
``realistic()`` mode, audio quieter than ``silence_dbfs``: a line's noise floor).

By default every new word is sent at once (tests see each step). ``realistic()`` makes
it behave like the real service for benchmarks: an interim result only after
``interim_every_ms`` more audio (Deepgram's documented example streams one a second),
and every final (at an endpoint or in reply to Finalize) ``final_delay_ms`` (150-300 ms)
after the end of speech; messages leave in order, as the service sends them.

    python -m tests.fakes.deepgram_server --port 8090 --realistic   # its own process
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.fakes.tcp_drops import read_head


@dataclass
class Session:
    query: dict[str, str]
    controls: Counter = field(default_factory=Counter)
    sent: list[dict[str, Any]] = field(default_factory=list)
    audio_bytes: int = 0
    messages: int = 0  # binary (audio) messages received
    closed_by_client_message: bool = False


class FakeDeepgram:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.utterances: list[str] = ["what are your opening hours"]
        self.ms_per_word = 100
        self.answer_finalize = True  # False: ignore Finalize (a server that never replies)
        # Raw text frames sent as they are, one before each of the next results (a service
        # that sends a malformed message now and then).
        self.garbage: list[str] = []
        # None: an interim for every new word. A number: at most one per this much audio.
        self.interim_every_ms: float | None = None
        # Finals leave this long (uniform in the range) after the end of speech.
        self.final_delay_ms: tuple[float, float] = (0.0, 0.0)
        self.keep_sessions = True  # False: do not keep every message (long benchmarks)
        # A message whose RMS is below this (dBFS) is silence; None: only all-zero audio.
        self.silence_dbfs: float | None = None
        self.sessions: list[Session] = []
        self.app = Starlette(routes=[WebSocketRoute("/v1/listen", self._listen)])

    def realistic(self, interim_every_ms: float = 1000.0,
                  final_delay_ms: tuple[float, float] = (150.0, 300.0)) -> "FakeDeepgram":
        """Interim results at the real service's cadence, finals 150-300 ms after speech."""
        self.interim_every_ms = interim_every_ms
        self.final_delay_ms = final_delay_ms
        self.keep_sessions = False
        self.silence_dbfs = -50.0  # the service's own VAD hears no speech in line noise
        return self

    def _voiced(self, audio: bytes) -> bool:
        if self.silence_dbfs is None:
            return any(audio)
        samples = np.frombuffer(audio[:len(audio) // 2 * 2], "<i2").astype(np.float32)
        floor = 32768.0 * 10.0 ** (self.silence_dbfs / 20.0)
        return bool(len(samples)) and float(np.dot(samples, samples)) > floor * floor * len(samples)

    async def _listen(self, websocket: WebSocket) -> None:
        if websocket.headers.get("authorization") != f"Token {self.api_key}":
            await websocket.close(code=1008)  # before accept: the handshake is refused
            return
        await websocket.accept()
        session = Session(query=dict(websocket.query_params))
        if self.keep_sessions:
            self.sessions.append(session)
        rate = int(session.query.get("sample_rate", "16000"))
        endpointing_ms = int(session.query.get("endpointing", "10"))
        utterance_end_ms = int(session.query.get("utterance_end_ms", "0") or 0)
        request_id = str(uuid.uuid4())
        state = _Segment()
        utterance_index = 0

        loop = asyncio.get_running_loop()
        # (due time, message) in sending order: a delayed final holds back what follows.
        outbox: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        last_voiced_at = loop.time()
        last_interim_ms = 0.0

        async def sender() -> None:
            while True:
                due, payload = await outbox.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if self.garbage and payload["type"] == "Results":
                    await websocket.send_text(self.garbage.pop(0))
                if self.keep_sessions:
                    session.sent.append(payload)
                await websocket.send_text(json.dumps(payload))

        async def send(payload: dict[str, Any], final: bool = False) -> None:
            due = loop.time()
            low, high = self.final_delay_ms
            if final and high > 0:
                due = max(due, last_voiced_at + random.uniform(low, high) / 1000.0)
            outbox.put_nowait((due, payload))

        def results(words: list[str], *, is_final: bool, speech_final: bool = False,
                    from_finalize: bool = False) -> dict[str, Any]:
            start = state.start_ms / 1000
            duration = (state.end_ms - state.start_ms) / 1000
            return {
                "type": "Results", "channel_index": [0, 1], "duration": duration, "start": start,
                "is_final": is_final, "speech_final": speech_final, "from_finalize": from_finalize,
                "channel": {"alternatives": [{"transcript": " ".join(words), "confidence": 0.98,
                                              "words": [{"word": w, "start": start, "end": start + duration,
                                                         "confidence": 0.98, "punctuated_word": w}
                                                        for w in words]}]},
                "metadata": {"request_id": request_id, "model_uuid": str(uuid.uuid4()),
                             "model_info": {"name": "general-nova-3", "version": "fake", "arch": "nova-3"}},
            }

        async def finish(**flags: bool) -> None:
            nonlocal utterance_index
            if state.revealed > state.finalized:
                await send(results(state.script[state.finalized:state.revealed], is_final=True,
                                   **flags), final=True)
            elif flags.get("from_finalize"):
                await send(results([], is_final=True, **flags), final=True)
            state.finalized = state.shown = state.revealed
            state.start_ms = state.end_ms
            if state.revealed >= len(state.script) or flags.get("from_finalize"):
                if state.revealed:
                    utterance_index += 1
                state.reset(self.utterances[utterance_index % len(self.utterances)], state.end_ms)

        state.reset(self.utterances[0], 0)
        sending = asyncio.create_task(sender())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    audio = message["bytes"]
                    session.audio_bytes += len(audio)
                    session.messages += 1
                    ms = len(audio) / 2 / rate * 1000
                    state.end_ms += ms
                    if self._voiced(audio):
                        state.silence_ms = 0
                        state.voiced_ms += ms
                        last_voiced_at = loop.time()
                        words = min(len(state.script), int(state.voiced_ms // self.ms_per_word))
                        state.revealed = max(state.revealed, words)
                        due = self.interim_every_ms is None or \
                            state.end_ms - last_interim_ms >= self.interim_every_ms
                        if state.revealed > state.shown and due:
                            state.shown = state.revealed
                            last_interim_ms = state.end_ms
                            await send(results(state.script[state.finalized:state.revealed],
                                               is_final=False))
                    else:
                        state.silence_ms += ms
                        if state.revealed > state.finalized and state.silence_ms >= endpointing_ms:
                            state.last_word_end_ms = state.end_ms - state.silence_ms
                            await finish(speech_final=True)
                            state.await_utterance_end = utterance_end_ms > 0
                        if state.await_utterance_end and state.silence_ms >= utterance_end_ms:
                            state.await_utterance_end = False
                            await send({"type": "UtteranceEnd", "channel": [0, 1],
                                        "last_word_end": state.last_word_end_ms / 1000})
                    continue
                control = json.loads(message.get("text") or "{}")
                kind = control.get("type", "")
                session.controls[kind] += 1
                if kind == "Finalize" and self.answer_finalize:
                    await finish(from_finalize=True)
                elif kind == "CloseStream":
                    session.closed_by_client_message = True
                    await finish()
                    await send({"type": "Metadata", "transaction_key": "deprecated", "request_id": request_id,
                                "sha256": "0" * 64, "created": datetime.now(timezone.utc).isoformat(),
                                "duration": state.end_ms / 1000, "channels": 1})
                    while not outbox.empty():
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.01)
                    await websocket.close(code=1000)
                    return
        except WebSocketDisconnect:
            return
        finally:
            sending.cancel()


@dataclass
class _Segment:
    script: list[str] = field(default_factory=list)
    start_ms: float = 0.0
    end_ms: float = 0.0
    voiced_ms: float = 0.0
    silence_ms: float = 0.0
    revealed: int = 0
    shown: int = 0  # words sent in an interim so far
    finalized: int = 0
    last_word_end_ms: float = 0.0
    await_utterance_end: bool = False

    def reset(self, utterance: str, at_ms: float) -> None:
        self.script = utterance.split()
        self.start_ms = self.end_ms = at_ms
        self.voiced_ms = self.silence_ms = 0.0
        self.revealed = self.finalized = self.shown = 0


class _RawListener:
    """A raw-socket peer on 127.0.0.1 serving ``_serve`` on a thread of its own; as a
    context manager, started and, at the end, closed with every connection it holds
    (``_sockets``) shut down, which wakes a thread blocked reading one."""

    def __init__(self, name: str) -> None:
        from tests.fakes.server import Arrivals

        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections: Arrivals = Arrivals()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=name)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _sockets(self) -> list[socket.socket]:
        raise NotImplementedError

    def __enter__(self):  # type: ignore[no-untyped-def]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        for sock in self._sockets():
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a relay blocked in recv()
            except OSError:
                pass
            sock.close()
        self._thread.join(timeout=5)


class SilentDeepgram(_RawListener):
    """A /v1/listen peer gone dead after the handshake (a stalled service, a network that
    black-holes the socket): it accepts the WebSocket upgrade, then reads nothing, answers
    nothing (no result, no close frame) and never closes the TCP connection. Raw sockets,
    not uvicorn: a server library answers a close frame by itself. Any key is accepted."""

    def __init__(self) -> None:
        super().__init__("silent-deepgram")  # connections: each upgraded (then held) socket

    def _sockets(self) -> list[socket.socket]:
        return list(self.connections)

    def _accepted(self, conn: socket.socket) -> None:
        request = read_head(conn)
        key = next((line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                    if line.lower().startswith(b"sec-websocket-key:")), b"")
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.connections.append(conn)  # held open, never read again


class StallingProxy(_RawListener):
    """A TCP relay to a fake's ``port`` on 127.0.0.1 whose live connections can be made to
    stall: after ``stall()`` every connection open then stops relaying either way, and
    reads nothing more (the bytes in flight are held, never passed on): a service, or a
    network path, gone dead mid-stream. Nothing answers on it any more, a WebSocket ping
    included (the server library would answer one itself), yet the TCP connection stays
    open. Connections made after the stall are relayed as usual (the service is back)."""

    def __init__(self, port: int) -> None:
        super().__init__("stalling-proxy")  # connections: (client, upstream, stalled) each
        self._upstream = port

    def _sockets(self) -> list[socket.socket]:
        return [sock for conn, upstream, _ in self.connections for sock in (conn, upstream)]

    def stall(self) -> None:
        for _, _, stalled in self.connections:
            stalled.set()

    def _accepted(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._upstream))
        stalled = threading.Event()
        self.connections.append((conn, upstream, stalled))
        for source, sink in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._relay, args=(source, sink, stalled),
                             daemon=True, name="stalling-proxy-relay").start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket, stalled: threading.Event) -> None:
        try:
            while not stalled.is_set():
                data = source.recv(65536)
                if stalled.is_set():
                    return  # held: neither passed on nor read any further
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:  # closed under it (the end of the test)
            return


def main() -> None:
    """The fake in a process of its own (benchmarks): ``--realistic`` timing."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--utterance", action="append", default=[],
                        help="what each utterance recognises, in turn (repeatable)")
    parser.add_argument("--ms-per-word", type=int, default=300)
    parser.add_argument("--realistic", action="store_true")
    args = parser.parse_args()
    fake = FakeDeepgram(args.api_key)
    fake.utterances = args.utterance or fake.utterances
    fake.ms_per_word = args.ms_per_word
    if args.realistic:
        fake.realistic()
    uvicorn.run(fake.app, host="127.0.0.1", port=args.port, log_level="warning",
                lifespan="off", loop="uvloop", ws="websockets-sansio",
                ws_per_message_deflate=False, backlog=4096)


if __name__ == "__main__":
    main()
