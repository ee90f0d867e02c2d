"""Capacity: how many concurrent calls one gateway process holds at the bar.

    python bench/capacity.py [--mode text audio] [--steps 50 100 200 300 500] [--step-s 30]
        [--variant LABEL KEY=VALUE[,KEY=VALUE]] [--tree LABEL=DIR] [--metrics-out turns.jsonl]
        [--replicas 1 2]

The gateway runs in its own process (bench/gateway_process.py), the Deepgram fake in
another (audio mode, ``realistic()`` timing), and this process is only the load
generator. ``--replicas 2`` runs two gateway processes behind HAProxy instead (the
repository's deploy/haproxy.cfg, least connections), the load generator on its URL: what
one machine holds as a cluster of one replica per core (``--replicas 1 2``: both shapes,
steps interleaved). For each step of concurrent calls every caller talks for ``--step-s``:

- text: a FAQ question as partial transcripts word by word (150 ms a word, the last
  partial holding every word, as a streaming recogniser's last interim does), then the
  final; every fifth final carries two words no partial had (a cold embedding). The
  caller listens to the whole reply, pauses, asks again.
- audio: the questions spoken (Piper, 16 kHz) as real 20 ms frames at real pace, with
  silence between turns; STT is remote (Deepgram's live protocol against the fake).

Per step: server ``first_audio_ms`` of cache hits p50/p99 (end of turn -> first reply
frame), client final (or end of speech) -> first reply audio, route time of finals with
a new word (server ``route_decided_ms``), outbound frame lag (server: share of frames
more than 20 ms behind their time and the worst; client: p99 of arrival lateness),
gateway CPU per call (% of one core), memory per call (RSS growth over the gateway's RSS before its first step / calls), errors.
Turns that start in the first ``--warmup-s`` of a step are left out of latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.gateway_process import (FAQ_PARAPHRASES, Cluster, GatewayProcess,  # noqa: E402
                                   free_port, process_cpu_s, seed_store)
from gateway.client import Caller  # noqa: E402

WORD_S = 0.150
RATE = 16000
# Words a final may add that no partial had: two of them make a wording never embedded.
NEW_WORDS = ["today", "please", "exactly", "again", "now", "quickly", "actually", "though",
             "still", "currently", "normally", "usually", "anyway", "honestly", "maybe",
             "here", "there", "tonight", "tomorrow", "this", "week", "month", "year",
             "sir", "madam", "friend", "kindly", "then", "also", "really"]
NEW_WORD_EVERY = 5  # every fifth text turn


@dataclass
class Step:
    calls: int
    server_hit_ms: list[float] = field(default_factory=list)
    # The same, of hits whose final had no new word (its vector was cached): what the
    # tail is without a forward pass.
    known_words_hit_ms: list[float] = field(default_factory=list)
    client_ms: list[float] = field(default_factory=list)
    new_word_route_ms: list[float] = field(default_factory=list)
    client_lag_ms: list[float] = field(default_factory=list)
    frames_sent: int = 0
    frames_late: int = 0
    frame_lag_max_ms: float = 0.0
    turns: int = 0
    hits: int = 0
    reused: int = 0
    partials_routed: int = 0
    partials_skipped: int = 0
    partials_shed: int = 0
    errors: list[str] = field(default_factory=list)
    counting_from: float = 0.0
    # Every counted turn's server metrics, with "new_word" and "client_ms" (--metrics-out).
    turn_metrics: list[dict] = field(default_factory=list)

    def counting(self, at: float) -> bool:
        return at >= self.counting_from


class FrameClock:
    """Client-side lateness of reply frames: frame n of a reply is due n x 20 ms after the
    reply's first frame; a frame later than that is a gap the caller hears (frames that
    come early, within the playout lead, count as 0)."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.first: float | None = None
        self.heard_s = 0.0  # audio received before this frame (frames of any frame_ms)
        self.count = 0  # frames received since the reset

    def reset(self) -> None:
        self.first, self.heard_s, self.count = None, 0.0, 0

    def __call__(self, frame: bytes) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif self.step.counting(now):
            lag = (now - (self.first + self.heard_s)) * 1000.0
            self.step.client_lag_ms.append(max(0.0, lag))
        self.heard_s += len(frame) / (2 * RATE)  # pcm16 at the caller's rate
        self.count += 1


def record(step: Step, metrics: dict, client_ms: float | None, started: float,
           new_word: bool = False) -> None:
    if not step.counting(started):
        return
    step.turns += 1
    step.turn_metrics.append({**metrics, "new_word": new_word, "client_ms": client_ms})
    step.frames_sent += int(metrics.get("frames_sent") or 0)
    step.frames_late += int(metrics.get("frames_late") or 0)
    step.frame_lag_max_ms = max(step.frame_lag_max_ms, metrics.get("frame_lag_max_ms") or 0.0)
    step.partials_routed += int(metrics.get("partials_routed") or 0)
    step.partials_skipped += int(metrics.get("partials_skipped") or 0)
    step.partials_shed += int(metrics.get("partials_shed") or 0)
    if new_word and metrics.get("route_decided_ms") is not None:
        step.new_word_route_ms.append(metrics["route_decided_ms"])
    if metrics.get("source") == "cache":
        step.hits += 1
        step.reused += bool(metrics.get("route_reused"))
        if metrics.get("first_audio_ms") is not None:
            step.server_hit_ms.append(metrics["first_audio_ms"])
            if not new_word:
                step.known_words_hit_ms.append(metrics["first_audio_ms"])
        if client_ms is not None:
            step.client_ms.append(client_ms)


async def first_audio_after(caller: Caller, frames_before: int, clock: FrameClock,
                            timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while clock.count <= frames_before and caller._reader is not None and \
            not caller._reader.done():
        if time.monotonic() > deadline:
            raise TimeoutError("no reply audio")
        await asyncio.sleep(0.002)
    return time.monotonic()


async def text_caller(url: str, step: Step, until: float, seed: int, step_index: int = 0,
                      arrive_s: float = 2.0) -> None:
    # Each step draws its own questions and new words (the runs of one step the same ones):
    # a step repeating the last one's finals would find their new words already embedded.
    rng = random.Random(f"{step_index}:{seed}")
    await asyncio.sleep(rng.uniform(0, arrive_s))  # callers do not all start on one tick
    clock = FrameClock(step)
    turn = 0
    try:
        async with Caller(url, on_audio=clock, keep_audio=False) as caller:
            while time.monotonic() < until:
                turn += 1
                question = rng.choice(FAQ_PARAPHRASES)
                new_word = turn % NEW_WORD_EVERY == seed % NEW_WORD_EVERY
                final = f"{question} {rng.choice(NEW_WORDS)} {rng.choice(NEW_WORDS)}" \
                    if new_word else question
                index = len(caller.events)
                started = time.monotonic()
                words = question.split()
                for n in range(1, len(words) + 1):
                    await caller.send_json({"type": "text", "text": " ".join(words[:n]),
                                            "final": False})
                    await asyncio.sleep(WORD_S)
                clock.reset()
                await caller.send_json({"type": "text", "text": final, "final": True})
                await finish_turn(caller, step, clock, index, started, new_word)
                await asyncio.sleep(rng.uniform(0.3, 1.0))  # the caller thinks
    except Exception as exc:  # counted, never fatal for the other callers
        step.errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def finish_turn(caller: Caller, step: Step, clock: FrameClock, index: int,
                      started: float, new_word: bool = False) -> None:
    """The turn just sent (its last text or audio frame went out now): wait for its first
    reply audio and its metrics, count an error event, record it."""
    sent = time.monotonic()
    heard = await first_audio_after(caller, 0, clock)
    metrics = await caller.wait_for_answered_turn(start=index, timeout=60)
    errors = [e for e in caller.events[index:] if e.get("type") == "error"]
    if errors:
        step.errors.append(f"error event {errors[0].get('code')}")
    record(step, metrics, (heard - sent) * 1000.0, started, new_word)


async def audio_caller(url: str, step: Step, until: float, seed: int,
                       speech: list[bytes], line_noise: bytes, arrive_s: float = 2.0) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(rng.uniform(0, arrive_s))
    clock = FrameClock(step)
    try:
        async with Caller(url, on_audio=clock, keep_audio=False,
                          line_noise=line_noise) as caller:
            turn = 0
            while time.monotonic() < until:
                # The fake recognises the questions in order, one per utterance.
                pcm = speech[turn % len(speech)]
                turn += 1
                index = len(caller.events)
                started = time.monotonic()
                clock.reset()
                await caller.stream_audio(pcm)  # returns once its last frame is sent
                await finish_turn(caller, step, clock, index, started)
                await asyncio.sleep(rng.uniform(0.5, 1.0))  # silence flows meanwhile
    except Exception as exc:
        step.errors.append(f"{type(exc).__name__}: {exc}"[:200])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# Each gateway's RSS before its first step (memory per call is measured against it).
_RSS_BASELINE: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


async def run_step(gateway: GatewayProcess | Cluster, mode: str, calls: int, step_s: float,
                   warmup_s: float, speech: list[bytes], line_noise: bytes = b"",
                   step_index: int = 0, arrive_s: float = 2.0
                   ) -> tuple[Step, float, float, float]:
    step = Step(calls)
    now = time.monotonic()
    step.counting_from = now + warmup_s
    until = now + step_s
    # Memory per call against the gateway's RSS before its first step, not before this
    # one: what earlier (smaller) steps' calls left behind is reused by this step's calls.
    rss_before = _RSS_BASELINE.setdefault(gateway, gateway.rss_mb())
    if mode == "text":
        callers = [text_caller(gateway.call_url, step, until, i, step_index, arrive_s)
                   for i in range(calls)]
    else:
        callers = [audio_caller(gateway.call_url, step, until, i, speech, line_noise,
                                arrive_s) for i in range(calls)]
    tasks = [asyncio.ensure_future(c) for c in callers]
    await asyncio.sleep(warmup_s)
    cpu0, wall0, own0 = gateway.cpu_s(), time.monotonic(), time.process_time()
    rss_peak = gateway.rss_mb()
    while time.monotonic() < until:
        await asyncio.sleep(1.0)
        rss_peak = max(rss_peak, gateway.rss_mb())
    cpu1, wall1, own1 = gateway.cpu_s(), time.monotonic(), time.process_time()
    await asyncio.gather(*tasks)
    wall = wall1 - wall0
    return step, (cpu1 - cpu0) / wall, (rss_peak - rss_before), (own1 - own0) / wall


def report(name: str, step: Step, cpu_cores: float, rss_mb: float, gen_cores: float,
           load: str) -> None:
    late = step.frames_late / step.frames_sent if step.frames_sent else float("nan")
    print(f"{name:5s} {step.calls:4d} calls | turns {step.turns:5d} hits {step.hits:5d} "
          f"(decided on partials {step.reused / max(1, step.hits):5.1%}) | "
          f"hit first_audio_ms p50 {pct(step.server_hit_ms, 50):6.2f} "
          f"p99 {pct(step.server_hit_ms, 99):7.2f} | client final->audio p50 "
          f"{pct(step.client_ms, 50):6.1f} p99 {pct(step.client_ms, 99):7.1f}", flush=True)
    print(f"      new-word final route_ms p50 {pct(step.new_word_route_ms, 50):6.2f} "
          f"p99 {pct(step.new_word_route_ms, 99):7.2f} (n={len(step.new_word_route_ms)}) | "
          f"hits without a new word: first_audio_ms p50 {pct(step.known_words_hit_ms, 50):5.2f} "
          f"p99 {pct(step.known_words_hit_ms, 99):6.2f} | "
          f"frames late >20ms {late:6.2%} of {step.frames_sent} (server max "
          f"{step.frame_lag_max_ms:.0f} ms), client lag p99 {pct(step.client_lag_ms, 99):6.1f} ms"
          f" | partials routed {step.partials_routed} skipped {step.partials_skipped} "
          f"shed {step.partials_shed}", flush=True)
    print(f"      gateway CPU {cpu_cores * 100:5.1f}% of a core = "
          f"{cpu_cores * 100 / step.calls:5.3f}% per call | memory +{rss_mb:6.1f} MB = "
          f"{rss_mb * 1024 / step.calls:6.1f} KB per call | load generator "
          f"{gen_cores * 100:5.1f}% of a core | errors {len(step.errors)}"
          f"{' e.g. ' + step.errors[0] if step.errors else ''} | {load}", flush=True)
    refused = sum("HTTP 503" in error for error in step.errors)
    if refused:  # counted among the errors too: the step did not carry that many calls
        print(f"      refused at the upgrade (503: overloaded, too_many_calls): {refused} of "
              f"{step.calls} callers", flush=True)


def holds_bar(mode: str, step: Step) -> bool:
    if step.errors or not step.server_hit_ms:
        return False
    if mode == "text":
        ok = pct(step.server_hit_ms, 50) <= 2.0 and pct(step.server_hit_ms, 99) <= 10.0
        if step.calls <= 200 and step.new_word_route_ms:
            ok = ok and pct(step.new_word_route_ms, 50) <= 5.0
        return ok
    late = step.frames_late / max(1, step.frames_sent)
    return late <= 0.01 and pct(step.server_hit_ms, 99) <= 10.0


def render_speech(noise_dbfs: float | None) -> tuple[list[bytes], bytes]:
    """The FAQ paraphrases spoken once with the project's voice, 16 kHz, and what the line
    carries between them: white noise at ``noise_dbfs`` (RMS) under everything, or
    digital silence (None)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from gateway.audio import resample_pcm16
    from gateway.providers.piper_tts import PiperTTS

    from bench.speech_corpus import trim

    tts = PiperTTS(ThreadPoolExecutor(1))
    # Trimmed: Piper ends a clip on 100-175 ms of its own silence, and the client's clock
    # ("end of speech -> first audio") starts when the clip has been streamed.
    clips = [trim(resample_pcm16(tts.synthesize_all(text), tts.sample_rate, RATE))
             for text in FAQ_PARAPHRASES]
    if noise_dbfs is None:
        return clips, b""
    rng = np.random.default_rng(0)
    scale = 32768.0 * 10.0 ** (noise_dbfs / 20.0)

    def noisy(pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, "<i2") + rng.standard_normal(len(pcm) // 2) * scale
        return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()

    return [noisy(c) for c in clips], noisy(bytes(2 * RATE * 10))  # a 10 s noise loop


class DeepgramFake:
    """tests/fakes/deepgram_server.py in its own process, realistic timing."""

    def __init__(self) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "tests.fakes.deepgram_server", "--port", str(self.port),
                "--realistic", "--ms-per-word", "250"]
        for text in FAQ_PARAPHRASES:
            args += ["--utterance", text]
        self.proc = subprocess.Popen(args, cwd=ROOT)
        time.sleep(3.0)
        if self.proc.poll() is not None:
            sys.exit("the Deepgram fake did not start")

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.2f}/{five:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=["text", "audio"], default=["text", "audio"])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 300, 500])
    parser.add_argument("--step-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=6.0)
    parser.add_argument("--arrive-s", type=float, default=2.0,
                        help="callers join over this long (uniformly), not all at once: "
                             "long enough, a replica past its capacity refuses the late "
                             "ones (overloaded, 503; gateway/overload.py)")
    parser.add_argument("--store", help="an already seeded store of the example FAQ")
    parser.add_argument("--turn-model", default=None, choices=["smart_turn", "none"],
                        help="audio mode: the end-of-turn model (default: the gateway's)")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="extra gateway settings, e.g. VOICEGATE_ROUTE_STEP_WORDS=1")
    parser.add_argument("--variant", nargs=2, action="append", default=[],
                        metavar=("LABEL", "KEY=VALUE[,KEY=VALUE]"),
                        help="also run a gateway with these settings, its steps interleaved "
                             "with the default's (two settings compared in one run)")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                        help="also run a gateway from this source tree (e.g. `git archive` "
                             "of an earlier commit), steps interleaved: two versions, one run")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1], choices=[1, 2],
                        help="2: two gateway processes behind HAProxy (deploy/haproxy.cfg, "
                             "scripts/ensure-haproxy.sh), callers on the balancer's URL; CPU "
                             "and memory are the replicas' sums, HAProxy's CPU apart. '1 2': "
                             "both shapes, their steps interleaved")
    parser.add_argument("--line-noise-dbfs", type=float, default=-65.0,
                        help="audio: white noise under the callers' speech and silences "
                             "(RMS dBFS; a quiet phone line is -60 to -70); 'nan': digital "
                             "silence")
    parser.add_argument("--metrics-out", type=Path, default=None,
                        help="write every counted turn's metrics here (JSON lines, with "
                             "run, calls, new_word and client_ms) to study the tail")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    store = seed_store(args.store)
    extra = dict(item.split("=", 1) for item in args.env)
    variants = [(label, dict(kv.split("=", 1) for kv in settings.split(",")))
                for label, settings in args.variant]
    trees = [item.split("=", 1) for item in args.tree]
    if args.metrics_out is not None:
        args.metrics_out.write_text("")  # this run's turns only (modes append)
    print(f"machine: {os.cpu_count()} cores, {machine_load()} before the run; gateway env "
          f"{extra or 'defaults'}", flush=True)
    for mode in args.mode:
        env = {"VOICEGATE_MAX_CALLS": "2000", **extra}
        fake = None
        speech: list[bytes] = []
        line_noise = b""
        if mode == "audio":
            noise = None if args.line_noise_dbfs != args.line_noise_dbfs else args.line_noise_dbfs
            speech, line_noise = render_speech(noise)
            print(f"audio: line noise {'none' if noise is None else f'{noise:g} dBFS'}",
                  flush=True)
            fake = DeepgramFake()
            env.update(VOICEGATE_STT_PROVIDER="deepgram",
                       VOICEGATE_DEEPGRAM_URL=f"ws://127.0.0.1:{fake.port}",
                       VOICEGATE_DEEPGRAM_API_KEY="test-key")
            if args.turn_model:
                env["VOICEGATE_TURN_MODEL"] = args.turn_model
        # The default and each --variant: one gateway each, their steps interleaved so
        # that both meet the same machine.
        runs = [(mode, env, None)] + [(f"{mode}/{label}", {**env, **settings}, None)
                                      for label, settings in variants]
        runs += [(f"{mode}/{label}", env, tree) for label, tree in trees]
        if args.replicas != [1]:  # each run in each shape: "audio x2" is two replicas
            runs = [(name if n == 1 else f"{name} x{n}", run_env, tree, n)
                    for name, run_env, tree in runs for n in args.replicas]
        else:
            runs = [(name, run_env, tree, 1) for name, run_env, tree in runs]
        if len({run[0] for run in runs}) < len(runs):
            sys.exit("each --variant and --tree needs a label of its own")
        gateways: dict[str, GatewayProcess | Cluster] = {}
        try:
            for name, run_env, tree, replicas in runs:
                gateways[name] = (GatewayProcess(store, run_env, tree=tree) if replicas == 1
                                  else Cluster(store, replicas, run_env, tree=tree))
                gateways[name].start()
            largest: dict[str, int | None] = dict.fromkeys(gateways)
            for index, calls in enumerate(args.steps):
                # Every other step in reverse order: no run always goes first (a run just
                # after another meets a machine still settling from it).
                order = list(gateways.items())
                for name, gateway in (order if index % 2 == 0 else order[::-1]):
                    fake_cpu0 = fake.cpu_s() if fake else 0.0
                    lb_cpu0 = gateway.balancer_cpu_s() if isinstance(gateway, Cluster) else 0.0
                    t0 = time.monotonic()
                    step, cpu, rss, gen = asyncio.run(
                        run_step(gateway, mode, calls, args.step_s, args.warmup_s, speech,
                                 line_noise, step_index=index, arrive_s=args.arrive_s))
                    load = machine_load()
                    if fake is not None:
                        load += f", Deepgram fake {100 * (fake.cpu_s() - fake_cpu0) / (time.monotonic() - t0):.0f}% of a core"
                    if isinstance(gateway, Cluster):
                        lb = (gateway.balancer_cpu_s() - lb_cpu0) / (time.monotonic() - t0)
                        load += f", HAProxy {100 * lb:.0f}% of a core"
                    report(name, step, cpu, rss, gen, load)
                    if args.metrics_out is not None:
                        with args.metrics_out.open("a") as out:
                            for metrics in step.turn_metrics:
                                out.write(json.dumps({"run": name, "calls": calls,
                                                      **metrics}) + "\n")
                    if holds_bar(mode, step):
                        largest[name] = calls
                    time.sleep(3.0)  # calls hang up; the next step starts from quiet
            for name, calls in largest.items():
                print(f"{name}: largest step that holds the bar: {calls}", flush=True)
        finally:
            for gateway in gateways.values():
                gateway.stop()
            if fake is not None:
                fake.stop()


if __name__ == "__main__":
    main()
