"""The operator- and client-facing docs (README.md, docs/operations.md, docs/protocol.md,
docs/architecture.md) in step with the code: every setting documented, every turn_metrics
field, what `start.metadata` is said to do (a review, stop 59), every call span event,
every error code counted by name and every script in the map (stop 67). Each failed when
written."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import get_args

from gateway.settings import Settings
from tests.call_harness import CallHarness
from tests.test_native_handler import FakeWebSocket, run_call, services_for

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def _section(text: str, start: str, end: str) -> str:
    begin = text.index(start)
    return text[begin:text.index(end, begin)]


def test_every_setting_is_documented_somewhere_an_operator_reads():
    """docs/operations.md, "Other settings": "Every field of gateway/settings.py:Settings is a
    setting ... The README, the sections above and protocol.md give the ones most often
    changed; these are the rest". `early_final_pad_ms` (settings.py) is in none of the three:
    an operator cannot learn it exists, its default (0) or its bound (<= early_final_after_ms,
    which start-up enforces)."""
    docs = README + OPERATIONS + PROTOCOL
    missing = [name for name in Settings.model_fields
               if not re.search(rf"`{name}`", docs) and f"VOICEGATE_{name.upper()}" not in docs]
    assert missing == []


async def test_start_metadata_reaches_the_logs():
    """docs/protocol.md, `start`: "`metadata` (object, optional: caller id, campaign,
    anything you want in logs)". The endpoint parses it and hands it to the Call
    (services.new_call -> Call(metadata=...)), which read only its `transport` for the
    trace (since stop 60 not even that: the endpoint names it): no log line (call_started logs sample_rate and resumed), no recording field
    carries it. A client that tags its calls with a campaign finds the tag nowhere."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("voicegate")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        h = CallHarness()
        services = services_for(h)
        from gateway.call import Call
        services.new_call = lambda output, start: Call(h.deps, output, start.sample_rate,
                                                       metadata=start.metadata)
        ws = FakeWebSocket(services)
        ws.text({"type": "start", "sample_rate": 16000,
                 "metadata": {"campaign": "spring-sale-7731"}})
        ws.text({"type": "text", "text": "hello there"})
        ws.inbox.put_nowait({"type": "websocket.receive", "text": '{"type": "stop"}'})
        await run_call(ws)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in records)
    assert "call_started" in logged  # the call's own lines were captured
    assert "spring-sale-7731" in logged


async def test_every_turn_metrics_field_is_documented():
    """docs/protocol.md, "`turn_metrics`": the table lists the fields of a turn's timeline.
    gateway/call/reply.py adds `frames_sent`, `frames_late` and `frame_lag_max_ms` to every
    turn that played a reply (tl.info.update in ReplyPlayer's finally), which the doc never
    names: a client cannot tell what they measure or whether it may rely on them."""
    h = CallHarness(faqs={"opening hours": "hours"})
    await h.start()
    await h.text("opening hours")
    await h.wait(2000)
    await h.stop()
    (metrics,) = h.metrics()
    section = _section(PROTOCOL, "### `turn_metrics`", "## Turn taking and barge-in")
    documented = set(re.findall(r"`([a-z_]+)`", section))
    undocumented = sorted(k for k in metrics if k != "type" and k not in documented)
    assert undocumented == []


ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
GATEWAY = ROOT / "gateway"


def _sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(GATEWAY.rglob("*.py"))}


def test_every_call_span_event_is_documented():
    """Review (stop 67): docs/operations.md, "Traces", lists the events of the `voicegate.call`
    span. The call engine adds every one through `self._trace.event(...)` (and `barge_in`
    through CallTrace.barge_in); each name it adds must be in that list, or an operator reading
    a trace meets events the docs never explain."""
    from gateway.call.idle import IdleStep

    engine = (GATEWAY / "call" / "engine.py").read_text(encoding="utf-8")
    added = set(re.findall(r'_trace\.event\(\s*"([a-z_]+)"', engine))
    if 'self._trace.event(f"idle_{step}")' in engine:  # one per idle step
        added |= {f"idle_{step}" for step in get_args(IdleStep)}
    assert added, "no call span event found: the pattern above no longer matches the engine"
    added.add("barge_in")
    section = _section(OPERATIONS, "## Traces (OpenTelemetry)", "and every caller turn a child span")
    listed = set(re.findall(r"`([a-z_]+)`", section.split("events", 1)[1]))
    assert sorted(added - listed) == []


# The helpers that hand a literal error code to Stats.error (each counts what it is given).
_COUNTED = re.compile(r'(?:stats\.error|_count|_report|_failed|input_stopped|_refuse_body'
                      r'|ProtocolError)\(\s*"([a-z][a-z0-9_]+)"')


def test_every_error_code_counted_by_name_is_documented():
    """Review (stop 67): every code the gateway counts (`/admin/stats` `errors`,
    `voicegate_errors_total{code}`) must be named in the docs an operator reads, or a rising
    count says nothing. gateway/transports/twilio_context.py counts
    `twilio_context_unkeepable` (a conversation that could not be written as JSON: the call
    goes on, the record kept before stands), which no doc named."""
    docs = README + OPERATIONS + PROTOCOL
    counted = {code: path.relative_to(ROOT).as_posix()
               for path, text in _sources().items() for code in _COUNTED.findall(text)}
    assert len(counted) > 30, "the pattern above no longer finds the counted codes"
    undocumented = sorted(f"{code} ({where})" for code, where in counted.items()
                          if f"`{code}`" not in docs)
    assert undocumented == []


def test_every_script_is_in_the_architecture_map():
    """Review (stop 67): docs/architecture.md, "Layout", is the map of the repository and
    names the files of scripts/ (those `make test` runs among them). scripts/ensure-node.sh,
    which `make test` runs to install nodejs for the caller page's logic tests, was missing."""
    layout = _section(ARCHITECTURE, "## Layout", "## Data flow of one call")
    names = re.findall(r"[A-Za-z0-9_-]+\.(?:sh|py)", layout)
    # The map abbreviates siblings: "ensure-redis/-browser/-haproxy.sh".
    for group in re.findall(r"([a-z]+)-([a-z]+(?:/-[a-z]+)+)\.sh", layout):
        names += [f"{group[0]}-{part.lstrip('-')}.sh" for part in group[1].split("/")]
    missing = sorted(path.name for path in (ROOT / "scripts").iterdir()
                     if path.is_file() and path.name not in names)
    assert missing == []


_PACKAGES = ("gateway", "intents", "cache_seed", "bench")


def _listed_under(package: str) -> str:
    """The architecture map's "## Modules" list of one package ("### gateway/"), or ""."""
    if "\n## Modules\n" not in ARCHITECTURE:
        return ""
    listed = _section(ARCHITECTURE, "\n## Modules\n", "\n## Data flow of one call") + "\n#"
    heading = f"\n### {package}/\n"
    if heading not in listed:
        return ""
    begin = listed.index(heading) + len(heading)
    return listed[begin:listed.index("\n#", begin)]


def test_every_module_is_in_the_architecture_map():
    """Review (stop 70): docs/architecture.md is the map of the house, and a reader looks a
    module up there before opening it. It named 31 of the modules of gateway/, intents/,
    cache_seed/ and bench/ nowhere (gateway/faq_cache.py, which holds the serving version;
    intents/redis_store.py, the shared store; the cloud adapters in gateway/providers/ ...):
    what they do and where they sit was found only by reading them. "## Modules" lists each
    by its path under its package, and names no module the tree lacks."""
    missing, stale = [], []
    for package in _PACKAGES:
        part = _listed_under(package)
        modules = {path.relative_to(ROOT / package).as_posix()
                   for path in (ROOT / package).rglob("*.py") if path.name != "__init__.py"}
        missing += [f"{package}/{m}" for m in sorted(modules) if f"`{m}`" not in part]
        stale += [f"{package}/{m}" for m in re.findall(r"`([a-z0-9_/]+\.py)`", part)
                  if m not in modules]
    assert missing == []
    assert stale == []
