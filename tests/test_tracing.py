"""OpenTelemetry spans of a call (the SDK's in-memory exporter, the manual-clock harness)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.tracing import configure_from_env
from tests.call_harness import CallHarness


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def harness(tracer, **kwargs) -> CallHarness:
    h = CallHarness(**kwargs)
    h.deps.tracer = tracer
    from gateway.call import Call

    h.call = Call(h.deps, h.output, 16000, call_id="test-call")
    return h


def ms_between(a: int, b: int) -> float:
    return (b - a) / 1e6


async def test_a_call_span_with_a_span_per_turn_and_its_stages(spans):
    tracer, exporter = spans
    h = harness(tracer, faqs={"opening hours": "hours"}, early_finals=True)
    await h.start()
    await h.say("what are your opening hours", then_silence_ms=1500)
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(20))
    await h.say("tell me about loans", then_silence_ms=1200)
    await h.say("stop please", then_silence_ms=1500)
    await h.stop()
    finished = exporter.get_finished_spans()
    (call,) = [s for s in finished if s.name == "voicegate.call"]
    turns = sorted((s for s in finished if s.name == "voicegate.turn"),
                   key=lambda s: s.attributes["turn"])
    assert call.attributes["voicegate.call_id"] == "test-call"
    assert call.attributes["voicegate.turns"] == len(turns) == 3
    assert all(t.parent.span_id == call.context.span_id for t in turns)
    assert all(t.context.trace_id == call.context.trace_id for t in turns)

    hit, loans, stop = turns
    assert hit.attributes["source"] == "cache" and hit.attributes["hit"] is True
    names = [e.name for e in hit.events]
    assert names[:4] == ["speech_end", "end_of_turn", "final_transcript", "route_decided"]
    assert "first_audio" in names
    # the events sit where the turn's metrics put them, on the call's clock
    metrics = {m["turn"]: m for m in h.metrics()}
    events = {e.name: e.timestamp for e in hit.events}
    m = metrics[hit.attributes["turn"]]
    assert ms_between(events["speech_end"], events["end_of_turn"]) == \
        pytest.approx(m["end_of_turn_ms"], abs=0.01)
    assert ms_between(events["end_of_turn"], events["first_audio"]) == \
        pytest.approx(m["first_audio_ms"], abs=0.01)
    assert hit.start_time < events["speech_end"] <= hit.end_time

    assert "first_token" in [e.name for e in loans.events]
    (barge,) = [e for e in loans.events if e.name == "barge_in"]
    assert loans.attributes["interrupted"] is True
    assert barge.attributes["heard_ms"] == h.output.of("interrupt")[0]["heard_ms"]
    assert "barge_in" in [e.name for e in call.events]
    assert stop.attributes["source"] == "llm"


async def test_keypad_and_greeting_are_events_of_the_call_span(spans):
    tracer, exporter = spans
    h = harness(tracer, settings={"greeting": "Welcome.", "keypad": {"0": "handoff"}})
    await h.start()
    await h.wait(1000)
    h.call.feed_dtmf("0")
    await h.wait(1500)
    await h.stop()
    (call,) = [s for s in exporter.get_finished_spans() if s.name == "voicegate.call"]
    names = [e.name for e in call.events]
    assert names[:2] == ["greeting", "dtmf"]
    (turn,) = [s for s in exporter.get_finished_spans() if s.name == "voicegate.turn"]
    assert turn.attributes["input"] == "dtmf" and turn.attributes["source"] == "handoff"


def test_otlp_export_only_when_the_endpoint_is_set():
    assert configure_from_env({}) is None


def _exported_by_a_process(script: str) -> list[bytes]:
    """Run ``script`` in a Python process of its own (the tracer provider is process-wide)
    with OTLP export pointed at a local collector; the request bodies it received."""
    import subprocess
    import sys

    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.fakes.server import ServerThread

    received: list[bytes] = []

    async def collect(request):
        received.append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    app = Starlette(routes=[Route("/v1/traces", collect, methods=["POST"])])
    with ServerThread(app) as collector:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "PATH": "/usr/bin:/bin",
               "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return received


def test_spans_are_exported_over_otlp_when_the_endpoint_is_set():
    """In a process of its own (the tracer provider is process-wide): a call's span reaches
    a local OTLP/HTTP collector as protobuf."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest)

    received = _exported_by_a_process(
        "import asyncio\n"
        "from opentelemetry import trace\n"
        "from gateway.tracing import CallTrace, configure_from_env\n"
        "from gateway.clock import SYSTEM_CLOCK\n"
        "provider = configure_from_env()\n"
        "assert provider is not None\n"
        "CallTrace(None, SYSTEM_CLOCK, {'voicegate.call_id': 'otlp-call'}).end()\n"
        "provider.shutdown()\n")
    assert received
    request = ExportTraceServiceRequest.FromString(received[0])
    spans = [s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["voicegate.call"]
    attributes = {a.key: a.value.string_value for a in spans[0].attributes}
    assert attributes["voicegate.call_id"] == "otlp-call"


def test_the_tracing_on_line_names_the_endpoint_without_its_password():
    """Review (stop 67): `tracing_on` logged OTEL_EXPORTER_OTLP_ENDPOINT as set, a
    collector's basic-auth password (`https://user:pass@collector`) included; it is logged
    without it, as every URL the gateway logs is."""
    import subprocess
    import sys

    script = ("from gateway import logs\n"
              "from gateway.tracing import configure_from_env\n"
              "logs.configure('info')\n"
              "assert configure_from_env() is not None\n")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://tracer:s3cret-pass@127.0.0.1:9/otlp",
           "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if '"tracing_on"' in line]
    assert "s3cret-pass" not in line
    assert "127.0.0.1:9/otlp" in line


def test_the_spans_ended_are_exported_at_shutdown_even_if_the_process_then_dies():
    """Review (stop 64): the batch exporter sends its spans every few seconds and at the
    interpreter's exit. A replica drained outside a container dies by the SIGTERM uvicorn
    re-raises, which skips the exit handlers: the spans of the calls the drain waited for
    were lost. The app's shutdown now flushes them (``flush_traces``); here the process
    then dies without its exit handlers (``os._exit``), as such a replica does."""
    received = _exported_by_a_process(
        "import os\n"
        "from gateway.tracing import CallTrace, configure_from_env, flush_traces\n"
        "from gateway.clock import SYSTEM_CLOCK\n"
        "assert configure_from_env() is not None\n"
        "CallTrace(None, SYSTEM_CLOCK, {'voicegate.call_id': 'drained-call'}).end()\n"
        "flush_traces()\n"
        "os._exit(0)\n")
    assert received, "the span ended before the process died was never exported"


def test_the_apps_shutdown_flushes_the_traces(settings, runtime, monkeypatch):
    """Review (stop 64): the flush above is the app's last shutdown step, after its calls
    closed (their spans ended), so no drained replica skips it."""
    from starlette.testclient import TestClient

    from gateway import app as app_module

    flushed: list[bool] = []
    monkeypatch.setattr(app_module, "flush_traces", lambda: flushed.append(True))
    with TestClient(app_module.create_app(settings, runtime)) as client:
        assert client.get("/healthz").status_code == 200
        assert flushed == []
    assert flushed == [True]


async def test_a_client_cannot_relabel_its_calls_transport(spans):
    """Review (stop 60): the call span's transport was read from `start.metadata`, which is
    the client's to write: a native call saying {"transport": "twilio"} was traced as a
    phone call (and any 64 KiB value went into the attribute). It is the endpoint's."""
    from gateway.call import Call

    tracer, exporter = spans
    h = CallHarness()
    h.deps.tracer = tracer
    h.call = Call(h.deps, h.output, 16000, call_id="test-call",
                  metadata={"transport": "twilio", "note": "x" * 100})
    await h.start()
    await h.stop()
    (call,) = [s for s in exporter.get_finished_spans() if s.name == "voicegate.call"]
    assert call.attributes["voicegate.transport"] == "native"
