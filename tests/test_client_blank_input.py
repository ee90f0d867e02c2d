"""The client SDK (gateway/client.py) and ``voicegate call`` refuse, at once, input the
gateway answers nothing to: a blank text, no audio. No server is dialled here."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from gateway.audio import write_wav
from gateway.client import Caller


class _Line:
    """A connected socket's stand-in: keeps what the caller sends; a binary frame finds
    the line down (so a line that would run forever ends)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, data: Any) -> None:
        if isinstance(data, bytes):
            raise ConnectionError("line down")
        self.sent.append(json.loads(data))


def _caller() -> tuple[Caller, _Line]:
    caller = Caller("ws://127.0.0.1:9/v1/call")
    line = _Line()
    caller._ws = line  # type: ignore[assignment]
    return caller, line


@pytest.mark.parametrize("text", ["", "  ", "\n\t "])
@pytest.mark.parametrize("partial_words", [False, True])
async def test_say_text_refuses_a_blank_text_at_once(text, partial_words):
    """Review (stop 64): ``say_text("")`` or ``say_text("  ")`` sent an empty final with
    nothing typed before it, which the gateway ignores by design (docs/protocol.md: it
    says nothing), then waited its whole timeout (60 s) for a `turn_metrics` that never
    comes and raised "no 'turn_metrics' event". Now a ValueError at once that says why,
    and nothing is sent."""
    caller, line = _caller()
    with pytest.raises(ValueError, match="blank") as refused:
        await caller.say_text(text, partial_words=partial_words, timeout=0.01)
    assert "answers nothing" in str(refused.value), refused.value
    assert line.sent == []


async def test_say_refuses_no_audio_at_once():
    """Review (stop 64): ``say(b"")`` queued nothing on the line, then waited for the line
    to drain it, which only a frame sent of it does: it waited for ever (no timeout
    applies there). ``voicegate call --wav`` of a WAV holding no samples did the same.
    Now a ValueError at once, and nothing is queued."""
    caller, line = _caller()
    with pytest.raises(ValueError, match="no audio"):
        await caller.say(b"", nothing_heard_ms=0)
    assert caller._line is None and line.sent == []


async def test_stream_audio_of_nothing_returns_at_once():
    """Review (stop 64): ``stream_audio(b"")`` waited for ever for a drain no frame would
    bring. Nothing to send is sent at once: it returns, no line started."""
    caller, _ = _caller()
    await caller.stream_audio(b"")
    assert caller._line is None


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_call_command_refuses_a_blank_text_before_calling(text, capsys):
    """Review (stop 64): ``voicegate call --text " "`` dialled, sent the blank text, which
    the gateway answers nothing to, and waited out --timeout (60 s) before failing;
    ``--text ""`` said "give --wav FILE and/or --text TEXT", which it had been given. Now
    one line saying why, usage status 2, before anything is dialled (the port here listens
    to nothing)."""
    from gateway import cli

    code = cli.main(["call", f"ws://127.0.0.1:{_unused_port()}/v1/call", "--text", text])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("voicegate call: --text is blank"), err
    assert "answers nothing" in err and len(err.splitlines()) == 1, err


def test_call_command_refuses_a_wav_holding_no_audio_before_calling(tmp_path, capsys):
    """Review (stop 64): a WAV with a header and no samples was read as no audio, then
    ``say(b"")`` waited for ever. Now refused by name, status 2, before dialling."""
    from gateway import cli

    wav = tmp_path / "silence.wav"
    write_wav(wav, b"", 16000)
    code = cli.main(["call", f"ws://127.0.0.1:{_unused_port()}/v1/call", "--wav", str(wav)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"voicegate call: cannot read --wav {wav}: it holds no audio\n", err


def test_call_command_refuses_a_wav_too_short_to_leave_a_sample_at_the_call_rate(
        tmp_path, capsys):
    """Review (stop 64): one sample at 48 kHz resamples to none at 16 kHz: the same wait
    for ever as an empty WAV. Refused by name, status 2, before dialling."""
    from gateway import cli

    wav = tmp_path / "click.wav"
    write_wav(wav, b"\x01\x00", 48000)
    code = cli.main(["call", f"ws://127.0.0.1:{_unused_port()}/v1/call", "--wav", str(wav)])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"voicegate call: cannot read --wav {wav}: 1 sample(s) at "
                                 "48000 Hz leave no audio at --rate 16000\n"), err


@pytest.mark.parametrize("frame_ms", [0, -20, 2.5, "20"])
def test_a_caller_whose_frame_length_is_no_whole_positive_ms_is_refused_at_once(frame_ms):
    """Review (stop 69): ``Caller(url, frame_ms=0)`` (or -20, 2.5, "20" read from a
    config) was taken and the call started (the gateway never sees frame_ms), then the
    first ``say``/``stream_audio`` waited for ever: the line that sends the audio died on
    its first frame (a division by a frame of no bytes, a slice by a float or a string;
    -20 spun first) before any went out, and nothing woke the wait for it to drain. Now a
    ValueError naming the argument, before anything is dialled."""
    with pytest.raises(ValueError, match="frame_ms") as refused:
        Caller("ws://127.0.0.1:9/v1/call", frame_ms=frame_ms)
    assert "a whole number of milliseconds" in str(refused.value), refused.value
