"""Voice to voice, as a caller hears it: spoken questions streamed in real time over /v1/call.

For each recogniser (one gateway process each, all in one run), with 1 and 4 callers at
once, at 16 kHz and at 8 kHz phone band, every clip of bench/speech_corpus.py is streamed
in 20 ms frames paced by the wall clock, followed by silence frames, as a phone would.

Figures per configuration:
  hit v2v / miss v2v  first reply audio received - the send time of the caller's last
                      speech sample (its frame's send time + its offset in the frame),
                      measured by the client; p50 / p99. Hits: cache answers to the hit
                      questions (not paused clips: cut off, theirs come before the last
                      word). A miss's first audio may be a filler or the handoff phrase:
                      it is what the caller hears.
  paused hit v2v      the same for paused clips answered from the cache after their last
                      word (not cut off): what the hesitation rule costs a caller who
                      paused mid-turn before a cached question; p50 / p99
  EOT                 the server's end-of-turn delay (turn_metrics end_of_turn_ms:
                      last voiced VAD window -> turn ended), p50 / p99
  cut-off             paused clips whose turn ended (a final transcript, or reply audio)
                      before the caller's last piece had been spoken
  cont                of those, the share whose later words continued the cut turn (the
                      whole question answered together, turn_continuation_ms)
  over                of those whose reply had started, how long it talked over the
                      caller's next words: their first sample sent -> the interrupt
                      received, p50 (the barge-in's speech confirmation, and the VAD)
  whole               of those continued, the caller's last speech sample sent -> the
                      first audio of the last continued turn's reply (the whole
                      question's answer; none when that one too came before the last
                      word), p50
  early               cache answers whose route was decided before the turn ended
                      (route.reused: routed on the early final or a partial)
  precision           cache answers to hit questions that are of its true Banking77 intent
                      (paused clips carry no label; out-of-domain questions answered from
                      the cache are counted apart, in the JSON's miss_hits)
  CPU                 gateway CPU seconds per second of caller speech, per call
  WER                 final transcripts against the clip texts (digits spelled out)

The FAQ is seeded from Banking77 *train* (a fixed set of intents, short answers so replies
end quickly); hits are *dev* questions of those intents: nothing here is tuned on them.
Intent names are lowercased to the seed's spelling (the published ones have capitals).

Run (from the repository root; espeak-ng: bash scripts/ensure-espeak.sh):
  .venv/bin/python bench/voice_to_voice.py                      # moonshine and whisper
  .venv/bin/python bench/voice_to_voice.py --stt moonshine --quick
  options: --stt a,b  --callers 1,4  --rates 16000,8000  --voices piper,espeak
           --hits N --misses N --paused N  --env KEY=VALUE (gateway setting, repeatable)
           --sample-seed N (another sample than the default 7, which the end-of-turn
           defaults were developed on: report figures from another one; any seed but
           7 also takes the held-out paused texts, speech_corpus.PAUSED_TEXTS_HELDOUT)
           --paused-set dev|heldout|fresh|fresh2|fresh3|fresh4|fresh5|fresh6 (which paused
           texts, whatever the seed; fresh: written after a rule was drawn from a
           held-out failure, see speech_corpus)
           --variant LABEL KEY=VALUE[,KEY=VALUE] (each recogniser again with these
           gateway settings, as stt/LABEL: two settings in one run)
           --json PATH (every utterance's record and the summary)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gateway_process import GatewayProcess  # noqa: E402
from bench.speech_corpus import CACHE, DATA, PAUSED_SETS, Clip, build, word_errors  # noqa: E402

FRAME_MS = 20
SEED_INTENTS = 20  # Banking77 intents in the bench's FAQ
SEED_QUESTIONS = 40  # train questions per intent
WAIT_REPLY_S = 6.0  # silence streamed after a clip while waiting for the first reply audio
WAIT_END_S = 20.0  # for the reply to finish (turn_metrics)
SETTLE_S = 1.5  # quiet after a turn's metrics before the next clip: no turn still under way


@dataclass
class Record:
    stt: str
    callers: int
    rate: int
    kind: str
    voice: str
    text: str
    intent: str | None
    v2v_ms: float | None = None
    eot_ms: float | None = None
    source: str | None = None
    route_intent: str | None = None
    reused: bool | None = None
    cut_off: bool = False
    continued: bool = False  # a later turn of the clip carried the cut turn's words
    # Cut off: how long the bot talked over the caller's next words (their first sample
    # sent -> the interrupt received; None when the reply was never stopped)
    talk_over_ms: float | None = None
    # Cut off and continued: the caller's last speech sample sent -> the first audio of
    # the continued turn's reply (the whole question's answer)
    whole_v2v_ms: float | None = None
    transcript: str = ""
    speech_s: float = 0.0
    late_frames: int = 0
    events: list[str] = field(default_factory=list)
    # When each event came, ms from the caller's last speech sample sent (negative:
    # before it); a paused clip's pieces: when each began and ended, on the same scale
    event_ms: list[float] = field(default_factory=list)
    pieces_ms: list[tuple[float, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # the server's turn_metrics


# ---------------------------------------------------------------- the FAQ seed


def seed_intents() -> list[str]:
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        intents = sorted({r["category"] for r in csv.DictReader(f)})
    return intents[::max(1, len(intents) // SEED_INTENTS)][:SEED_INTENTS]


def seed_csv(intents: list[str], path: Path) -> None:
    """One FAQ entry per intent: train questions, a short spoken answer."""
    rows: dict[str, list[str]] = {i: [] for i in intents}
    with (DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            text = " ".join(r["text"].split())
            if r["category"] in rows and len(rows[r["category"]]) < SEED_QUESTIONS \
                    and len(text) <= 300 and text[:1] not in "=+-@":
                rows[r["category"]].append(text)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["question", "answer", "intent", "action"])
        for intent, questions in rows.items():
            name = intent.lower()
            answer = f"Here is our answer about {name.replace('_', ' ')}."
            for i, question in enumerate(questions):
                out.writerow([question, answer if i == 0 else "", name, ""])


def seeded_store(intents: list[str]) -> str:
    """A store seeded once per seed definition (kept under .cache between runs)."""
    key = hashlib.sha256(json.dumps([intents, SEED_QUESTIONS]).encode()).hexdigest()[:12]
    store = CACHE.parent / f"voice-bench-store-{key}"
    if (store / ".seeded").exists():
        return str(store)
    store.mkdir(parents=True, exist_ok=True)
    seed = store.parent / f"voice-bench-seed-{key}.csv"
    seed_csv(intents, seed)
    import subprocess

    done = subprocess.run([sys.executable, "-m", "gateway.cli", "seed", "--quiet", "--store",
                           str(store), str(seed)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"seeding failed: {done.stderr[-2000:]}")
    (store / ".seeded").touch()
    return str(store)


# ---------------------------------------------------------------- one caller


class Line:
    """One call: streams clips in real time, timestamps what comes back."""

    def __init__(self, url: str, rate: int) -> None:
        self.url, self.rate = url, rate
        self.frame_bytes = rate * FRAME_MS // 1000 * 2
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.audio_at: list[float] = []  # receive time of every reply frame
        self.changed = asyncio.Event()

    async def __aenter__(self) -> "Line":
        self.ws = await websockets.connect(self.url, max_size=2 ** 22)
        await self.ws.send(json.dumps({"type": "start", "sample_rate": self.rate}))
        self.reader = asyncio.create_task(self._read())
        await self.wait(lambda: any(e["type"] == "ready" for _, e in self.events), 30)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.ws.send(json.dumps({"type": "stop"}))
        except websockets.ConnectionClosed:
            pass
        self.reader.cancel()
        await self.ws.close()

    async def _read(self) -> None:
        async for message in self.ws:
            now = time.perf_counter()
            if isinstance(message, bytes):
                self.audio_at.append(now)
            else:
                self.events.append((now, json.loads(message)))
            self.changed.set()

    async def wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not predicate():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.05))
            except TimeoutError:
                pass
        return True

    async def speak(self, clip: Clip, record: Record) -> None:
        pcm, speech_end = clip.at_rate(self.rate)
        first_event, first_audio = len(self.events), len(self.audio_at)
        t0 = time.perf_counter()
        frames = [pcm[i:i + self.frame_bytes] for i in range(0, len(pcm), self.frame_bytes)]
        silence = bytes(self.frame_bytes)
        index = 0
        # The clip, then silence, at real-time pace, until the reply starts (or a timeout).
        while True:
            # Frame i leaves once its audio has been spoken (a microphone sends a frame at
            # its end, not its start): t0 + (i + 1) frames.
            due = t0 + (index + 1) * FRAME_MS / 1000
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 0.02:
                record.late_frames += 1
            frame = frames[index] if index < len(frames) else silence
            frame = frame + bytes(self.frame_bytes - len(frame))
            await self.ws.send(frame)
            index += 1
            if index >= len(frames) and (len(self.audio_at) > first_audio or
                                         (index - len(frames)) * FRAME_MS / 1000 > WAIT_REPLY_S):
                break
        # The last word was spoken when the clip says, whenever its frame left: a frame
        # sent late (a loaded loop) must not move the clock's start with it (the overdue
        # silence then goes at once, and the gateway hears its silence early).
        last_speech_at = t0 + speech_end / self.rate
        if len(self.audio_at) > first_audio:
            record.v2v_ms = (self.audio_at[first_audio] - last_speech_at) * 1000
        # Keep the line open (silence) until the clip's last turn has ended and its reply
        # played: a cut-off clip has a second turn (the rest of its words), which must not
        # run into the next clip and be scored as its start.
        sender = asyncio.create_task(self._silence())
        await self.wait(lambda: self._settled(first_event), WAIT_END_S)
        sender.cancel()
        self._score(clip, record, first_event, t0, first_audio, last_speech_at)

    def _settled(self, first_event: int) -> bool:
        """The last event since the clip began is an audio turn's metrics, SETTLE_S ago."""
        if len(self.events) <= first_event:
            return False
        at, last = self.events[-1]
        return (last["type"] == "turn_metrics" and last.get("input") == "audio"
                and not last.get("empty") and time.perf_counter() - at >= SETTLE_S)

    async def _silence(self) -> None:
        silence = bytes(self.frame_bytes)
        t0 = time.perf_counter()
        for i in range(10 ** 6):
            await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.perf_counter()))
            await self.ws.send(silence)

    def _score(self, clip: Clip, record: Record, first_event: int, t0: float,
               first_audio: int, last_speech_at: float) -> None:
        events = self.events[first_event:]
        record.events = [e["type"] for _, e in events]
        record.event_ms = [round((t - last_speech_at) * 1000, 1) for t, _ in events]
        finals = [(t, e) for t, e in events if e["type"] == "transcript" and e.get("final")
                  and "turn" in e]
        # An empty turn's (noise heard as speech) answered nothing.
        metrics = [e for _, e in events if e["type"] == "turn_metrics" and not e.get("empty")]
        # A turn that continues a cut one repeats its words: it replaces them.
        continues = {m.get("turn") for m in metrics if m.get("continues")}
        heard: list[str] = []
        for _, e in finals:
            heard = [e["text"]] if e["turn"] in continues else [*heard, e["text"]]
        record.transcript = " ".join(heard)
        record.continued = bool(continues)
        if metrics:
            record.eot_ms = metrics[0].get("end_of_turn_ms")
            record.metrics = metrics[0]
        route = next((e for _, e in events if e["type"] == "route"), None)
        response = next((e for _, e in events if e["type"] == "response"
                         and e.get("source") != "filler"), None)
        if route:
            record.reused, record.route_intent = route.get("reused"), route.get("intent")
        if response:
            record.source = response.get("source")
        if clip.kind == "paused":
            record.pieces_ms = [
                (round((self._spoken(t0, start) - last_speech_at) * 1000, 1),
                 round((self._spoken(t0, end) - last_speech_at) * 1000, 1))
                for start, end in clip.pieces]
            spoken_at = self._spoken(t0, clip.pieces[-1][0])
            ended = [t for t, _ in finals] + self.audio_at[first_audio:first_audio + 1]
            record.cut_off = bool(ended) and min(ended) < spoken_at
            # The last continued turn's reply: its first frame after that turn's
            # transcript (none if that turn too was answered before the last word).
            whole_at = max((t for t, e in finals if e["turn"] in continues), default=None)
            answer = [t for t in self.audio_at[first_audio:] if whole_at and t > whole_at]
            if record.cut_off and answer and answer[0] > last_speech_at:
                record.whole_v2v_ms = (answer[0] - last_speech_at) * 1000
            if record.cut_off and len(self.audio_at) > first_audio:
                record.talk_over_ms = self._talk_over(clip, t0, self.audio_at[first_audio],
                                                      events)

    def _spoken(self, t0: float, sample16k: int) -> float:
        """When the clip's sample ``sample16k`` (at 16 kHz) was spoken, by the schedule the
        frames keep (not when its frame left: a late frame would move it)."""
        return t0 + sample16k / 16000

    def _talk_over(self, clip: Clip, t0: float, replied_at: float,
                   events: list[tuple[float, dict[str, Any]]]) -> float | None:
        """From the first piece the caller began after the reply had started to the
        interrupt that stopped it (None: no piece came after it, or nothing stopped it)."""
        starts = [self._spoken(t0, start) for start, _ in clip.pieces]
        resumed = next((t for t in starts if t > replied_at), None)
        if resumed is None:
            return None
        stopped = next((t for t, e in events if e["type"] == "interrupt" and t > resumed), None)
        return None if stopped is None else (stopped - resumed) * 1000


async def run_caller(url: str, rate: int, clips: list[Clip], stt: str, callers: int,
                     stagger_s: float) -> list[Record]:
    await asyncio.sleep(stagger_s)
    records = []
    async with Line(url, rate) as line:
        for clip in clips:
            record = Record(stt, callers, rate, clip.kind, clip.voice, clip.text,
                            clip.intent.lower() if clip.intent else None,
                            speech_s=clip.seconds)
            await line.speak(clip, record)
            records.append(record)
            await asyncio.sleep(0.4)
    return records


async def run_config(gateway: GatewayProcess, stt: str, callers: int, rate: int,
                     clips: list[Clip]) -> tuple[list[Record], float]:
    shares = [clips[i::callers] for i in range(callers)]
    cpu0 = gateway.cpu_s()
    results = await asyncio.gather(*[run_caller(gateway.call_url, rate, share, stt, callers,
                                                 0.37 * i) for i, share in enumerate(shares)])
    return [r for rs in results for r in rs], gateway.cpu_s() - cpu0


# ---------------------------------------------------------------- figures


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(records: list[Record], cpu_s: float) -> dict[str, Any]:
    hits = [r for r in records if r.source == "cache"]
    asked = [r for r in records if r.kind == "hit"]
    misses = [r for r in records if r.kind == "miss"]
    paused = [r for r in records if r.kind == "paused"]
    # The FAQ questions' cache answers: a paused clip answered from the cache is no
    # measure of speed (cut off, it is answered before its last word: a negative v2v).
    # A reply that did not start within WAIT_REPLY_S counts as infinitely slow, not as
    # missing: one caller in twenty waiting 6 s is the p99, not a dropped sample.
    hit_v2v = [math.inf if r.v2v_ms is None else r.v2v_ms for r in hits if r.kind == "hit"]
    miss_v2v = [math.inf if r.v2v_ms is None else r.v2v_ms for r in misses]
    paused_hit_v2v = [r.v2v_ms for r in paused
                      if r.source == "cache" and not r.cut_off and r.v2v_ms is not None]
    eot = [r.eot_ms for r in records if r.eot_ms is not None]
    edits = words = 0
    for r in records:
        e, w = word_errors(r.text, r.transcript)
        edits, words = edits + e, words + w
    speech_s = sum(r.speech_s for r in records)
    return {
        "n": len(records), "hits_answered": len(hits), "hit_questions": len(asked),
        "hit_v2v_p50": pct(hit_v2v, 0.5), "hit_v2v_p99": pct(hit_v2v, 0.99),
        "miss_v2v_p50": pct(miss_v2v, 0.5), "miss_v2v_p99": pct(miss_v2v, 0.99),
        "paused_hit_v2v_p50": pct(paused_hit_v2v, 0.5),
        "paused_hit_v2v_p99": pct(paused_hit_v2v, 0.99), "paused_hits": len(paused_hit_v2v),
        "eot_p50": pct(eot, 0.5), "eot_p99": pct(eot, 0.99),
        "cut_off": sum(r.cut_off for r in paused) / len(paused) if paused else None,
        # Of the cut-off clips, those whose later words continued the cut turn (answered
        # whole, turn_continuation_ms) rather than starting a turn of their own.
        "continued": (sum(r.cut_off and r.continued for r in paused)
                      / sum(r.cut_off for r in paused) if any(r.cut_off for r in paused)
                      else None),
        # Cut-off clips whose reply had started: how long it talked over the caller's
        # next words (p50, ms), and how many it never stopped for them.
        "talk_over_p50": pct([r.talk_over_ms for r in paused if r.talk_over_ms is not None], 0.5),
        # Cut off and continued: last word -> the whole question's answer (p50, ms).
        "whole_v2v_p50": pct([r.whole_v2v_ms for r in paused if r.whole_v2v_ms is not None],
                             0.5),
        "early": sum(bool(r.reused) for r in hits) / len(hits) if hits else None,
        # Of the cache answers to labelled questions (hits of paused clips have no label).
        "precision": (sum(r.route_intent == r.intent for r in hits if r.kind == "hit")
                      / len([r for r in hits if r.kind == "hit"])
                      if any(r.kind == "hit" for r in hits) else None),
        # Out-of-domain questions answered from the cache (each a wrong answer).
        "miss_hits": sum(r.kind == "miss" for r in hits),
        "hit_rate": len([r for r in hits if r.kind == "hit"]) / len(asked) if asked else None,
        "cpu_per_speech_s": cpu_s / speech_s if speech_s else None,
        "wer": edits / words if words else None,
        "no_reply": sum(r.v2v_ms is None for r in records),
        "late_frames": sum(r.late_frames for r in records),
    }


def fmt(value: Any, spec: str = ".0f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(rows: list[tuple[str, int, int, dict[str, Any]]]) -> None:
    head = (f"{'stt':16} {'calls':>5} {'rate':>5} | {'hit v2v p50/p99':>16} "
            f"{'miss v2v p50/p99':>17} {'paused hit':>13} {'EOT p50/p99':>12} | {'cut-off':>7} {'cont':>5} {'over':>5} "
            f"{'whole':>5} "
            f"{'early':>6} "
            f"{'prec':>5} {'hit%':>5} | {'CPU/s':>5} {'WER':>6} {'n':>4} {'noans':>5} "
            f"{'late':>5}")
    print(head)
    print("-" * len(head))
    for stt, callers, rate, s in rows:
        print(f"{stt:16} {callers:>5} {rate:>5} | "
              f"{fmt(s['hit_v2v_p50']):>7}/{fmt(s['hit_v2v_p99']):<8} "
              f"{fmt(s['miss_v2v_p50']):>8}/{fmt(s['miss_v2v_p99']):<8} "
              f"{fmt(s['paused_hit_v2v_p50']):>6}/{fmt(s['paused_hit_v2v_p99']):<6} "
              f"{fmt(s['eot_p50']):>5}/{fmt(s['eot_p99']):<6} | "
              f"{fmt(s['cut_off'], '.0%'):>7} {fmt(s['continued'], '.0%'):>5} "
              f"{fmt(s['talk_over_p50']):>5} {fmt(s['whole_v2v_p50']):>5} "
              f"{fmt(s['early'], '.0%'):>6} "
              f"{fmt(s['precision'], '.0%'):>5} {fmt(s['hit_rate'], '.0%'):>5} | "
              f"{fmt(s['cpu_per_speech_s'], '.2f'):>5} {fmt(s['wer'], '.1%'):>6} {s['n']:>4} "
              f"{s['no_reply']:>5} {s['late_frames']:>5}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stt", default="moonshine,whisper")
    parser.add_argument("--callers", default="1,4")
    parser.add_argument("--rates", default="16000,8000")
    parser.add_argument("--voices", default="piper,espeak")
    parser.add_argument("--hits", type=int, default=16)
    parser.add_argument("--misses", type=int, default=4)
    parser.add_argument("--paused", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 hits, 2 misses, 2 paused")
    parser.add_argument("--sample-seed", type=int, default=7,
                        help="which dev/val questions and paused texts (7: the ones the "
                             "end-of-turn defaults were developed on; others: held out)")
    parser.add_argument("--paused-set", default="",
                        choices=("", *PAUSED_SETS),
                        help="which paused texts (default: dev for seed 7, heldout otherwise)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE gateway setting")
    parser.add_argument("--variant", nargs=2, action="append", default=[],
                        metavar=("LABEL", "KEY=VALUE[,KEY=VALUE]"),
                        help="also run each recogniser with these settings, as stt/LABEL "
                             "(two settings compared in one run); repeatable")
    parser.add_argument("--json", help="write every record and the summary here")
    args = parser.parse_args()
    if args.quick:
        args.hits, args.misses, args.paused = 4, 2, 2
    intents = seed_intents()
    store = seeded_store(intents)
    clips = build(intents, args.hits, args.misses, args.paused,
                  tuple(args.voices.split(",")), args.sample_seed, args.paused_set)
    print(f"{len(clips)} clips ({args.hits} hits, {args.misses} misses, {args.paused} paused; "
          f"voices {args.voices}), {sum(c.seconds for c in clips):.0f} s of speech; "
          f"FAQ: {len(intents)} Banking77 intents from train")
    extra = dict(kv.split("=", 1) for kv in args.env)
    rows, records = [], []
    runs = [(stt, stt, {}) for stt in args.stt.split(",")]
    runs += [(f"{stt}/{label}", stt, dict(kv.split("=", 1) for kv in settings.split(",")))
             for stt in args.stt.split(",") for label, settings in args.variant]
    for name, stt, variant in runs:
        # No idle prompt: a clip whose reply never comes leaves the line silent for
        # WAIT_REPLY_S + WAIT_END_S, long enough for the gateway's goodbye and hang-up.
        env = {"VOICEGATE_STT_PROVIDER": stt, "VOICEGATE_IDLE_PROMPT_S": "0", **extra,
               **variant}
        configs = [(callers, rate) for callers in map(int, args.callers.split(","))
                   for rate in map(int, args.rates.split(","))]
        for callers, rate in configs:
            # A gateway of its own per configuration: one that has routed these clips'
            # words already answers them from its embedding cache.
            gateway = GatewayProcess(store, env=env)
            try:
                gateway.start()
            except SystemExit:
                print(f"{name}: the gateway did not start with this recogniser; skipped")
                gateway.stop()
                break
            try:
                got, cpu_s = await run_config(gateway, name, callers, rate, clips)
            finally:
                gateway.stop()
            summary = summarize(got, cpu_s)
            rows.append((name, callers, rate, summary))
            records.extend(got)
            print_table(rows[-1:])
    print()
    print_table(rows)
    print("v2v: caller's last speech sample (when it was spoken) -> first reply audio "
          "received (ms), a reply not started within the wait counted as inf; noans: clips "
          "with no reply; late: caller frames sent over 20 ms late; EOT: "
          "server end_of_turn_ms; whole: a cut-off clip's last word -> its continued turn's "
          "answer; early: cache answers routed before the turn ended; CPU/s: gateway CPU s "
          "per s of caller speech per call")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "summary": [{"stt": s, "callers": c, "rate": r, **x} for s, c, r, x in rows],
            "records": [asdict(r) for r in records]}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
