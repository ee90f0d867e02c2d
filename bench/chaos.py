"""Chaos calls against a real gateway process, native protocol and Twilio Media Streams mixed.

    python bench/chaos.py [--minutes 3] [--concurrency 14] [--seed 1] [--only NAME ...]

A gateway runs in its own process (``voicegate serve``) on the example FAQ, with the
embedded offline defaults (Moonshine STT, Piper TTS) and its log (info) kept in a file
(``--log``). For ``--minutes``, ``--concurrency`` workers each run every scenario once,
in their own order, then scenarios at random. Scenarios are callers and broken clients:

- native (``n_*``): typed and Piper-spoken questions (FAQ paraphrases, banking77 texts);
  barge-ins by speech, text and keys at random moments; hang-ups mid-reply and
  mid-utterance (a `stop`, a close, the TCP connection dropped); malformed, oversized,
  empty and odd-length frames; messages before `start`, bad `start`s, no `start`; audio
  declared at half and at three times its rate; floods of tiny frames, of texts, of
  partials and of 60 KB texts; reconnect storms; a client that stops reading;
- Twilio (``t_*``): μ-law speech in 20 ms `media` frames with marks echoed as played (or
  never), dtmf, `clear` on barge-in, hang-ups mid-reply, `media` before `start`, two
  `start`s, `stop` then `media`, base64 garbage and other junk, refused `start`s, a stream
  whose media stops, reconnect storms, a stream that stops reading.

Each scenario checks what its client must see within a bound (a reply; the specific
`error` code with a message; the close code docs/protocol.md gives; a client that stops
reading let go): a call with neither a reply nor a close is a hang, a defect. After the
last call: /metrics active calls back to 0, voicegate_calls_total equal to the log's
`call_started` lines, error counters at least what the clients were sent (and the
clients that stopped reading counted), the server's asyncio tasks back to the count
before the first call, /readyz 200, the process alive, and no ERROR line or traceback
in its log.

Printed: the server's RSS every 30 s, scenarios run and passed, notes, the error codes
clients got, the server's warnings by name, RSS and tasks before and after, defects.
Exits 1 on any defect.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from bench.gateway_process import FAQ_PARAPHRASES, GatewayProcess, seed_store  # noqa: E402
from gateway.client import Caller, CallClosed, NoReply  # noqa: E402

RATE = 16000
FRAME = 640  # 20 ms of pcm16 at 16 kHz
TW_FRAME = 160  # 20 ms of μ-law at 8 kHz
BANKING77 = ROOT.parent / "shared" / "data" / "banking77" / "dev.csv"
SCENARIO_TIMEOUT_S = 150.0
SLOW_CONSUMER_S = 70.0


class Defect(Exception):
    """What a scenario's caller saw that docs/protocol.md does not allow."""


@dataclass
class Speech:
    native: list[bytes]  # pcm16 16 kHz, one question each
    twilio: list[bytes]  # μ-law 8 kHz
    texts: list[str]


@dataclass
class Tally:
    runs: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    defects: list[str] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)  # `error` codes clients got
    notes: Counter[str] = field(default_factory=Counter)  # outcomes worth a look, no defect
    slow_consumers: int = 0  # clients that stopped reading and were let go


# ------------------------------------------------------------------ speech


def render_speech(count: int, rng: random.Random) -> Speech:
    """Questions spoken by the project's own voice, once: FAQ paraphrases and banking77."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.audio import resample_pcm16
    from gateway.codec import pcm16_to_ulaw
    from gateway.providers.piper_tts import PiperTTS

    texts = list(FAQ_PARAPHRASES[:4])
    if BANKING77.exists():
        with open(BANKING77, newline="") as f:
            rows = [r["text"] for r in csv.DictReader(f)]
        texts += rng.sample(rows, max(0, count - len(texts)))
    tts = PiperTTS(ThreadPoolExecutor(1))
    native, twilio = [], []
    for text in texts:
        pcm = tts.synthesize_all(text)
        native.append(resample_pcm16(pcm, tts.sample_rate, RATE))
        twilio.append(pcm16_to_ulaw(resample_pcm16(pcm, tts.sample_rate, 8000)))
    return Speech(native, twilio, texts)


# ------------------------------------------------------------------ native helpers


def events_of(caller: Caller, kind: str, start: int = 0) -> list[dict[str, Any]]:
    return [e for e in caller.events[start:] if e.get("type") == kind]


def check_error(event: dict[str, Any], code: str) -> None:
    """An error must name its code and say something specific."""
    if event.get("code") != code:
        raise Defect(f"expected error {code}, got {event}")
    message = str(event.get("message") or "")
    if len(message) < 10:
        raise Defect(f"error {code} without a useful message: {event}")


async def wait_error(caller: Caller, code: str, start: int, timeout: float = 10) -> dict[str, Any]:
    try:
        event = await caller.wait_for("error", timeout=timeout, start=start, code=code)
    except TimeoutError:
        got = [(e.get("code"), e.get("message")) for e in events_of(caller, "error", start)]
        raise Defect(f"no error {code} within {timeout}s (errors: {got})") from None
    check_error(event, code)
    return event


async def ask_text(caller: Caller, text: str) -> dict[str, Any]:
    """A typed question must be answered: a response with audio and its turn_metrics."""
    result = await caller.say_text(text, partial_words=True, word_interval_s=0.08, timeout=60)
    metrics = result.metrics
    if metrics is None or metrics.get("source") is None:
        raise Defect(f"typed question {text!r} not answered: {metrics}")
    return metrics


async def first_audio(caller: Caller, before: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(caller.audio) <= before:
        if caller.closed_code is not None:
            raise Defect(f"closed ({caller.closed_code}) before reply audio")
        if time.monotonic() > deadline:
            raise Defect(f"no reply audio within {timeout}s")
        await asyncio.sleep(0.01)


def tally_codes(caller: Caller, tally: Tally) -> None:
    for e in events_of(caller, "error"):
        tally.codes[str(e.get("code"))] += 1


# ------------------------------------------------------------------ native scenarios


async def n_typed(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    async with Caller(url) as caller:
        for text in rng.sample(sp.texts, 2):
            await ask_text(caller, text)
        tally_codes(caller, tally)


async def n_spoken(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    async with Caller(url) as caller:
        # A busy host (Moonshine on every call's speech) may take seconds to its transcript.
        result = await caller.say(rng.choice(sp.native), timeout=60, nothing_heard_ms=8000)
        if not result.transcript:
            raise Defect(f"spoken question: no transcript ({result.events[:5]})")
        if not result.audio and result.metrics and result.metrics.get("source") is None:
            raise Defect(f"spoken question not answered: {result.metrics}")
        tally_codes(caller, tally)


async def n_barge_speech(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A typed question; during its reply the caller speaks: interrupt (speech), then answer."""
    async with Caller(url) as caller:
        caller_index = len(caller.events)
        before = len(caller.audio)
        await caller.send_transcript(rng.choice(FAQ_PARAPHRASES), partial_words=False)
        await first_audio(caller, before)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        replying = not events_of(caller, "turn_metrics", caller_index)
        spoken_from = len(caller.events)
        await caller.stream_audio(rng.choice(sp.native))
        metrics = await caller.wait_for("turn_metrics", timeout=60, start=spoken_from,
                                        where=lambda m: m.get("input") == "audio")
        if replying and not any(e.get("type") == "interrupt" for e in caller.events[caller_index:]):
            # the reply may have ended just before the speech was heard: only a defect when
            # the first turn's metrics say it was still playing after our speech began
            first = events_of(caller, "turn_metrics", caller_index)
            if first and first[0].get("reply_ms", 0) > 8000:
                raise Defect(f"barge-in over a playing reply: no interrupt ({first[0]})")
        heard = [e for e in events_of(caller, "transcript", caller_index)
                 if e.get("final") and e.get("turn") == metrics.get("turn")]
        if not metrics.get("empty") and not heard:
            raise Defect(f"barge-in speech: turn {metrics.get('turn')} ended without a final "
                         f"transcript ({metrics})")
        if metrics.get("empty"):
            tally.notes["barge-in speech heard as an empty turn"] += 1
        tally_codes(caller, tally)


async def n_barge_text(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    async with Caller(url) as caller:
        index = len(caller.events)
        before = len(caller.audio)
        await caller.send_transcript(FAQ_PARAPHRASES[0], partial_words=False)
        await first_audio(caller, before)
        await asyncio.sleep(rng.uniform(0.0, 0.6))
        if not events_of(caller, "turn_metrics", index):
            await caller.send_json({"type": "text", "text": "wait", "final": False})
            event = await caller.wait_for("interrupt", start=index, timeout=10)
            if event.get("cause") != "text":
                raise Defect(f"text barge-in: interrupt cause {event.get('cause')}")
        await ask_text(caller, rng.choice(FAQ_PARAPHRASES))
        tally_codes(caller, tally)


async def n_hangup_mid_reply(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Hang up while the reply plays: a stop, a close, or the TCP connection dropped."""
    caller = Caller(url)
    await caller.connect()
    before = len(caller.audio)
    await caller.send_transcript(rng.choice(FAQ_PARAPHRASES), partial_words=False)
    await first_audio(caller, before)
    await asyncio.sleep(rng.uniform(0, 1.0))
    how = rng.choice(["stop", "close", "abort"])
    if how == "stop":
        await caller.send_json({"type": "stop"})
        await asyncio.wait_for(caller._reader, 10)  # the server closes (1000)
        if caller.closed_code != 1000:
            raise Defect(f"stop mid-reply: closed {caller.closed_code}, not 1000")
    elif how == "abort":
        assert caller._ws is not None
        caller._ws.transport.abort()
    await caller.close()


async def n_malformed(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Every bad frame gets its own specific error; the call goes on and answers."""
    async with Caller(url) as caller:
        cases: list[tuple[str | bytes, str]] = [
            (b"\x01" * 641, "odd_pcm_length"),
            (b"", "empty_audio_frame"),
            (b"\x00" * (64 * 1024 + 2), "frame_too_large"),
            ("x" * (64 * 1024 + 10), "frame_too_large"),
            ("{not json", "invalid_json"),
            ('{"type": "text", "text": "a", "text": "b"}', "invalid_json"),
            (json.dumps({"type": "dial"}), "unknown_message_type"),
            (json.dumps({"type": "text", "text": 5}), "invalid_message"),
            (json.dumps({"type": "text", "text": "hi", "fnal": True}), "invalid_message"),
            (json.dumps({"type": "dtmf", "digit": "1234"}), "invalid_dtmf"),
            (json.dumps({"type": "start", "sample_rate": 8000}), "already_started"),
            (json.dumps([1, 2]), "invalid_message"),
            (json.dumps({"type": None}), "invalid_message"),
            ('{"type": "text", "text": "\\ud800"}', "invalid_json"),
            ('{"type": "text", "text": "x", "final": NaN}', "invalid_json"),
        ]
        rng.shuffle(cases)
        for data, code in cases:
            index = len(caller.events)
            await caller.send_raw(data)
            await wait_error(caller, code, index)
        await ask_text(caller, rng.choice(FAQ_PARAPHRASES))
        tally_codes(caller, tally)


async def n_before_start(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Messages before `start`: specific errors, then a good start still works."""
    caller = Caller(url)
    await caller.connect(start=False)
    try:
        for data, code in [(b"\x00" * 640, "audio_before_start"),
                           (json.dumps({"type": "text", "text": "hello"}), "not_started"),
                           (json.dumps({"type": "dtmf", "digit": "5"}), "not_started")]:
            index = len(caller.events)
            await caller.send_raw(data)
            await wait_error(caller, code, index)
        await caller.send_json({"type": "start", "sample_rate": RATE})
        await caller.wait_for("ready", timeout=10)
        await ask_text(caller, rng.choice(FAQ_PARAPHRASES))
        tally_codes(caller, tally)
    finally:
        await caller.close()


async def n_bad_start(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    cases = [({"type": "start", "sample_rate": 12345}, "unsupported_sample_rate", 1003),
             ({"type": "start", "sample_rate": 16000, "encoding": "opus"},
              "unsupported_encoding", 1003),
             ({"type": "start", "sample_rate": 16000, "channels": 2}, "unsupported_channels", 1003),
             ({"type": "start", "sample_rate": "16000"}, "invalid_message", 1008)]
    message, code, close = rng.choice(cases)
    caller = Caller(url)
    await caller.connect(start=False)
    try:
        await caller.send_json(message)
        await wait_error(caller, code, 0)
        await asyncio.wait_for(caller._reader, 10)
        if caller.closed_code != close:
            raise Defect(f"{code}: closed {caller.closed_code}, expected {close}")
        tally_codes(caller, tally)
    finally:
        await caller.close()


async def speak_unheard(caller: Caller, pcm16: bytes) -> None:
    """Speech at a pace the gateway cannot understand: it may hear only silence, so its idle
    goodbye and hang-up (1000, `hangup` idle) may come before the audio is all sent."""
    try:
        await caller.stream_audio(pcm16)
    except CallClosed as exc:
        if exc.hangup != "idle":
            raise


async def n_wrong_rate(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """16 kHz speech declared as 8000, streamed at the pace spoken (2x): audio_pace_mismatch."""
    caller = Caller(url, sample_rate=8000, frame_ms=40)  # 40 ms at 8 kHz = 640 bytes
    await caller.connect()
    try:
        speech = b"".join(rng.sample(sp.native, 8))
        # The line sends 640-byte frames every 40 ms: 20 ms of 16 kHz audio each, 0.5x real
        # time for the audio, 1x for the declared rate. Sending them every 20 ms is 2x.
        caller.frame_ms = 20
        caller.sample_rate = 16000
        await speak_unheard(caller, speech + b"\x00" * FRAME * 50)  # 20 s+ at 2x
        code = "audio_pace_mismatch"
        errors = [e for e in events_of(caller, "error") if e.get("code") == code]
        if not errors:
            got = [e.get("code") for e in events_of(caller, "error")]
            raise Defect(f"2x audio for 20 s+: no {code} (errors {got}, closed "
                         f"{caller.closed_code})")
        check_error(errors[0], code)
        if caller.closed_code not in (None, 1000):
            raise Defect(f"{code} closed the call ({caller.closed_code}); it must stay open")
        tally_codes(caller, tally)
    finally:
        await caller.close()


async def n_message_flood(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Tiny frames as fast as possible: messages_too_fast, closed 1008."""
    caller = Caller(url)
    await caller.connect()
    try:
        try:
            for _ in range(20000):
                await caller.send_raw(b"\x00\x00")
        except (CallClosed, ConnectionClosed):
            pass
        await asyncio.wait_for(caller._reader, 15)
        errors = [e.get("code") for e in events_of(caller, "error")]
        if caller.closed_code != 1008 or "messages_too_fast" not in errors:
            raise Defect(f"tiny-frame flood: closed {caller.closed_code}, errors {errors}")
        tally_codes(caller, tally)
    except TimeoutError:
        raise Defect("tiny-frame flood: the server never closed the call") from None
    finally:
        await caller.close()


async def n_text_flood(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Forty questions at once (those over the queue refused, too_many_messages), then `stop`:
    the call closes 1000 at once."""
    async with Caller(url) as caller:
        for _ in range(40):
            await caller.send_json({"type": "text", "text": rng.choice(FAQ_PARAPHRASES)})
        await asyncio.sleep(rng.uniform(0, 3))  # too_many_messages for some, if they pile up
        await caller.send_json({"type": "stop"})
        await asyncio.wait_for(caller._reader, 15)
        if caller.closed_code != 1000:
            raise Defect(f"stop after a text flood: closed {caller.closed_code}, not 1000")
        tally_codes(caller, tally)


async def unread_socket(url: str) -> ClientConnection:
    """A WebSocket whose client will not read: a 4 KiB receive window, the library's queue
    of one message, and no keepalive pings of its own (unanswered, they would close it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = re.match(r"ws://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await connect(url, sock=sock, max_queue=1, compression=None, max_size=2 ** 20,
                         ping_interval=None)


async def keep_sending(ws: ClientConnection, messages: Callable[[int], list[str | bytes]],
                       tally: Tally, name: str) -> None:
    """Send ``messages(i)`` every 20 ms, reading nothing, until the gateway lets the
    connection go (client_not_reading, then the connection reset); a defect after
    ``SLOW_CONSUMER_S``."""
    deadline = time.monotonic() + SLOW_CONSUMER_S
    i = 0
    while time.monotonic() < deadline:
        try:
            for message in messages(i):
                await ws.send(message)
        except (ConnectionClosed, OSError):
            tally.notes[f"{name}: let go by the gateway"] += 1
            tally.slow_consumers += 1
            return
        i += 1
        await asyncio.sleep(0.02)
    raise Defect(f"a client that read nothing for {SLOW_CONSUMER_S:g} s was still connected")


async def n_slow_consumer(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Asks questions, its microphone on, and stops reading: the gateway must close the call
    (client_not_reading) and let the connection go, not buffer for it."""
    ws = await unread_socket(url)
    try:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        question = json.dumps({"type": "text", "text": rng.choice(FAQ_PARAPHRASES)})
        await keep_sending(ws, lambda i: [question, b"\x00" * FRAME] if i % 100 == 0
                           else [b"\x00" * FRAME], tally, "native slow consumer")
    finally:
        ws.transport.abort()


async def n_reconnect_storm(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Twenty calls dialled and dropped in quick succession, then a good call."""
    async def one() -> None:
        try:
            ws = await connect(url, compression=None, open_timeout=20)
        except Exception as exc:
            if "503" in str(exc):  # overloaded: a documented refusal
                return
            raise
        try:
            await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
            if rng.random() < 0.5:
                await asyncio.wait_for(ws.recv(), 10)
            if rng.random() < 0.4:
                ws.transport.abort()
            else:
                await ws.close()
        except ConnectionClosed:
            pass
    await asyncio.gather(*(one() for _ in range(20)))
    await n_typed(url, sp, rng, tally)


async def n_dtmf(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Keys collected until `#`: a keypad event, then a reply (handoff without an LLM)."""
    async with Caller(url) as caller:
        for digit in "4567#":
            await caller.send_json({"type": "dtmf", "digit": digit})
            await asyncio.sleep(0.1)
        event = await caller.wait_for("keypad", timeout=15)
        if event.get("keys") != "4567":
            raise Defect(f"keypad event keys {event.get('keys')!r}, not '4567'")
        await caller.wait_for("turn_metrics", timeout=30)
        tally_codes(caller, tally)


async def n_dtmf_barge(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A key pressed while the reply plays interrupts it (cause dtmf); a lone `#` does not."""
    async with Caller(url) as caller:
        index = len(caller.events)
        before = len(caller.audio)
        await caller.send_transcript(FAQ_PARAPHRASES[1], partial_words=False)
        await first_audio(caller, before)
        await caller.send_json({"type": "dtmf", "digit": "#"})
        await asyncio.sleep(0.3)
        if events_of(caller, "interrupt", index):
            raise Defect("a lone `#` interrupted the reply")
        if not events_of(caller, "turn_metrics", index):
            await caller.send_json({"type": "dtmf", "digit": "3"})
            event = await caller.wait_for("interrupt", start=index, timeout=10)
            if event.get("cause") != "dtmf":
                raise Defect(f"key barge-in: interrupt cause {event.get('cause')}")
        tally_codes(caller, tally)


async def n_slow_rate(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """16 kHz speech declared as 48000, streamed at the pace spoken (1/3 real time for the
    declared rate): audio_pace_mismatch, the call stays open."""
    caller = Caller(url, sample_rate=48000)
    await caller.connect()
    try:
        caller.sample_rate = 16000  # the line sends 16 kHz frames, 20 ms apart
        await speak_unheard(caller, b"".join(rng.sample(sp.native, 7)))
        errors = [e for e in events_of(caller, "error") if e.get("code") == "audio_pace_mismatch"]
        if not errors:
            got = [e.get("code") for e in events_of(caller, "error")]
            raise Defect(f"1/3-pace audio for 20 s: no audio_pace_mismatch (errors {got})")
        check_error(errors[0], "audio_pace_mismatch")
        tally_codes(caller, tally)
    finally:
        await caller.close()


async def n_stop_variants(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A `stop` before `start`, and one with a field it does not have: each ends the call (1000)."""
    caller = Caller(url)
    await caller.connect(start=False)
    try:
        await caller.send_json({"type": "stop"})
        await asyncio.wait_for(caller._reader, 10)
        if caller.closed_code != 1000:
            raise Defect(f"`stop` before `start`: closed {caller.closed_code}, not 1000")
    finally:
        await caller.close()
    async with Caller(url) as caller:
        await ask_text(caller, rng.choice(FAQ_PARAPHRASES))
        await caller.send_json({"type": "stop", "reason": "bye"})  # taken whatever it carries
        await asyncio.wait_for(caller._reader, 10)
        if caller.closed_code != 1000:
            raise Defect(f"`stop` with an extra field: closed {caller.closed_code}, not 1000")
        tally_codes(caller, tally)


async def n_never_start(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    caller = Caller(url)
    await caller.connect(start=False)
    try:
        await asyncio.wait_for(caller._reader, 15)
        if caller.closed_code != 1008:
            raise Defect(f"no `start`: closed {caller.closed_code}, not 1008")
        await wait_error(caller, "start_timeout", 0, timeout=1)
        tally_codes(caller, tally)
    except TimeoutError:
        raise Defect("no `start` for 15 s: never closed") from None
    finally:
        await caller.close()


def random_words(rng: random.Random, nbytes: int) -> str:
    words = ["card", "balance", "transfer", "branch", "open", "password", "routing", "fee",
             "account", "wire", "saturday", "loan", "pin", "statement", "abroad", "limit"]
    out: list[str] = []
    size = 0
    while size < nbytes:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:nbytes]


async def n_heavy_texts(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Texts just under the 64 KiB frame limit (valid, ~10,000 words each), sixteen at a
    time: each is answered or refused, and the call still answers a short question."""
    async with Caller(url) as caller:
        for _ in range(16):
            await caller.send_json({"type": "text", "text": random_words(rng, 60_000)})
        await asyncio.sleep(rng.uniform(1, 4))
        await ask_text(caller, rng.choice(FAQ_PARAPHRASES))
        tally_codes(caller, tally)


async def n_partial_flood(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Partials as fast as the socket takes them (each a word longer, as a broken relay of a
    streaming STT would send them): those over the text queue are refused one by one
    (too_many_messages), and past the bad-message budget the call is closed 1008 with
    too_many_bad_messages; or, read fast enough, the final is answered."""
    caller = Caller(url)
    await caller.connect()
    try:
        words = random_words(rng, 3000).split()
        try:
            for i in range(1, 1800):
                await caller.send_json({"type": "text", "final": False,
                                        "text": " ".join(words[: i % 400 + 1])})
            await ask_text(caller, rng.choice(FAQ_PARAPHRASES))
        except CallClosed as exc:
            if exc.close_code != 1008 or exc.error != "too_many_bad_messages":
                raise Defect(f"partial flood closed with {exc.close_code} {exc.error}: {exc}")
            await wait_error(caller, "too_many_messages", 0, timeout=1)
            await wait_error(caller, "too_many_bad_messages", 0, timeout=1)
        tally_codes(caller, tally)
    finally:
        await caller.close()


async def n_hangup_mid_utterance(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """The caller hangs up while speaking, or just after (the recogniser still decoding)."""
    caller = Caller(url)
    await caller.connect()
    speech = rng.choice(sp.native)
    cut = rng.randrange(FRAME, len(speech)) // 2 * 2 if rng.random() < 0.5 else len(speech)
    await caller.stream_audio(speech[:cut])
    await asyncio.sleep(rng.uniform(0, 0.8))
    if rng.random() < 0.5:
        assert caller._ws is not None
        caller._ws.transport.abort()
    await caller.close()


async def n_close_before_ready(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """`start` and gone at once, with or without a close frame."""
    for _ in range(5):
        ws = await connect(url, compression=None)
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        await ws.send(b"\x00" * FRAME)
        if rng.random() < 0.5:
            ws.transport.abort()
        else:
            await ws.close()
    await n_typed(url, sp, rng, tally)

NATIVE: dict[str, Callable[..., Awaitable[None]]] = {
    "n_typed": n_typed, "n_spoken": n_spoken, "n_barge_speech": n_barge_speech,
    "n_barge_text": n_barge_text, "n_hangup_mid_reply": n_hangup_mid_reply,
    "n_malformed": n_malformed, "n_before_start": n_before_start, "n_bad_start": n_bad_start,
    "n_wrong_rate": n_wrong_rate, "n_message_flood": n_message_flood,
    "n_text_flood": n_text_flood, "n_slow_consumer": n_slow_consumer,
    "n_reconnect_storm": n_reconnect_storm, "n_dtmf": n_dtmf, "n_dtmf_barge": n_dtmf_barge,
    "n_slow_rate": n_slow_rate, "n_stop_variants": n_stop_variants,
    "n_never_start": n_never_start, "n_heavy_texts": n_heavy_texts,
    "n_partial_flood": n_partial_flood, "n_hangup_mid_utterance": n_hangup_mid_utterance,
    "n_close_before_ready": n_close_before_ready,
}


# ------------------------------------------------------------------ Twilio


class TwilioLine:
    """A Twilio Media Stream as Twilio drives it: 20 ms μ-law `media` frames at real pace,
    silence between utterances, marks echoed once the audio before them has 'played'."""

    def __init__(self, ws: ClientConnection, stream_sid: str, rng: random.Random) -> None:
        self.ws = ws
        self.sid = stream_sid
        self.rng = rng
        self.media_bytes = 0
        self.marks: list[str] = []
        self.clears = 0
        self.events: list[str] = []
        self.unexpected: list[str] = []
        self.speech = bytearray()
        self.sent_frames = 0
        self.echo = True
        self._reader = asyncio.create_task(self._read())
        self._line: asyncio.Task[None] | None = None

    def media(self, payload: bytes | str) -> str:
        if isinstance(payload, bytes):
            payload = base64.b64encode(payload).decode()
        return json.dumps({"event": "media", "streamSid": self.sid,
                           "media": {"track": "inbound", "payload": payload}})

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def start(self, call_sid: str, **extra: Any) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send({"event": "start", "sequenceNumber": "1", "streamSid": self.sid,
                         "start": {"streamSid": self.sid, "callSid": call_sid,
                                   "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
                                   "customParameters": {"From": "+15550100", **extra},
                                   "mediaFormat": {"encoding": "audio/x-mulaw",
                                                   "sampleRate": 8000, "channels": 1}}})

    def run_line(self) -> None:
        self._line = asyncio.create_task(self._run_line())

    async def _run_line(self) -> None:
        started = time.perf_counter()
        i = 0
        while True:
            delay = started + i * 0.02 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            frame = bytes(self.speech[:TW_FRAME]).ljust(TW_FRAME, b"\xff")
            del self.speech[:TW_FRAME]
            try:
                await self.ws.send(self.media(frame))
            except ConnectionClosed:
                return
            self.sent_frames += 1

    async def say(self, ulaw: bytes) -> None:
        self.speech += ulaw
        while self.speech:
            if self._line is None or self._line.done():
                raise Defect("twilio line down while speaking")
            await asyncio.sleep(0.02)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.unexpected.append("binary frame from the gateway")
                    continue
                event = json.loads(message)
                kind = event.get("event")
                self.events.append(kind)
                if event.get("streamSid") != self.sid:
                    self.unexpected.append(f"{kind} for stream {event.get('streamSid')}")
                if kind == "media":
                    self.media_bytes += len(base64.b64decode(event["media"]["payload"]))
                elif kind == "mark":
                    name = event["mark"]["name"]
                    self.marks.append(name)
                    if self.echo:
                        asyncio.get_running_loop().call_later(
                            0.15, lambda n=name: asyncio.ensure_future(self._echo(n)))
                elif kind == "clear":
                    self.clears += 1
                else:
                    self.unexpected.append(f"event {kind!r}")
        except ConnectionClosed:
            pass

    async def _echo(self, name: str) -> None:
        try:
            await self.send({"event": "mark", "streamSid": self.sid, "mark": {"name": name}})
        except ConnectionClosed:
            pass

    async def wait_media(self, above: int, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while self.media_bytes <= above:
            if self._reader.done():
                raise Defect(f"twilio stream closed ({self.ws.close_code}) before reply audio")
            if time.monotonic() > deadline:
                raise Defect(f"twilio: no reply audio within {timeout}s")
            await asyncio.sleep(0.02)

    async def stop(self, expect_close: int | None = 1000) -> None:
        try:
            await self.send({"event": "stop", "streamSid": self.sid,
                             "stop": {"accountSid": "AC" + "0" * 32, "callSid": "x"}})
        except ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), 10)
        except TimeoutError:
            raise Defect("twilio: no close within 10 s of `stop`") from None
        if expect_close is not None and self.ws.close_code != expect_close:
            raise Defect(f"twilio stop: closed {self.ws.close_code}, expected {expect_close}")

    async def aclose(self) -> None:
        if self._line is not None:
            self._line.cancel()
        self.ws.transport.abort()
        await asyncio.gather(self._reader, *(t for t in [self._line] if t), return_exceptions=True)

    def check(self) -> None:
        if self.unexpected:
            raise Defect(f"twilio: unexpected from the gateway: {self.unexpected[:3]}")


def sids(rng: random.Random) -> tuple[str, str]:
    return "MZ" + rng.randbytes(16).hex(), "CA" + rng.randbytes(16).hex()


async def twilio_line(url: str, rng: random.Random) -> TwilioLine:
    stream_sid, _ = sids(rng)
    ws = await connect(url, compression=None, max_size=2 ** 20)
    return TwilioLine(ws, stream_sid, rng)


async def t_spoken(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A phone caller asks two questions (marks echoed), presses keys, hangs up."""
    line = await twilio_line(url, rng)
    try:
        await line.start(sids(rng)[1])
        line.run_line()
        for _ in range(2):
            before = line.media_bytes
            await line.say(rng.choice(sp.twilio))
            await line.wait_media(before)
            await asyncio.sleep(rng.uniform(3, 6))  # the reply plays
        for digit in "12#":
            await line.send({"event": "dtmf", "streamSid": line.sid,
                             "dtmf": {"track": "inbound_track", "digit": digit}})
        await asyncio.sleep(1)
        if not line.marks:
            raise Defect("twilio: reply audio without marks")
        await line.stop()
        line.check()
    finally:
        await line.aclose()


async def t_barge(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """The caller talks over the reply: `clear`, then the new question's reply."""
    line = await twilio_line(url, rng)
    try:
        await line.start(sids(rng)[1])
        line.run_line()
        await line.say(sp.twilio[0])  # an FAQ paraphrase: a cached answer of some seconds
        await line.wait_media(0)
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        clears = line.clears
        before = line.media_bytes
        await line.say(rng.choice(sp.twilio))
        await asyncio.sleep(2)
        if line.clears == clears:
            raise Defect("twilio barge-in over a playing reply: no `clear`")
        await line.wait_media(before)
        line.check()
        await line.stop()
    finally:
        await line.aclose()


async def t_hangup_mid_reply(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    line = await twilio_line(url, rng)
    try:
        await line.start(sids(rng)[1])
        line.run_line()
        await line.say(rng.choice(sp.twilio))
        await line.wait_media(0)
        await asyncio.sleep(rng.uniform(0, 1))
        if rng.random() < 0.5:
            await line.stop()
    finally:
        await line.aclose()


async def t_out_of_order(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """media before start, two starts, marks and dtmf nobody asked for, stop then media: the
    stream goes on until `stop`, then closes 1000; a good question is still answered."""
    line = await twilio_line(url, rng)
    try:
        for _ in range(5):
            await line.send(line.media(b"\xff" * TW_FRAME))
        await line.send({"event": "mark", "streamSid": line.sid, "mark": {"name": "1:100"}})
        await line.send({"event": "dtmf", "streamSid": line.sid, "dtmf": {"digit": "1"}})
        call_sid = sids(rng)[1]
        await line.start(call_sid)
        await line.start(call_sid)  # a second start: ignored
        await line.send({"event": "mark", "streamSid": line.sid, "mark": {"name": "7:100"}})
        line.run_line()
        before = line.media_bytes
        await line.say(rng.choice(sp.twilio))
        await line.wait_media(before)
        await line.send({"event": "stop", "streamSid": line.sid})
        await line.send(line.media(b"\xff" * TW_FRAME))  # after stop: nothing
        try:
            await asyncio.wait_for(asyncio.shield(line._reader), 10)
        except TimeoutError:
            raise Defect("twilio: stream not closed within 10 s of `stop`") from None
        if line.ws.close_code != 1000:
            raise Defect(f"twilio stop: closed {line.ws.close_code}, not 1000")
        line.check()
    finally:
        await line.aclose()


async def t_garbage(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Garbage in a live stream: base64 garbage, empty and oversized payloads, binary
    frames, unknown events, another stream's media; the next question is still answered."""
    line = await twilio_line(url, rng)
    try:
        await line.start(sids(rng)[1])
        line.run_line()
        junk: list[str | bytes] = [
            line.media("!!notbase64!!"), line.media("abc"), line.media(""),
            line.media(b"\xff" * 40000), b"\x00\x01\x02", "{broken",
            json.dumps({"event": "bogus"}), json.dumps({"event": 5}),
            json.dumps({"event": "media", "streamSid": "MZother",
                        "media": {"payload": base64.b64encode(b"\x00" * 160).decode()}}),
            json.dumps({"event": "media", "streamSid": line.sid, "media": {"payload": 5}}),
            json.dumps({"event": "mark", "streamSid": line.sid, "mark": {"name": "99:99999"}}),
            json.dumps({"event": "dtmf", "streamSid": line.sid, "dtmf": {"digit": "12"}}),
            json.dumps({"event": "stop", "streamSid": "MZother"}),
        ]
        for message in rng.sample(junk, len(junk)):
            await line.ws.send(message)
        before = line.media_bytes
        await line.say(rng.choice(sp.twilio))
        await line.wait_media(before)
        line.check()
        await line.stop()
    finally:
        await line.aclose()


async def t_no_echo(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A far end that never echoes marks (heard_ms from the playout clock): still answered;
    a barge-in still clears."""
    line = await twilio_line(url, rng)
    line.echo = False
    try:
        await line.start(sids(rng)[1])
        line.run_line()
        await line.say(sp.twilio[1])
        await line.wait_media(0)
        await asyncio.sleep(0.5)
        before = line.media_bytes
        await line.say(rng.choice(sp.twilio))
        await line.wait_media(before)
        line.check()
        await line.stop()
    finally:
        await line.aclose()


async def t_refused_starts(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A `start` in a format not μ-law 8 kHz (1003); no `start` at all (1008); a started
    stream whose media stops (1011, no hang-up)."""
    kind = rng.choice(["format", "no_start", "no_media"])
    line = await twilio_line(url, rng)
    try:
        if kind == "format":
            await line.send({"event": "start", "streamSid": line.sid,
                             "start": {"streamSid": line.sid, "callSid": sids(rng)[1],
                                       "mediaFormat": {"encoding": "audio/x-l16",
                                                       "sampleRate": 16000, "channels": 1}}})
            expected, bound = 1003, 10
        elif kind == "no_start":
            await line.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            expected, bound = 1008, 15
        else:
            await line.start(sids(rng)[1])
            for _ in range(10):
                await line.send(line.media(b"\xff" * TW_FRAME))
            expected, bound = 1011, 20
        try:
            await asyncio.wait_for(asyncio.shield(line._reader), bound)
        except TimeoutError:
            raise Defect(f"twilio {kind}: not closed within {bound} s") from None
        if line.ws.close_code != expected:
            raise Defect(f"twilio {kind}: closed {line.ws.close_code}, not {expected}")
    finally:
        await line.aclose()


async def t_reconnect_storm(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """Streams started and dropped in quick succession (some mid-`start`), then a good call."""
    async def one() -> None:
        line = await twilio_line(url, rng)
        try:
            await line.start(sids(rng)[1])
            for _ in range(rng.randrange(0, 20)):
                await line.send(line.media(b"\xff" * TW_FRAME))
            if rng.random() < 0.5:
                await line.send({"event": "stop", "streamSid": line.sid})
        except ConnectionClosed:
            pass
        finally:
            await line.aclose()
    await asyncio.gather(*(one() for _ in range(12)))
    await t_spoken(url, sp, rng, tally)


async def t_slow_consumer(url: str, sp: Speech, rng: random.Random, tally: Tally) -> None:
    """A stream that asks a question and then stops reading (a stalled proxy that still
    sends): closed as not reading, the connection let go."""
    ws = await unread_socket(url)
    line = TwilioLine.__new__(TwilioLine)  # only its message builders: nothing reads
    line.sid, _ = sids(rng)
    try:
        await ws.send(json.dumps({"event": "start", "streamSid": line.sid,
                                  "start": {"streamSid": line.sid, "callSid": sids(rng)[1]}}))
        speech = rng.choice(sp.twilio)
        frames = [speech[i:i + TW_FRAME].ljust(TW_FRAME, b"\xff")
                  for i in range(0, len(speech), TW_FRAME)]
        await keep_sending(ws, lambda i: [line.media(frames[i % (len(frames) + 150)]
                                                     if i % (len(frames) + 150) < len(frames)
                                                     else b"\xff" * TW_FRAME)],
                           tally, "twilio slow consumer")
    finally:
        ws.transport.abort()


TWILIO: dict[str, Callable[..., Awaitable[None]]] = {
    "t_spoken": t_spoken, "t_barge": t_barge, "t_hangup_mid_reply": t_hangup_mid_reply,
    "t_out_of_order": t_out_of_order, "t_garbage": t_garbage, "t_no_echo": t_no_echo,
    "t_refused_starts": t_refused_starts, "t_reconnect_storm": t_reconnect_storm,
    "t_slow_consumer": t_slow_consumer,
}


# ------------------------------------------------------------------ the run


class ChaosGateway(GatewayProcess):
    """The bench's gateway process, its log (stderr: JSON lines) kept in a file."""

    def __init__(self, store: str, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(store)
        self.env.update(env)
        self.log_path = log_path

    def start(self, timeout_s: float = 300.0) -> "ChaosGateway":
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--host",
                                      "127.0.0.1", "--port", str(self.port)], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"the gateway did not become ready; see {self.log_path}")
            time.sleep(0.5)
        return self

    def metric(self, name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(self.base_url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


async def run_scenario(name: str, scenario: Callable[..., Awaitable[None]], url: str,
                       sp: Speech, rng: random.Random, tally: Tally) -> None:
    tally.runs[name] += 1
    try:
        await asyncio.wait_for(scenario(url, sp, rng, tally), SCENARIO_TIMEOUT_S)
        tally.ok[name] += 1
    except Defect as exc:
        tally.defects.append(f"{name}: {exc}")
    except TimeoutError as exc:
        tally.defects.append(f"{name}: hung ({exc or 'no end within the bound'})")
    except NoReply as exc:
        tally.defects.append(f"{name}: no reply: {exc}")
    except Exception as exc:
        tally.defects.append(f"{name}: {type(exc).__name__}: {exc}")


async def drive(gateway: ChaosGateway, sp: Speech, minutes: float, concurrency: int,
                seed: int, only: list[str]) -> Tally:
    tally = Tally()
    chosen = {**NATIVE, **TWILIO}
    if only:
        chosen = {k: v for k, v in chosen.items() if k in only}
    deadline = time.monotonic() + minutes * 60
    names = sorted(chosen)

    async def worker(i: int) -> None:
        wrng = random.Random(seed * 1000 + i)
        await asyncio.sleep(wrng.uniform(0, 2))
        order = wrng.sample(names, len(names))  # each scenario once first, then at random
        turn = 0
        while time.monotonic() < deadline:
            name = order[turn] if turn < len(order) else wrng.choice(names)
            turn += 1
            url = gateway.twilio_url if name.startswith("t_") else gateway.call_url
            await run_scenario(name, chosen[name], url, sp, wrng, tally)

    async def sample() -> None:
        while True:
            await asyncio.sleep(30)
            print(f"  {time.strftime('%H:%M:%S')} server RSS {gateway.rss_mb():.0f} MB; "
                  f"scenarios run {sum(tally.runs.values())}", flush=True)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    sampler.cancel()
    return tally


def read_log(path: Path) -> tuple[Counter[str], list[str]]:
    """Warning events by name, and ERROR lines / tracebacks in full."""
    warnings: Counter[str] = Counter()
    bad: list[str] = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            if "Traceback" in raw or "ERROR" in raw or "Error" in raw:
                bad.append(raw[:500])
            continue
        if not isinstance(entry, dict):
            continue
        level = entry.get("level")
        name = str(entry.get("event"))
        if level == "warning":
            code = entry.get("code")
            warnings[f"{name}:{code}" if code else name] += 1
        elif level in ("error", "critical") or "exc" in entry:
            bad.append(raw[:1500])
    return warnings, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=14)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", help="an already seeded store of the example FAQ")
    parser.add_argument("--log", default="chaos-gateway.log", help="the server's log file")
    parser.add_argument("--only", nargs="*", default=[], help="scenario names to run")
    args = parser.parse_args()
    speech = render_speech(10, random.Random(args.seed))
    log_path = Path(args.log).resolve()
    gateway = ChaosGateway(seed_store(args.store), log_path, {"VOICEGATE_LOG_LEVEL": "info"})
    gateway.start()
    defects: list[str] = []
    try:
        tasks_before = gateway.tasks()
        rss_before = gateway.rss_mb()
        print(f"chaos: {args.concurrency} calls at a time for {args.minutes:g} min; server RSS "
              f"{rss_before:.0f} MB, {tasks_before} tasks; log {log_path}", flush=True)
        tally = asyncio.run(drive(gateway, speech, args.minutes, args.concurrency, args.seed,
                                  args.only))
        defects += tally.defects
        time.sleep(12)  # every call has hung up; the server ends them
        Path(str(log_path) + ".metrics").write_text(
            httpx.get(gateway.base_url + "/metrics", timeout=10).text)
        calls_total = sum(gateway.metric("voicegate_calls_total").values())
        active = gateway.metric("voicegate_active_calls")
        errors = gateway.metric("voicegate_errors_total")
        ready = httpx.get(gateway.base_url + "/readyz", timeout=10)
        tasks_after = gateway.tasks()
        rss_after = gateway.rss_mb()
        alive = gateway.alive()
    finally:
        gateway.stop()
    if sum(active.values()) != 0:
        defects.append(f"active calls after every call ended: {active}")
    if ready.status_code != 200:
        defects.append(f"/readyz {ready.status_code} after the run: {ready.text[:300]}")
    if tasks_after > tasks_before + 2:
        defects.append(f"asyncio tasks {tasks_before} before, {tasks_after} after every call ended")
    if not alive:
        defects.append("the gateway died")
    for code, seen in tally.codes.items():
        counted = errors.get(f'voicegate_errors_total{{code="{code}"}}', 0)
        if counted < seen:
            defects.append(f"/metrics counts {counted:.0f} {code} errors; clients got {seen}")
    # A stream whose client stops reading may be found dead first (twilio_no_media: its
    # media stalled behind the client's own sends), itself a counted close.
    not_reading = sum(errors.get(f'voicegate_errors_total{{code="{code}"}}', 0)
                      for code in ("client_not_reading", "twilio_no_media"))
    if not_reading < tally.slow_consumers:
        defects.append(f"/metrics counts {not_reading:.0f} client_not_reading (and "
                       f"twilio_no_media); {tally.slow_consumers} clients stopped reading and "
                       "were let go")
    warnings, bad = read_log(log_path)
    started = sum(1 for line in log_path.read_text(errors="replace").splitlines()
                  if '"event": "call_started"' in line)
    if started != calls_total:
        defects.append(f"/metrics voicegate_calls_total {calls_total:.0f}, but {started} "
                       "call_started lines in the log")
    defects += [f"server log: {line}" for line in bad]
    print("scenarios (ok/run):", ", ".join(f"{k} {tally.ok[k]}/{n}"
                                           for k, n in sorted(tally.runs.items())))
    print("notes:", dict(tally.notes))
    print("error codes clients got:", dict(tally.codes.most_common()))
    print("server warnings:", dict(warnings.most_common()))
    print(f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB; tasks {tasks_before} -> "
          f"{tasks_after}")
    print(f"defects: {len(defects)}")
    for defect in defects:
        print("  -", defect)
    sys.exit(1 if defects else 0)


if __name__ == "__main__":
    main()
