"""End to end over a real uvicorn server and a real WebSocket client, with synthesized speech."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import httpx
import pytest
from websockets.asyncio.client import connect

from gateway.audio import read_wav, write_wav
from gateway.client import Caller
from tests.test_miss_e2e import agent_gateway, long_answer  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

TIMELINE_KEYS = ("end_of_turn_ms", "final_transcript_ms", "route_decided_ms", "first_audio_ms",
                 "reply_latency_ms")


def words(text: str | None) -> set[str]:
    return set((text or "").lower().replace("?", " ").replace(".", " ").replace(",", " ").split())


async def until_heard(caller: Caller, ms: int, since: int) -> None:
    """Wait until ``ms`` of reply audio has reached ``caller`` after ``since`` bytes of it:
    the reply is playing (counted in audio received, not in time slept: on a loaded
    machine the reply may start late), within a generous ceiling that only bounds a hang."""
    async with asyncio.timeout(30):
        while len(caller.audio) - since < ms * caller.sample_rate * 2 // 1000:
            await asyncio.sleep(0.02)


def test_health_and_readiness(server):
    assert httpx.get(server.base_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["load_times_s"]) >= {"vad", "stt", "tts"}



async def test_websocket_frames_are_not_compressed(server):
    # A client offering permessage-deflate (websockets does by default) gets plain frames:
    # deflating audio gains nothing and costs the event loop CPU on every frame.
    async with connect(server.call_url, compression="deflate") as ws:
        assert "permessage-deflate" not in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"

async def test_spoken_turn_is_transcribed_answered_and_timed(server, speak):
    async with Caller(server.call_url) as caller:
        assert caller.ready and caller.ready["sample_rate"] == 16000
        turn = await caller.say(speak("What time do your branches open on Saturday?"),
                                nothing_heard_ms=30000)  # loaded machine: slow first words
    assert {"branches", "open", "saturday"} <= words(turn.transcript)
    # This gateway has an empty cache and no LLM: the only honest answer is a handoff.
    response = turn.first("response")
    assert response is not None and response["source"] == "handoff"
    assert turn.first("handoff") is not None
    assert len(turn.audio) > 16000 * 2 * 0.5  # at least half a second of reply audio
    metrics = turn.metrics
    assert metrics is not None and metrics["interrupted"] is False
    for key in TIMELINE_KEYS:
        assert metrics[key] is not None and metrics[key] >= 0, key
    # the stages happen in order
    assert metrics["end_of_turn_ms"] <= metrics["reply_latency_ms"]
    assert metrics["final_transcript_ms"] <= metrics["route_decided_ms"] <= \
        metrics["reply_latency_ms"]


async def test_reply_audio_follows_the_negotiated_rate(server, speak):
    async with Caller(server.call_url, sample_rate=8000) as caller:
        turn = await caller.say(speak("Hello, can you help me with my card?", 8000),
                                nothing_heard_ms=30000)
        metrics = turn.metrics
    assert metrics is not None
    # reply_ms of audio at 8 kHz: 16 bytes per ms (frames are whole, so allow one frame)
    played = len(turn.audio) / 16
    assert abs(played - metrics["reply_ms"]) < 200


async def test_barge_in_stops_playback_and_interrupts(agent_gateway, speak):
    # A reply far longer than a barge-in takes to be confirmed, even on a loaded machine
    # (its VAD seconds behind): the handoff message (~4 s) was over before a slow one, the
    # caller's words became a turn of their own, and no `interrupt` came.
    server, fake, _ = agent_gateway
    answer = long_answer(fake, 9)
    marks: dict[str, int] = {}
    caller = Caller(server.call_url)
    caller._on_event = lambda e: marks.setdefault(e["type"] + str(e.get("turn", "")),
                                                  len(caller.audio))
    await caller.connect()
    try:
        # nothing_heard_ms: on a loaded machine the first words come late, and say() must
        # not give up on the turn (and return) before the reply it waits for has begun.
        first = asyncio.create_task(caller.say(speak("I have a question about my account."),
                                               nothing_heard_ms=30000))
        response = await caller.wait_for("response", timeout=60)
        await until_heard(caller, 500, since=marks["response" + str(response["turn"])])
        assert not first.done()
        interrupt_task = asyncio.create_task(caller.wait_for("interrupt", timeout=30))
        await caller.stream_audio(speak("Actually, stop. I want to talk about something else."))
        interrupt = await interrupt_task
        first_metrics = await caller.wait_for("turn_metrics", turn=response["turn"])
        await asyncio.gather(first, return_exceptions=True)
    finally:
        await caller.close()
    assert response["source"] == "llm"  # the long answer
    assert interrupt["turn"] == response["turn"] and interrupt["cause"] == "speech"
    assert first_metrics["interrupted"] is True
    # Cut before its end: the whole reply is the gateway's voice saying the answer (~25 s),
    # not a guess at its length.
    full_reply_ms = len(speak(answer)) / 32
    assert 300 <= first_metrics["heard_ms"] < full_reply_ms
    # Nothing of the interrupted reply arrived after `interrupt`: the audio received
    # up to the next reply's `response` equals the audio received up to `interrupt`.
    next_turn = response["turn"] + 1
    at_interrupt = marks["interrupt" + str(response["turn"])]
    at_next = marks.get("response" + str(next_turn), len(caller.audio))
    assert at_next == at_interrupt


async def test_backchannel_does_not_interrupt(server, speak, runtime):
    backchannel = speak("Uh-huh.")
    # trim to its voiced part so it is a real, short backchannel
    assert len(backchannel) / 32 < runtime.settings.barge_in_min_speech_ms + 300
    async with Caller(server.call_url) as caller:
        task = asyncio.create_task(caller.say(speak("Can you tell me about savings accounts?"),
                                              nothing_heard_ms=30000))  # slow first words
        before = len(caller.audio)
        await caller.wait_for("response", timeout=60)
        await until_heard(caller, 300, since=before)  # the reply plays: then the "uh-huh"
        await caller.stream_audio(backchannel[: int(0.25 * 32000)])
        turn = await task
    assert turn.first("interrupt") is None
    assert turn.metrics is not None and turn.metrics["interrupted"] is False


async def test_text_turns_with_partials(server):
    async with Caller(server.call_url) as caller:
        turn = await caller.say_text("how do I order a new debit card", partial_words=True,
                                     word_interval_s=0.01)
    partials = [e for e in turn.events if e["type"] == "transcript" and not e["final"]]
    assert len(partials) == 8 and turn.transcript == "how do I order a new debit card"
    assert turn.first("response") is not None and len(turn.audio) > 0
    assert turn.metrics is not None and turn.metrics["input"] == "text"


# ---------------------------------------------------------------- bad input

async def _raw(server, *messages, expect_close: bool):
    """Send raw messages, return (error events, close code or None).

    Every case is answered by an error: it is waited for with a generous ceiling (a
    loaded machine answers late, beside the healthy call's reply); after it, for the close
    as long, or a quiet second in which no further error may come."""
    async with connect(server.call_url) as ws:
        errors: list[dict] = []
        for message in messages:
            await ws.send(message)
        try:
            while True:
                quiet_s = 30 if expect_close or not errors else 1
                reply = await asyncio.wait_for(ws.recv(), timeout=quiet_s)
                if isinstance(reply, str):
                    event = json.loads(reply)
                    if event["type"] == "error":
                        errors.append(event)
        except asyncio.TimeoutError:
            return errors, None
        except Exception:
            return errors, ws.close_code


START = json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm16"})


@pytest.mark.parametrize("messages, code, close", [
    (["{not json"], "invalid_json", None),
    ([json.dumps({"type": "dance"})], "unknown_message_type", None),
    ([b"\x00" * 640], "audio_before_start", None),
    # Before `start` no frame is heard, whatever it holds: the call stays open for its start
    # (an odd length closed it, 1007, over audio that would have been dropped anyway).
    ([b"\x00" * 641], "audio_before_start", None),
    ([b""], "audio_before_start", None),
    ([b"\x00" * (64 * 1024 + 2)], "frame_too_large", 1009),
    ([json.dumps({"type": "start", "sample_rate": 12345})], "unsupported_sample_rate", 1003),
    ([json.dumps({"type": "start", "sample_rate": 16000, "encoding": "mp3"})],
     "unsupported_encoding", 1003),
    # A running call drops one frame of an odd length, or one message over 64 KiB (read whole,
    # within the WebSocket layer's 1 MiB), and goes on: they closed it, 1007 and 1009, until
    # stop 62's review (a dropped call is worse than one lost frame).
    ([START, b"\x00" * 641], "odd_pcm_length", None),
    ([START, b"\x00" * (64 * 1024 + 2)], "frame_too_large", None),
    ([START, json.dumps({"type": "text", "text": "x" * (64 * 1024)})], "frame_too_large", None),
    ([START, START], "already_started", None),
    ([json.dumps({"type": "text", "text": "hi"})], "not_started", None),
])
async def test_bad_input_gets_a_specific_error(server, speak, messages, code, close):
    # A healthy call runs alongside; it must finish its turn untouched.
    async with Caller(server.call_url) as healthy:
        healthy_turn = asyncio.create_task(healthy.say_text("do you have branches downtown"))
        errors, close_code = await _raw(server, *messages, expect_close=close is not None)
        turn = await healthy_turn
    assert [e["code"] for e in errors] == [code]
    assert errors[0]["message"]
    assert close_code == close
    assert turn.first("response") is not None and turn.first("error") is None


async def test_client_vanishing_mid_reply_is_cleaned_up(server, runtime):
    before = runtime.stats.active_calls
    ws = await connect(server.call_url)
    await ws.send(START)
    await ws.recv()  # ready
    await ws.send(json.dumps({"type": "text", "text": "tell me about mortgages", "final": True}))
    got_audio = False
    while not got_audio:
        got_audio = isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
    ws.transport.abort()  # no close frame: the client just disappears
    for _ in range(600):  # 30 s: a bound on a hang, not a pace (a loaded machine is slow)
        if runtime.stats.active_calls == before:
            break
        await asyncio.sleep(0.05)
    assert runtime.stats.active_calls == before
    async with Caller(server.call_url) as caller:  # the server still serves
        turn = await caller.say_text("hello")
    assert turn.first("response") is not None


def test_call_command_streams_a_wav_and_saves_the_reply(server, speak, tmp_path):
    wav = tmp_path / "question.wav"
    write_wav(wav, speak("Where is your nearest branch?", 22050), 22050)  # resampled by `call`
    out = tmp_path / "reply.wav"
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "call", server.call_url, "--wav", str(wav),
         "--out", str(out), "--json", "--rate", "8000"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "ready" and "response" in kinds and "turn_metrics" in kinds
    final = next(e for e in events if e["type"] == "transcript" and e["final"])
    assert {"nearest", "branch"} <= words(final["text"])
    audio, rate = read_wav(out)
    assert rate == 8000 and len(audio) > 8000


def test_call_command_reports_an_unreachable_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "call",
                             f"ws://127.0.0.1:{port}/v1/call", "--text", "hi"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "voicegate call:" in result.stderr


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wav_is", ["missing", "not a WAV", "empty", "a directory"])
def test_call_command_refuses_a_bad_wav_before_calling(wav_is, tmp_path, capsys):
    # `voicegate call --wav question.csv` dialled the gateway, then ended on a traceback
    # (wave.Error: file does not start with RIFF id; an empty file: a bare EOFError); a
    # missing file was found only once the call was up. Now: one line naming the file, status
    # 2, before anything is dialled (the port here listens to nothing).
    from gateway import cli

    wav = tmp_path / "question.wav"
    if wav_is == "not a WAV":
        wav.write_text("question,answer\n")
    elif wav_is == "empty":
        wav.write_bytes(b"")
    elif wav_is == "a directory":
        wav.mkdir()
    code = cli.main(["call", f"ws://127.0.0.1:{_unused_port()}/v1/call", "--wav", str(wav)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"voicegate call: cannot read --wav {wav}: "), err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/v1/call", "127.0.0.1:8080"])
def test_call_command_refuses_a_url_that_is_not_a_websocket(url, capsys):
    # An operator who pasted the caller page's http:// URL got websockets' InvalidURI
    # traceback.
    from gateway import cli

    try:
        code = cli.main(["call", url, "--text", "hi"])
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"`voicegate call {url}` raised {type(exc).__name__}: {exc}")
    err = capsys.readouterr().err
    assert code == 2 and err == (f"voicegate call: {url} is not a WebSocket URL: give "
                                 "ws://HOST:PORT/v1/call (or wss://)\n"), err


def test_call_command_says_an_out_path_it_cannot_write_before_calling(tmp_path, capsys):
    # --out in a directory that does not exist: the call ran, then the reply was lost with
    # "Not a directory" and the wave module's "Exception ignored ... AttributeError"
    # traceback. Now it is refused before dialling, status 2.
    from gateway import cli

    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "reply.wav"
    code = cli.main(["call", f"ws://127.0.0.1:{_unused_port()}/v1/call", "--text", "hi",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"voicegate call: cannot write --out {out}: "
                                 f"{tmp_path / 'afile'} is not a directory\n"), err


def test_write_wav_to_a_path_it_cannot_open_raises_only_the_os_error(tmp_path, monkeypatch):
    import gc

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "afile").write_text("")
        write_wav(tmp_path / "afile" / "reply.wav", b"\0\0", 16000)
    gc.collect()
    assert unraisable == []


async def test_metrics_count_turns_by_outcome(server):
    def turns_total() -> float:
        text = httpx.get(server.base_url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("voicegate_turns_total{"))

    before = turns_total()
    async with Caller(server.call_url) as caller:
        await caller.say_text("is there a branch near the station")
    body = httpx.get(server.base_url + "/metrics").text
    assert turns_total() == before + 1
    assert 'voicegate_stage_seconds_bucket{le="0.005",outcome="miss",stage="first_audio"}' in body
    # The collector's pauses (gateway/collector.py): young collections happen in any call.
    young = [line for line in body.splitlines()
             if line.startswith('voicegate_gc_pause_seconds_count{generation="0"}')]
    assert young and float(young[0].rsplit(" ", 1)[1]) > 0
