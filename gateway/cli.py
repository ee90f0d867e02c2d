"""The ``voicegate`` command: serve, call, demo (and the cache commands)."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from intents.types import DEFAULT_TARGET_WRONG_RATE

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models ship in packages; never reach for a hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from . import logs
    from .app import create_app
    from .drain import DrainingServer
    from .server import listening_socket, uvicorn_options
    from .services import loads_under_way
    from .settings import Settings, short_tokens

    # --store DIR wins over --redis URL and VOICEGATE_REDIS_URL, as for seed and route.
    settings = Settings.load({"host": args.host, "port": args.port, "store_dir": args.store,
                              "redis_url": "" if args.store else args.redis})
    if refused := (_store_dir_refused(args.store, must_exist=False, settings=settings)
                   or _record_dir_refused(settings)):
        return _usage_error("serve", refused)
    logs.configure(settings.log_level)
    for warning in short_tokens(settings):
        print(f"voicegate serve: warning: {warning}", file=sys.stderr)
    # The port is taken before the models load: one in use fails at once, naming it, and
    # the page's address printed below is one this process really serves (port 0 too).
    try:
        listener = listening_socket(settings.host, settings.port)
    except OSError as exc:
        return _gave_up("serve", f"cannot listen on {settings.host}:{settings.port}: "
                                 f"{exc.strerror or exc} (--host, --port)")
    port = listener.getsockname()[1]
    app = create_app(settings)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6 in a URL
    print(f"voicegate: caller page http://{shown}:{port}/ · "
          f"native protocol ws://{shown}:{port}/v1/call", flush=True)
    services = app.state.services
    # SIGTERM drains (no new calls, running ones finish up to drain_timeout_s), then exits.
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           **uvicorn_options(settings)),
                            begin_drain=services.begin_drain,
                            active_calls=lambda: services.held,
                            timeout_s=settings.drain_timeout_s)

    def give_up(reason: str) -> None:  # a model that does not load: exit, not unready for good
        server.should_exit = True

    services.on_fatal = give_up
    interrupted = False
    with listener:
        try:
            server.run(sockets=[listener])
        except KeyboardInterrupt:  # SIGINT, re-raised by uvicorn once it has shut down
            if not loads_under_way():
                raise
            print("voicegate serve: interrupted", file=sys.stderr)
            interrupted = True
    code = (130 if interrupted else _gave_up("serve", services.fatal_error)
            if services.fatal_error else 0)
    if loads_under_way():
        # Stopped while its models or a cache version load (minutes for a re-embedded
        # FAQ), or while a cancelled admin seed still renders or calibrates: the
        # interpreter's teardown would wait for that thread or kill it inside a model's
        # native code (abort, segfault). Exit now, after the exit handlers (the
        # traces' last export, the logs' flush).
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _gave_up(command: str, reason: str) -> int:
    """A start-up that cannot succeed (a model that does not load, gateway/runtime.py's
    ``load_failure``): one line on stderr naming what failed and why, status 1, no traceback."""
    print(f"voicegate {command}: {reason}", file=sys.stderr)
    return 1


def _call(args: argparse.Namespace) -> int:
    from websockets.exceptions import WebSocketException

    from .audio import resample_pcm16, write_wav
    from .client import CallRefused, Caller, MessageRefused, NoReply, format_event

    stdout_gone: list[BrokenPipeError] = []  # its reader stopped reading (`| head`)

    def out(line: str) -> None:
        try:
            print(line, flush=True)
        except BrokenPipeError as exc:
            stdout_gone.append(exc)
            raise  # in on_event: the SDK ends the call, its wait raises ConnectionError

    def show(event: dict[str, Any]) -> None:
        out(json.dumps(event) if args.json else format_event(event))

    async def run() -> int:
        async with Caller(args.url, sample_rate=args.rate, on_event=show,
                          token=args.token) as caller:
            if args.wav:
                pcm, rate = args.wav_audio
                try:
                    await caller.say(resample_pcm16(pcm, rate, args.rate),
                                     timeout=args.timeout)
                except NoReply as exc:  # said in the command's own terms (--wav, --timeout)
                    print(f"voicegate call: {_no_reply(args, exc.result.events)}",
                          file=sys.stderr)
                    return 1
            if args.text:
                await caller.say_text(args.text, timeout=args.timeout)
            audio = bytes(caller.audio)
        if args.out:
            write_wav(args.out, audio, args.rate)
            if not args.json:
                out(f"reply audio: {args.out} ({len(audio) / 2 / args.rate:.2f} s)")
        return 0

    if not args.wav and args.text is None:
        return _usage_error("call", "give --wav FILE and/or --text TEXT")
    if refused := _call_arguments_refused(args):
        return _usage_error("call", refused)
    code = 1
    try:
        code = asyncio.run(run())
    except CallRefused as exc:  # the gateway answered the upgrade with an HTTP status
        token = "; give it with --token" if exc.status == 403 else ""
        print(f"voicegate call: {exc}{token}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, ConnectionError, WebSocketException, MessageRefused) as exc:
        if not stdout_gone:  # else the call ended because nothing read it (below)
            print(f"voicegate call: {exc}", file=sys.stderr)
            return 1
    if stdout_gone:  # the reader stopped reading, mid-call or at its last line: stop, quietly
        _discard_stdout()
        return 1
    return code


def _no_reply(args: argparse.Namespace, events: list[dict[str, Any]]) -> str:
    """Why ``--wav``'s utterance got no turn: the gateway heard no words in it, or heard
    some and answered nothing within ``--timeout``."""
    heard = [e.get("text") for e in events if e.get("type") == "transcript" and e.get("text")]
    if not heard:
        came = any(e.get("type") == "transcript" for e in events)
        return (f"no reply to --wav {args.wav}: the gateway heard no words in it ("
                + ("only noise: its turn ended empty)" if came else "no transcript came)"))
    return (f"no reply to --wav {args.wav} within --timeout {args.timeout:g} s (the gateway "
            f"heard {heard[-1]!r})")


def _call_arguments_refused(args: argparse.Namespace) -> str | None:
    """What is wrong with ``call``'s URL, --text, --wav or --out, found before dialling
    (reads the WAV into ``args.wav_audio``); None when nothing is."""
    import wave
    from urllib.parse import urlsplit

    from .audio import read_wav, resample_pcm16

    if urlsplit(args.url).scheme.lower() not in ("ws", "wss"):
        return f"{args.url} is not a WebSocket URL: give ws://HOST:PORT/v1/call (or wss://)"
    if args.text is not None and not args.text.strip():
        # The gateway answers nothing to an empty text with nothing typed before it: the
        # call would only wait out --timeout for a turn that never comes.
        return ("--text is blank: the gateway answers nothing to an empty text; give the "
                "caller's words")
    if args.wav:
        try:
            args.wav_audio = read_wav(args.wav)
        except (OSError, EOFError, wave.Error, ValueError) as exc:
            why = "an empty or cut-off file" if isinstance(exc, EOFError) else str(exc)
            return f"cannot read --wav {args.wav}: {why} (a PCM WAV file is needed)"
        # At the call's rate once (``_call`` sends it as is). A header and no samples, or
        # too few to leave one at that rate: nothing to say (``say`` refuses no audio).
        pcm, rate = args.wav_audio
        args.wav_audio = (resample_pcm16(pcm, rate, args.rate), args.rate)
        if not args.wav_audio[0]:
            return (f"cannot read --wav {args.wav}: it holds no audio" if not pcm else
                    f"cannot read --wav {args.wav}: {len(pcm) // 2} sample(s) at {rate} Hz "
                    f"leave no audio at --rate {args.rate}")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            return f"cannot write --out {out}: it is a directory"
        if not out.parent.is_dir():
            return f"cannot write --out {out}: {out.parent} is not a directory"
    return None


def _store(args: argparse.Namespace, settings: Any) -> Any:
    """--store DIR wins, then --redis URL / VOICEGATE_REDIS_URL, then the local store dir."""
    from .stores import open_store

    return open_store(settings, args.store or None)


def _usage_error(command: str, message: str) -> int:
    """A usage error (argparse's status): one line naming the argument, found before any work."""
    print(f"voicegate {command}: {message}", file=sys.stderr)
    return 2


def _input_file_refused(path: str, name: str = "") -> str | None:
    """Why the input file ``path`` (``name``: the option that gave it) cannot be read, checked
    before any work; None when it can. Its content is the command's to judge."""
    file = Path(path)
    if file.is_dir():
        return f"{name}a directory, not a CSV file: {path}"
    if not file.exists():
        return f"{name}no such file: {path}"
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        return f"{name}cannot read {path}: {exc.strerror or exc}"
    return None


def _store_dir_refused(store: str | None, must_exist: bool, settings: Any) -> str | None:
    """What is wrong with the local store directory the command would use (a file; or, for
    a command that only reads the store, a directory that is not there): ``--store DIR``,
    else, without a Redis URL, the ``store_dir`` setting, named as it was given
    (``VOICEGATE_STORE_DIR``, the ``VOICEGATE_CONFIG`` file, the default). None when nothing
    is wrong or the store is Redis."""
    name = "--store"
    if not store:
        if settings.redis_url:
            return None
        store, name = settings.store_dir, _store_dir_setting(settings)
    path = Path(store)
    if path.exists() and not path.is_dir():
        return f"{name}: not a directory: {store}"
    if must_exist and not path.exists():
        return f"{name}: no such directory: {store}"
    return None


def _record_dir_refused(settings: Any) -> str | None:
    """Why serve cannot write recordings in the ``record_dir`` setting (created if missing,
    a file made and removed in it); None when it can, or recording is off. Found when the
    call ends, each call's recording would be lost."""
    import tempfile

    if not settings.record_dir:
        return None
    name = _setting_source(settings, "record_dir") or "record_dir"
    path = Path(settings.record_dir)
    if path.exists() and not path.is_dir():
        return f"{name}: not a directory: {path}"
    from .call.recording import make_private_dir

    try:
        make_private_dir(path)  # 0700: recordings are personal data
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"{name}: cannot write recordings in {path}: {exc.strerror or exc}"
    return None


def _setting_source(settings: Any, field: str) -> str | None:
    """Where a setting came from, as the operator would look for it: its environment
    variable, or the config file when it is not the default; None for the default."""
    from .settings import ENV_PREFIX

    variable = ENV_PREFIX + field.upper()
    if os.environ.get(variable) is not None:
        return variable
    if getattr(settings, field) != type(settings).model_fields[field].default:
        return f"{field} (in {ENV_PREFIX}CONFIG)"
    return None


def _store_dir_setting(settings: Any) -> str:
    """Where the ``store_dir`` setting came from, as the operator would look for it."""
    from .settings import ENV_PREFIX

    return _setting_source(settings, "store_dir") or (
        f"store_dir (the default; give --store DIR or set {ENV_PREFIX}STORE_DIR, or "
        f"{ENV_PREFIX}REDIS_URL for the shared store)")


def _seed(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from cache_seed import SeedError, SeedValidationError, read_seed_csv
    from intents.negatives import NegativesError, read_negatives_csv
    from intents.store import ANY_VERSION, PublishUnconfirmed, StoreConflict, StoreError

    from .providers.registry import create_tts
    from .runtime import build_embedder, load_failure
    from .seeding import seed_with_voice
    from .settings import Settings, usable_cpus

    settings = Settings.load({"redis_url": args.redis})
    refused = (_input_file_refused(args.csv)
               or (args.negatives and _input_file_refused(args.negatives, "--negatives: "))
               or _store_dir_refused(args.store, must_exist=False, settings=settings))
    if refused:
        return _usage_error("seed", refused)
    try:
        negatives = read_negatives_csv(args.negatives) if args.negatives else ()
    except NegativesError as exc:  # its content (as the CSV's rows): the command failed
        print(f"voicegate seed: negatives: {exc}", file=sys.stderr)
        return 1
    try:
        # Checked before the voice and the embedder load (seconds, a minute for a cloud
        # voice's first request): a bad row is told at once, and even where no voice loads.
        # Read once: a pipe (`<(curl ...)`, /dev/stdin) read again is empty.
        plan = read_seed_csv(args.csv)
    except SeedValidationError as exc:
        print(f"voicegate seed: {exc}", file=sys.stderr)
        return 1
    store = _store(args, settings)
    with ThreadPoolExecutor(max_workers=1) as executor:
        try:  # a voice or an embedder that cannot be built: one line, as `serve` ends
            tts = create_tts(settings, executor)
            # Alone in its process: every core embeds and fits (a seed by the admin API
            # runs in the gateway, on one, beside its calls).
            embedder = build_embedder(settings, threads=usable_cpus())
        except Exception as exc:  # noqa: BLE001 - any provider's or model's refusal
            return _gave_up("seed", load_failure(exc))
        before: Any = _UNREAD
        try:
            try:
                before = store.current_version()
            except StoreError:  # the seed says so itself, after validating the CSV
                pass
            # Published only over the version current now, as an upload through the admin
            # API is: an entry edited there (or another seed) while this one renders and
            # calibrates, minutes for a large seed, is not undone unsaid. A pointer that
            # cannot be read is replaced (a whole seed is what repairs it).
            report = seed_with_voice(args.csv, store, tts, embedder,
                                     target_wrong_rate=args.target_wrong_rate,
                                     progress=not args.quiet, negatives=negatives,
                                     max_new_answers=settings.seed_max_new_answers,
                                     jobs=usable_cpus(), plan=plan,
                                     replaces=ANY_VERSION if before is _UNREAD else before)
        except KeyboardInterrupt:  # Ctrl-C: the store cleaned up; say which version serves
            print(f"voicegate seed: {_interrupted_seed(store, before)}", file=sys.stderr)
            return 130
        except StoreConflict as exc:  # the newer version serves, not "the previous" one
            print(f"voicegate seed: {exc}: published while this seed ran (an entry edit, a "
                  "promotion or an upload through the admin API, or another seed), and a seed "
                  "replaces only the version current when it began; nothing was published "
                  "(the answers rendered are kept for the next seed): look at what serves "
                  "(GET /admin/entries) and seed again", file=sys.stderr)
            return 1
        except (SeedValidationError, PublishUnconfirmed) as exc:  # each says what holds
            print(f"voicegate seed: {exc}", file=sys.stderr)
            return 1
        except (SeedError, StoreError) as exc:
            print(f"voicegate seed: {exc}; the previous version keeps serving", file=sys.stderr)
            return 1
    print(report.summary())
    return 0


_UNREAD = object()  # the version serving before a seed, when it could not be read


def _interrupted_seed(store: Any, before: Any) -> str:
    """What an interrupted seed left serving. A publish interrupted before its pointer moved
    removes what it wrote; one interrupted after (in its clean-up) is published."""
    from intents.store import StoreError

    try:
        now = store.current_version()
    except StoreError as exc:
        return f"interrupted; which version serves cannot be told: {exc}"
    if not now:
        return "interrupted; nothing published"
    if before is _UNREAD:
        return f"interrupted; version {now} serves"
    if now == before:
        return f"interrupted; nothing published, the previous version keeps serving ({now})"
    return f"interrupted after version {now} was published: it serves"


def _route(args: argparse.Namespace) -> int:
    from cache_seed import route_lines
    from intents.loader import load_cache
    from intents.store import StoreError

    from .runtime import build_embedder, load_failure
    from .settings import Settings

    settings = Settings.load({"redis_url": args.redis})
    if refused := _store_dir_refused(args.store, must_exist=True,  # route only reads it
                                     settings=settings):
        return _usage_error("route", refused)
    try:
        embedder = build_embedder(settings)
    except Exception as exc:  # noqa: BLE001 - a model that cannot load: as `serve` ends
        return _gave_up("route", load_failure(exc))
    try:
        cache = load_cache(_store(args, settings), embedder)
    except StoreError as exc:
        print(f"voicegate route: {exc}", file=sys.stderr)
        return 1
    bad_lines: list[int] = []
    try:
        for result in route_lines(cache.router, _utf8_lines(sys.stdin.buffer, bad_lines)):
            print(json.dumps(result), flush=True)
    except BrokenPipeError:  # the reader stopped reading (`| head`): stop, quietly
        _discard_stdout()
        return 1
    return 1 if bad_lines else 0


def _discard_stdout() -> None:
    """stdout's reader is gone: what is left in its buffer goes to /dev/null, so the
    interpreter's flush at exit does not fail again ("Exception ignored ... BrokenPipeError")."""
    fileno = getattr(sys.stdout, "fileno", None)
    try:
        if fileno is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fileno())
            finally:
                os.close(devnull)
    except (OSError, ValueError):  # no file behind it (closed, or not a file): nothing to flush
        pass


def _utf8_lines(stream: Any, bad_lines: list[int]) -> Iterator[str]:
    """stdin's lines as text, split at CR, LF or CRLF as text mode does (a BOM on the first
    is dropped); a line that is not UTF-8 is named on stderr, added to ``bad_lines`` and
    skipped: the router never sees the lone surrogates Python would decode its bytes to."""
    number = 0
    for chunk in stream:
        for raw in chunk.splitlines():
            number += 1
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_lines.append(number)
                print(f"voicegate route: line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} "
                      f"at column {exc.start + 1}), skipped; give UTF-8 text", file=sys.stderr,
                      flush=True)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoStartError, run_demo

    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else f"cannot create it ({exc.strerror or exc})"
        return _usage_error("demo", f"--out: {why}: {args.out}")
    try:
        return run_demo(Path(args.out), port=args.port)
    except DemoStartError as exc:  # its port, its models, its agent: as `serve` ends
        return _gave_up("demo", str(exc))


def _wrong_rate(text: str) -> float:
    """``--target-wrong-rate``, read as the admin API's ``target_wrong_rate`` is (checked
    here, before any answer is rendered: a cloud voice bills)."""
    from cache_seed import parse_target_wrong_rate

    try:
        return parse_target_wrong_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_REDIS_HELP = ("shared Redis store, redis://HOST:PORT/DB (default: VOICEGATE_REDIS_URL; "
               "empty: the local store)")
_STORE_HELP = "cache directory (default: VOICEGATE_STORE_DIR); wins over a Redis URL"


EXIT_STATUS = ("exit status: 0 done; 1 the command ran and failed (invalid rows in a CSV, a "
               "store or gateway that cannot be reached, a model that does not load, a port "
               "serve cannot listen on, a `route` input line that is not UTF-8, `route` or `call` "
               "output its reader stopped reading, a `call` utterance no reply came to); 2 a usage "
               "error, found before any work (a bad "
               "argument or VOICEGATE_* setting, an input file that is missing or cannot be "
               "read, a store directory (--store or VOICEGATE_STORE_DIR) that is not a directory "
               "or, for route, is missing, a recording directory (VOICEGATE_RECORD_DIR) serve "
               "cannot write in); 130 interrupted (Ctrl-C)")


def build_parser() -> argparse.ArgumentParser:
    from .settings import SUPPORTED_SAMPLE_RATES

    parser = argparse.ArgumentParser(prog="voicegate", description=__doc__, epilog=EXIT_STATUS)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway", epilog=EXIT_STATUS)
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--store", help=_STORE_HELP)
    serve.add_argument("--redis", metavar="URL", help=_REDIS_HELP)
    serve.set_defaults(func=_serve)

    call = sub.add_parser("call", help="call a gateway with a WAV file or a transcript",
                          epilog=EXIT_STATUS)
    call.add_argument("url", help="ws://HOST:PORT/v1/call")
    call.add_argument("--wav", help="caller audio (any PCM WAV; resampled as needed)")
    call.add_argument("--text", help="a caller transcript, sent after the audio (skips STT)")
    call.add_argument("--out", help="write the reply audio to this WAV file")
    call.add_argument("--rate", type=int, default=16000, choices=SUPPORTED_SAMPLE_RATES,
                      metavar="HZ", help="sample rate to negotiate: one of "
                      f"{', '.join(map(str, SUPPORTED_SAMPLE_RATES))} (default 16000)")
    call.add_argument("--json", action="store_true", help="print events as JSON lines")
    call.add_argument("--timeout", type=_positive_seconds, default=60.0,
                      help="seconds to wait for each reply (default 60)")
    call.add_argument("--token", default=os.environ.get("VOICEGATE_CALL_TOKEN") or None,
                      help="call token, if the gateway requires one (default: "
                           "VOICEGATE_CALL_TOKEN)")
    call.set_defaults(func=_call)

    seed = sub.add_parser("seed", help="validate a FAQ CSV, render its answers, publish it",
                          epilog=EXIT_STATUS)
    seed.add_argument("csv", help="columns question, answer (required), intent, action")
    seed.add_argument("--store", help=_STORE_HELP)
    seed.add_argument("--redis", metavar="URL", help=_REDIS_HELP)
    seed.add_argument("--target-wrong-rate", type=_wrong_rate,
                      default=DEFAULT_TARGET_WRONG_RATE,
                      help="calibrate thresholds to this wrong-answer rate, a decimal between 0 "
                           f"and 1 (exclusive; default {DEFAULT_TARGET_WRONG_RATE})")
    seed.add_argument("--quiet", action="store_true", help="no progress bars")
    seed.add_argument("--negatives", metavar="CSV", default=None,
                      help="your own out-of-domain questions (a 'text' column) that must never "
                           "get a cached answer, beside the generic set shipped with voicegate")
    seed.set_defaults(func=_seed)

    route = sub.add_parser("route", help="route utterances from stdin, one JSON line each",
                           epilog=EXIT_STATUS)
    route.add_argument("--store", help=_STORE_HELP)
    route.add_argument("--redis", metavar="URL", help=_REDIS_HELP)
    route.set_defaults(func=_route)

    demo = sub.add_parser("demo", help="start a gateway and call it with synthesized callers",
                          epilog=EXIT_STATUS)
    demo.add_argument("--out", default="demo-out", help="directory for the reply WAV files")
    demo.add_argument("--port", type=int, default=0, help="0: any free port")
    demo.set_defaults(func=_demo)
    return parser



def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above zero (0 or less would wait for nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value

def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .settings import SettingsError, unknown_environment

    for name in unknown_environment():  # a typo would leave its default in place unseen
        print(f"voicegate {args.command}: warning: {name} is not a setting; ignored",
              file=sys.stderr)

    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (seed says what serves)
        print(f"voicegate {args.command}: interrupted", file=sys.stderr)
        return 130
    except SettingsError as exc:
        # A bad VOICEGATE_* value or config file: the message names every bad field and
        # never a value (some are secrets), so it is the whole answer, without a traceback.
        return _usage_error(args.command, str(exc))


if __name__ == "__main__":
    sys.exit(main())
