"""OpenTelemetry for the gateway: the process's tracer provider and one call's spans.

Spans: ``voicegate.call`` per call (attributes: call id, transport, sample rate; events:
greeting, dtmf, idle_<step> prompts, transferred, transfer_found_call_over,
repeated_failure_handoff, hangup, barge_in: docs/operations.md, "Traces", lists them all) and
``voicegate.turn`` per caller
turn, its child, from the start of the caller's speech to the end of the reply, with
one event per stage at the moment the call's clock stamped it (speech_end,
end_of_turn, final_transcript, route_decided, first_token, first_audio, barge_in).

Exported over OTLP/HTTP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(``configure_from_env``); otherwise the API's no-op tracer costs next to nothing.
Times come from the call's ``Clock`` (monotonic) and are placed on the wall clock
once per call, so a test on a ``ManualClock`` gets exact, deterministic spans.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer

from . import logs
from .clock import Clock
from .settings import redact_url
from .timeline import STAGES, TurnTimeline

log = logging.getLogger("voicegate.tracing")

TRACER_NAME = "voicegate"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"


def configure_from_env(environ: Mapping[str, str] | None = None) -> Any | None:
    """With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, install a tracer provider exporting over
    OTLP/HTTP in batches (once per process); returns it, or None when tracing is off."""
    env = os.environ if environ is None else environ
    endpoint = env.get(OTLP_ENDPOINT_ENV, "").strip()
    if not endpoint:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current  # already configured (a second app in this process)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({
        "service.name": env.get("OTEL_SERVICE_NAME", "voicegate")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    # A collector's basic-auth password may be in it (https://user:pass@collector).
    logs.event(log, "tracing_on", endpoint=redact_url(endpoint))
    return provider


def flush_traces(timeout_s: float = 5.0) -> None:
    """Export the spans ended so far now (blocking: off the loop). Called at the app's
    shutdown: a drained replica outside a container dies by the re-raised SIGTERM, which
    skips the exit handlers, so the batch exporter's last spans (the calls the drain
    waited for) were never sent."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:  # the SDK's provider (tracing on); the no-op API's has none
        flush(int(timeout_s * 1000))


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    """Only what a span attribute may hold (no None, no nested values)."""
    return {k: v for k, v in values.items() if isinstance(v, (str, bool, int, float))}


class CallTrace:
    """One call's span and its turns' child spans, on the call's clock."""

    def __init__(self, tracer: Tracer | None, clock: Clock, attributes: Mapping[str, Any]) -> None:
        self._tracer = tracer or trace.get_tracer(TRACER_NAME)
        self._clock = clock
        self._wall0 = time.time_ns()
        self._clock0 = clock.now()
        self._barge_ins: dict[int, tuple[float, float]] = {}  # turn -> (at, heard ms)
        self.span: Span = self._tracer.start_span("voicegate.call", start_time=self._wall0,
                                                  attributes=_attributes(attributes))

    def _ns(self, at: float) -> int:
        return self._wall0 + int(round((at - self._clock0) * 1e9))

    def event(self, name: str, **attributes: Any) -> None:
        self.span.add_event(name, _attributes(attributes), timestamp=self._ns(self._clock.now()))

    def barge_in(self, turn: int, heard_ms: float, cause: str) -> None:
        self._barge_ins[turn] = (self._clock.now(), heard_ms)
        self.event("barge_in", turn=turn, heard_ms=heard_ms, cause=cause)

    def turn(self, tl: TurnTimeline, metrics: Mapping[str, Any]) -> None:
        """The finished turn as a child span, its stages as events at their times."""
        marks = tl.marks
        start = marks.get("speech_start", min(marks.values(), default=self._clock.now()))
        end = marks.get("reply_end", self._clock.now())
        context = trace.set_span_in_context(self.span)
        keep = ("input", "source", "intent", "action", "hit", "entry_id", "interrupted",
                "heard_ms", "route_reused", "transferred")
        span = self._tracer.start_span("voicegate.turn", context=context,
                                       start_time=self._ns(start),
                                       attributes=_attributes({"turn": tl.turn,
                                                               **{k: metrics.get(k)
                                                                  for k in keep}}))
        for stage in STAGES:
            if stage in marks and stage != "speech_start":
                span.add_event(stage, timestamp=self._ns(marks[stage]))
        if tl.turn in self._barge_ins:
            at, heard_ms = self._barge_ins.pop(tl.turn)
            span.add_event("barge_in", {"heard_ms": heard_ms}, timestamp=self._ns(at))
        span.end(end_time=self._ns(max(end, start)))

    def end(self, **attributes: Any) -> None:
        self.span.set_attributes(_attributes(attributes))
        self.span.end(end_time=self._ns(self._clock.now()))
