"""Counters and latency samples of this replica, and their Prometheus exposition.

One ``Stats`` per process (held by the runtime, no module globals). Every finished
turn lands here once; ``/admin/stats`` reads ``snapshot()`` and ``/metrics`` the
Prometheus registry, so both tell the same story.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Protocol

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .collector import PauseHistogram

if TYPE_CHECKING:
    from .hedge import HedgeStats
    from .overload import OverloadGate
    from .providers.synthesis_slots import SynthesisSlots
    from .tools import ToolRunner

# Stages reported per outcome (hit or miss), as named in turn_metrics.
LATENCY_STAGES = ("end_of_turn_ms", "route_decided_ms", "first_token_ms", "first_audio_ms",
                  "reply_latency_ms")
# Stages measured from the end of the caller's speech (TurnTimeline.metrics), spoken turns'
# only: a typed turn marks its speech end and end of turn at the moment it arrives, so its
# figures lack the end-of-turn wait a spoken turn's include (its end_of_turn_ms 0, its
# reply_latency_ms its first_audio_ms). first_audio_ms, from the end of turn, is every one's.
FROM_SPEECH_END = ("end_of_turn_ms", "route_decided_ms", "first_token_ms", "reply_latency_ms")
RECENT_WINDOW_S = 300.0
SERIES_MINUTES = 60  # per-minute hits/misses kept for the dashboard's chart
MISSED_KEPT = 2000  # most recent missed questions kept for /admin/misses
# Intent names come from the operator's seed CSV, unbounded in number: only the served cache
# version's intents (its first MAX_INTENT_SERIES, in seed order) are counted by name in
# voicegate_intent_turns_total{intent} and the stats' ``intents``; any other (a version's
# beyond the cap, one a newer version dropped or renamed) counts under OTHER_INTENT. Only the
# overflow is ever labelled OTHER_INTENT: a real intent so named is escaped (intent_label).
MAX_INTENT_SERIES = 1000
OTHER_INTENT = "__other__"
_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0,
              1.5, 2.0, 3.0, 5.0)


def outcome_of(metrics: dict[str, Any]) -> str:
    """``hit`` when the cached answer played, else ``miss``."""
    return "hit" if metrics.get("source") == "cache" else "miss"


def keyed(metrics: dict[str, Any]) -> bool:
    """A keypad turn (a mapped key, or keys collected for the agent, also those carried into
    an utterance that held no words: ``keys_only``): no question the cache could have
    answered or missed, so no hit or miss; counted as ``keypad_turns``."""
    return metrics.get("input") == "dtmf" or bool(metrics.get("keys_only"))


def barged_in(metrics: dict[str, Any]) -> bool:
    """The caller cut the reply off (a barge-in): not the bot stopping it itself (the
    call's time limit) nor the call's end (a hang-up, a lost stream, a drain): those set
    ``stopped_by``. Nor a reply stopped before its first audio (keys pressed again while
    the agent thought): ``interrupted`` says its task was cancelled, but nothing was cut."""
    return (bool(metrics.get("interrupted")) and metrics.get("stopped_by") is None
            and metrics.get("first_audio_ms") is not None)


def intent_label(intent: str) -> str:
    """The label of an intent counted by name: its name, except one that reads as
    ``OTHER_INTENT`` in as many more underscores each side (``__other__``, ``___other___``,
    ...), which gets one more each side: ``OTHER_INTENT`` is only ever the overflow's label,
    and no two intents share one."""
    pad = (len(intent) - len(OTHER_INTENT)) // 2
    if pad >= 0 and intent == "_" * pad + OTHER_INTENT + "_" * pad:
        return f"_{intent}_"
    return intent


class IntentLabels:
    """Which intent names are counted by name (Prometheus label, stats field): those of the
    served version (``serve``), its first ``MAX_INTENT_SERIES``; before any version is
    known, the first ``MAX_INTENT_SERIES`` names seen. Any other is ``OTHER_INTENT``. A
    name counted by name is labelled ``intent_label(name)``."""

    def __init__(self, limit: int = MAX_INTENT_SERIES) -> None:
        self.limit = limit
        self.served: frozenset[str] | None = None  # None: no version known yet
        self._served_labels: frozenset[str] = frozenset()
        self._seen: set[str] = set()

    def serve(self, intents: Iterable[str]) -> frozenset[str]:
        """A version's intents, in seed order: the names counted from now on."""
        self.served = frozenset(list(dict.fromkeys(map(str, intents)))[:self.limit])
        self._served_labels = frozenset(map(intent_label, self.served))
        return self.served

    def kept(self, label: str) -> bool:
        """``label`` (a label counted before) is still counted."""
        return label == OTHER_INTENT or self.served is None or label in self._served_labels

    def label(self, intent: str) -> str:
        if self.served is not None:
            return intent_label(intent) if intent in self.served else OTHER_INTENT
        if intent in self._seen or len(self._seen) < self.limit:
            self._seen.add(intent)
            return intent_label(intent)
        return OTHER_INTENT


def answer_mark(action: str, answer: str | None) -> str:
    """What a hit on an entry plays, in a few characters: its hit count belongs to that.
    A publish that changes an entry's answer text or action starts its count again; one
    that changes only its questions (more ways to reach the same answer) keeps it."""
    text = json.dumps([action, answer], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class StatsObserver(Protocol):
    """Something else told about every counted event (the shared Redis counters).
    Called on the event loop: it must not block."""

    def call_started(self) -> None: ...

    def turn_finished(self, metrics: dict[str, Any]) -> None: ...

    def error(self, code: str) -> None: ...

    def entries_published(self, marks: Mapping[str, str], version: str | None = None,
                          intents: Iterable[str] | None = None) -> None: ...


class _HedgeCounters:
    """The agent's hedged LLM counters (gateway/hedge.py ``HedgeStats``), read at each
    scrape: the hedge keeps them itself. Zeros until ``Stats.watch_hedge`` (no LLM)."""

    def __init__(self) -> None:
        self.source: "HedgeStats | None" = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.source
        for name, doc, value in (
                ("voicegate_llm_rounds", "Agent LLM rounds (hedged pair calls)",
                 s.turns if s else 0),
                ("voicegate_llm_requests", "LLM requests started (both legs of the hedge, "
                 "and a leg asked again after a 429)",
                 s.requests if s else 0),
                ("voicegate_llm_rate_limit_retries", "LLM legs asked again after a rate "
                 "limit (a 429) before their first token, within its first-token budget",
                 s.retries if s else 0),
                ("voicegate_llm_leg_failures", "LLM requests that failed (error, empty reply, "
                 "no first token in time, a stream that broke or stalled)",
                 s.leg_failures if s else 0),
                ("voicegate_llm_all_failed", "LLM rounds in which every leg failed before a "
                 "token (an outage: the caller is handed off, llm_failed)",
                 s.all_failed if s else 0),
                ("voicegate_llm_empty_replies", "LLM rounds answered with nothing (no text, "
                 "no tool call; no leg answered otherwise): asked again once, then the "
                 "handoff (llm_empty_reply), no outage",
                 s.empty_replies if s else 0)):
            yield CounterMetricFamily(name, doc, value=value)


class _ToolCounters:
    """The agent's tool calls by tool and outcome (gateway/tools.py ``ToolRunner.outcomes``),
    read at each scrape, and the model's own handoffs (tool ``transfer_to_person``, outcome
    ``handoff``). Nothing until ``Stats.watch_tools`` (no tools file and no LLM)."""

    def __init__(self) -> None:
        self.source: "ToolRunner | None" = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.source is None:
            return
        family = CounterMetricFamily(
            "voicegate_tool_calls", "Agent tool (webhook) calls by tool and outcome: ok, "
            "the model's mistakes (unknown_tool, bad_arguments, not_sent) or the service's "
            "(timeout, unreachable, redirected, refused: 4xx, failed: 5xx); the built-in "
            "transfer_to_person's as handoff",
            labels=["tool", "outcome"])
        for (tool, outcome), count in sorted(self.source.outcomes.items()):
            family.add_metric([tool, outcome], count)
        yield family


class _SynthesisSlotGauges:
    """A capped cloud voice's syntheses (providers/synthesis_slots.py), read at each scrape:
    how many run, how many wait, how many had to wait. Nothing until ``Stats.watch_slots``
    (no cap set)."""

    def __init__(self) -> None:
        self.source: "SynthesisSlots | None" = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.source
        if s is None:
            return
        yield GaugeMetricFamily("voicegate_tts_slots", "Concurrent syntheses the voice may "
                                "run (elevenlabs_max_concurrent)", value=s.limit)
        yield GaugeMetricFamily("voicegate_tts_slots_busy", "Syntheses running", value=s.busy)
        yield GaugeMetricFamily("voicegate_tts_slots_waiting", "Syntheses waiting for a slot",
                                value=s.waiting)
        yield CounterMetricFamily("voicegate_tts_slot_waits", "Syntheses that found every "
                                  "slot busy and waited (often: raise the cap, or the plan)",
                                  value=s.waits)


class _OverloadGauges:
    """The event loop's lateness and the overload gate (gateway/overload.py), read at each
    scrape. Nothing until ``Stats.watch_overload``."""

    def __init__(self) -> None:
        self.source: "OverloadGate | None" = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = self.source
        if g is None:
            return
        yield GaugeMetricFamily("voicegate_event_loop_lag_seconds", "How late the event loop "
                                "wakes a timer: the median of the last 2 s (every call's "
                                "next step waits as long)", value=g.lag_s)
        yield GaugeMetricFamily("voicegate_event_loop_busy_ratio", "The share of one core "
                                "the event loop's thread used over the last 2 s (near 1: "
                                "no slack for another call)", value=g.busy)
        yield GaugeMetricFamily("voicegate_overloaded", "1 while new calls are refused for "
                                "the loop's lateness or busy share (overload_loop_lag_ms, "
                                "overload_loop_busy)", value=float(g.overloaded))


class _Prometheus:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_calls = Gauge("voicegate_active_calls", "Calls in progress", registry=r)
        self.calls = PromCounter("voicegate_calls", "Calls started", registry=r)
        self.turns = PromCounter("voicegate_turns", "Caller turns answered (questions, "
                                 "spoken or typed: the cache's hits and misses)",
                                 ["outcome", "source"], registry=r)
        self.keypad_turns = PromCounter("voicegate_keypad_turns", "Keypad turns answered "
                                        "(a mapped key, keys for the agent): no hit or miss",
                                        ["source"], registry=r)
        self.intents = PromCounter("voicegate_intent_turns", "Turns per routed intent",
                                   ["intent", "outcome"], registry=r)
        self.interrupted = PromCounter("voicegate_barge_ins", "Replies cut off by the caller",
                                       registry=r)
        self.errors = PromCounter("voicegate_errors", "Client or provider errors by code",
                                  ["code"], registry=r)
        self.latency = Histogram("voicegate_stage_seconds",
                                 "Turn stage latency (see docs/protocol.md, turn_metrics)",
                                 ["stage", "outcome"], buckets=_BUCKETS_S, registry=r)
        self.preempts = PromCounter("voicegate_preemptive_starts",
                                    "Agent LLM calls started before the end of turn, by outcome "
                                    "(started, used, discarded)", ["outcome"], registry=r)
        self.continuations = PromCounter(
            "voicegate_turn_continuations",
            "Turns the caller went on with after the bot began to answer (the end of turn "
            "came too soon; the words were answered together)", registry=r)
        self.twilio_resumed = PromCounter(
            "voicegate_twilio_calls_resumed",
            "Twilio calls whose media stream was lost (a replica gone, a cut connection) and "
            "that went on over a new stream (/twilio/stream-ended)", registry=r)
        self.twilio_hangups_already_ended = PromCounter(
            "voicegate_twilio_hangups_already_ended",
            "Twilio hang-ups the REST API answered with the call already over (404, or "
            "21220 not in-progress): the caller hung up first; no failure", registry=r)
        self.degraded = Gauge("voicegate_degraded",
                              "1 while a shared store (Redis) is unreachable", registry=r)
        self.gc_pauses = PauseHistogram()
        r.register(self.gc_pauses)
        self.hedge = _HedgeCounters()
        r.register(self.hedge)
        self.slots = _SynthesisSlotGauges()
        r.register(self.slots)
        self.overload = _OverloadGauges()
        r.register(self.overload)
        self.tools = _ToolCounters()
        r.register(self.tools)
        self.hangups = PromCounter("voicegate_hangups", "Calls the bot hung up, by reason "
                                   "(idle: the caller went silent; time_limit: max_call_s)",
                                   ["reason"], registry=r)


@dataclass
class Stats:
    window: int = 10_000  # latency samples kept per stage and outcome
    active_calls: int = 0
    calls: int = 0
    turns: int = 0  # questions (spoken or typed): hits and misses
    keypad_turns: int = 0  # keys (``keyed``): neither
    interrupted_turns: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    intents: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    # Preemptive agent starts: started, used (a turn adopted it), discarded (cancelled).
    preempts: Counter[str] = field(default_factory=Counter)
    # Turns continued by the caller after the bot began answering (end of turn too soon).
    continuations: int = 0
    # Twilio calls resumed over a new stream after theirs was lost.
    twilio_calls_resumed: int = 0
    latencies: dict[str, dict[str, deque[float]]] = field(default_factory=dict)
    recent: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=100_000))
    entry_hits: Counter[str] = field(default_factory=Counter)  # cache hits per entry id
    # Each entry id of the serving version -> answer_mark of what it plays (entries_published)
    entry_marks: dict[str, str] = field(default_factory=dict)
    entry_marks_version: str | None = None  # the version they are of
    # The intents counted by name (the served version's, bounded), the rest as OTHER_INTENT.
    intent_labels: IntentLabels = field(default_factory=IntentLabels)
    # [minute (epoch seconds // 60), hits, misses], oldest first, the last SERIES_MINUTES.
    minutes: deque[list[int]] = field(default_factory=lambda: deque(maxlen=SERIES_MINUTES))
    # The final text of recent missed turns, for grouping into "which FAQ to add next".
    missed: deque["MissedQuestion"] = field(default_factory=lambda: deque(maxlen=MISSED_KEPT))
    prometheus: _Prometheus = field(default_factory=_Prometheus)
    observers: list[StatsObserver] = field(default_factory=list)
    degraded_reason: str | None = None  # why the replica is degraded, None when it is not
    # (intent label, outcome) of each voicegate_intent_turns series, to remove dropped ones
    _intent_series: set[tuple[str, str]] = field(default_factory=set)

    def attach(self, observer: StatsObserver) -> None:
        """Tell ``observer`` of every event from now on, and of the calls and errors counted
        before it came: a replica counts refusals (``not_ready``, ``admin_unauthorized``,
        ``body_too_large``) while its models load, before its shared counters are linked.
        No turn finishes before then (no call is taken), so none is missed."""
        for _ in range(self.calls):
            observer.call_started()
        for code, count in self.errors.items():
            for _ in range(count):
                observer.error(code)
        if self.entry_marks:  # the cache version loaded with the models
            served = self.intent_labels.served
            observer.entries_published(dict(self.entry_marks), self.entry_marks_version,
                                       intents=None if served is None else sorted(served))
        self.observers.append(observer)

    def call_started(self) -> None:
        self.calls += 1
        self.active_calls += 1
        self.prometheus.calls.inc()
        self.prometheus.active_calls.inc()
        for observer in self.observers:
            observer.call_started()

    def call_resumed(self) -> None:
        """A phone call went on over a new stream (its first was lost): active again, but
        no new call (``twilio_call_resumed`` counts the resumption)."""
        self.active_calls += 1
        self.prometheus.active_calls.inc()

    def call_ended(self) -> None:
        self.active_calls -= 1
        self.prometheus.active_calls.dec()

    def error(self, code: str) -> None:
        self.errors[code] += 1
        self.prometheus.errors.labels(code).inc()
        for observer in self.observers:
            observer.error(code)

    def preempt(self, outcome: str) -> None:
        """A preemptive agent start: ``started``, ``used`` or ``discarded`` (never an error,
        never a turn: its LLM call was speculative)."""
        self.preempts[outcome] += 1
        self.prometheus.preempts.labels(outcome).inc()

    def continuation(self) -> None:
        """A turn opens with the words of one the caller had not finished."""
        self.continuations += 1
        self.prometheus.continuations.inc()

    def twilio_call_resumed(self) -> None:
        """A Twilio call's stream was lost and the call went on over a new one."""
        self.twilio_calls_resumed += 1
        self.prometheus.twilio_resumed.inc()

    def twilio_hangup_already_ended(self) -> None:
        """The bot hung up a Twilio call the caller had already left: no failure."""
        self.prometheus.twilio_hangups_already_ended.inc()

    def watch_hedge(self, hedge: "HedgeStats") -> None:
        """Export the agent's hedge counters (the LLM pair's failures) with these."""
        self.prometheus.hedge.source = hedge

    def watch_tools(self, runner: "ToolRunner") -> None:
        """Export the agent's tool calls by tool and outcome with these."""
        self.prometheus.tools.source = runner

    def watch_slots(self, slots: "SynthesisSlots") -> None:
        """Export a capped voice's synthesis slots (busy, waiting, waits) with these."""
        self.prometheus.slots.source = slots

    def watch_overload(self, gate: "OverloadGate") -> None:
        """Export the event loop's lateness and the overload gate with these."""
        self.prometheus.overload.source = gate

    def hung_up(self, reason: str) -> None:
        """The bot ended a call (``idle``, ``time_limit``)."""
        self.prometheus.hangups.labels(reason=reason).inc()

    def entries_published(self, marks: Mapping[str, str], version: str | None = None,
                          intents: Iterable[str] | None = None) -> None:
        """A cache version was loaded: ``marks`` maps each entry id it holds to the
        ``answer_mark`` of what a hit on it plays. Hit counts belong to the entry as
        published: an id the version no longer holds loses its count (an entry published
        again under it later starts at 0), and so does an id whose answer or action changed;
        an id with the same answer keeps counting. ``version``: the version's name (the
        shared stats ignore an older version's marks written late). ``intents``: the
        version's intent names, in seed order: only they (the first MAX_INTENT_SERIES) are
        counted by name from now on; the counts and Prometheus series of names it does not
        hold are removed (``OTHER_INTENT`` counts the rest)."""
        if intents is not None:
            intents = list(intents)
            labels = self.intent_labels
            labels.serve(intents)
            for label in [i for i in self.intents if not labels.kept(i)]:
                del self.intents[label]
            for label, outcome in [k for k in self._intent_series if not labels.kept(k[0])]:
                self.prometheus.intents.remove(label, outcome)
                self._intent_series.discard((label, outcome))
        for entry_id in [e for e in self.entry_hits if e not in marks]:
            del self.entry_hits[entry_id]
        for entry_id, mark in marks.items():
            if self.entry_marks.get(entry_id, mark) != mark:
                self.entry_hits.pop(entry_id, None)
        self.entry_marks, self.entry_marks_version = dict(marks), version
        for observer in self.observers:
            observer.entries_published(marks, version, intents=intents)

    def set_degraded(self, reason: str | None) -> None:
        self.degraded_reason = reason
        self.prometheus.degraded.set(0 if reason is None else 1)

    def turn_finished(self, metrics: dict[str, Any], text: str | None = None,
                      route_score: float | None = None, answer: str | None = None,
                      call_id: str | None = None) -> None:
        """Count one finished turn. ``text`` (the caller's final transcript), ``route_score``
        (similarity of the nearest seed question), the agent's ``answer`` and the ``call_id``
        are kept on a miss for ``/admin/misses`` (and for promoting a group to an entry).
        A keypad turn is no hit or miss: only ``keypad_turns`` and barge-ins count it."""
        source = str(metrics.get("source") or "none")
        prom = self.prometheus
        if keyed(metrics):
            self.keypad_turns += 1
            prom.keypad_turns.labels(source).inc()
        else:
            self._question_finished(metrics, source, text, route_score, answer, call_id)
        if barged_in(metrics):
            self.interrupted_turns += 1
            prom.interrupted.inc()
        for observer in self.observers:
            observer.turn_finished(metrics)

    def _question_finished(self, metrics: dict[str, Any], source: str, text: str | None,
                           route_score: float | None, answer: str | None,
                           call_id: str | None) -> None:
        """A question's turn: a hit or a miss, with its latencies (a typed one's without
        ``FROM_SPEECH_END``: it has no speech end, nor a wait for its end of turn)."""
        outcome = outcome_of(metrics)
        self.turns += 1
        self.outcomes[outcome] += 1
        self.sources[source] += 1
        self.recent.append((time.monotonic(), outcome == "hit"))
        wall = time.time()
        self._count_minute(int(wall // 60), outcome == "hit")
        if outcome == "hit" and metrics.get("entry_id"):
            self.entry_hits[str(metrics["entry_id"])] += 1
        if outcome == "miss" and text and text.strip():
            self.missed.append(MissedQuestion(
                text=" ".join(text.split()), intent=metrics.get("intent"),
                action=metrics.get("action"), at=wall,
                score=None if route_score is None else round(float(route_score), 4),
                answer=" ".join(answer.split()) if answer and answer.strip() else None,
                call_id=call_id))
        prom = self.prometheus
        prom.turns.labels(outcome, source).inc()
        intent = metrics.get("intent")
        if intent:
            label = self.intent_labels.label(str(intent))
            self.intents[label] += 1
            prom.intents.labels(label, outcome).inc()
            self._intent_series.add((label, outcome))
        per_outcome = self.latencies.setdefault(outcome, {})
        typed = metrics.get("input") == "text"
        for stage in LATENCY_STAGES:
            if typed and stage in FROM_SPEECH_END:
                continue
            value = metrics.get(stage)
            if value is not None:
                per_outcome.setdefault(stage, deque(maxlen=self.window)).append(float(value))
                prom.latency.labels(stage.removesuffix("_ms"), outcome).observe(value / 1000.0)

    def _count_minute(self, minute: int, hit: bool) -> None:
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append([minute, 0, 0])
        self.minutes[-1][1 if hit else 2] += 1

    def series(self, minutes: int = SERIES_MINUTES,
               now: float | None = None) -> list[dict[str, Any]]:
        """Hits and misses per minute for the last ``minutes`` minutes, oldest first, every
        minute present (zeros when idle); ``t`` is the minute's start in epoch seconds."""
        current = int((time.time() if now is None else now) // 60)
        counted = {m: (h, s) for m, h, s in self.minutes}
        points = []
        for minute in range(current - minutes + 1, current + 1):
            hits, misses = counted.get(minute, (0, 0))
            points.append({"t": minute * 60, "hits": hits, "misses": misses})
        return points

    def missed_questions(self) -> list["MissedQuestion"]:
        return list(self.missed)

    def forget_missed(self, keys: set[str], normalize: Any) -> int:
        """Drop the missed questions whose ``normalize(text)`` is in ``keys`` (they became a
        FAQ entry); returns how many."""
        kept = [m for m in self.missed if normalize(m.text) not in keys]
        dropped = len(self.missed) - len(kept)
        self.missed = deque(kept, maxlen=self.missed.maxlen)
        return dropped

    def recent_hit_rate(self, window_s: float = RECENT_WINDOW_S,
                        now: float | None = None) -> tuple[float | None, int]:
        """Hit rate and turns of the last ``window_s`` (up to ``now``, time.monotonic's)."""
        # Newest first, up to the cutoff (appended in time order): the window's turns only,
        # not the 100,000 kept (the dashboard asks every 3 s, on the serving loop).
        cutoff = (time.monotonic() if now is None else now) - window_s
        hits = turns = 0
        for at, hit in reversed(self.recent):
            if at < cutoff:
                break
            hits, turns = hits + hit, turns + 1
        return (hits / turns if turns else None), turns

    def latency_samples(self) -> dict[str, dict[str, list[float]]]:
        """A copy of every stage's samples (~1 ms in all), for ``latency_percentiles`` off
        the serving loop (the deques change while a thread would read them)."""
        return {outcome: {stage: list(v) for stage, v in stages.items() if v}
                for outcome, stages in self.latencies.items()}

    def snapshot(self, latency: dict[str, dict[str, dict[str, float]]] | None = None
                 ) -> dict[str, Any]:
        """The figures of /admin/stats. ``latency``: ``latency_percentiles`` of this
        replica's ``latency_samples``, computed elsewhere (Services.stats_snapshot: a
        thread), else here."""
        if latency is None:
            latency = latency_percentiles(self.latency_samples())
        hits, misses = self.outcomes["hit"], self.outcomes["miss"]
        recent_rate, recent_turns = self.recent_hit_rate()
        return {"active_calls": self.active_calls, "calls": self.calls, "turns": self.turns,
                "keypad_turns": self.keypad_turns, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "hit_rate_5m": recent_rate, "turns_5m": recent_turns,
                "interrupted_turns": self.interrupted_turns, "sources": dict(self.sources),
                "intents": dict(self.intents), "errors": dict(self.errors),
                "preempts": dict(self.preempts), "continuations": self.continuations,
                "twilio_calls_resumed": self.twilio_calls_resumed,
                "entry_hits": dict(self.entry_hits),
                "series": {"minute_s": 60, "points": self.series()},
                "latency_ms": latency, "degraded": self.degraded_reason is not None,
                "degraded_reason": self.degraded_reason}


def latency_percentiles(samples: dict[str, dict[str, list[float]]]
                        ) -> dict[str, dict[str, dict[str, float]]]:
    """p50, p99 and n of each outcome's stages (``Stats.latency_samples``), named without
    their ``_ms``: ~5-20 ms for 20 full series on a loaded 2-core host, so the admin API
    computes them on a thread, not on the loop the calls share."""
    latency: dict[str, dict[str, dict[str, float]]] = {}
    for outcome, stages in samples.items():
        latency[outcome] = {}
        for stage, values in stages.items():
            p50, p99 = np.percentile(np.asarray(values, dtype=float), [50, 99])
            latency[outcome][stage.removesuffix("_ms")] = {
                "p50": round(float(p50), 3), "p99": round(float(p99), 3), "n": len(values)}
    return latency


@dataclass(frozen=True)
class MissedQuestion:
    text: str
    intent: str | None  # what the router guessed (None: out of scope)
    action: str | None  # that intent's action (answer, llm, handoff)
    at: float  # epoch seconds
    score: float | None = None  # similarity of the nearest seed question
    answer: str | None = None  # what the agent answered (the draft of a new entry)
    call_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "intent": self.intent, "action": self.action, "at": self.at,
                "score": self.score, "answer": self.answer, "call_id": self.call_id}
