"""The cloud adapters (openai/groq chat streams, ElevenLabs) through the real SDKs, on the
wire as vendors, compatible servers and dying proxies may send it.

Each test failed before its fix (a review) and states the behaviour the fix gives. The
chat-stream tests use a scripted SSE server of their own (``ScriptedSSE``): the shared
``tests/fakes/openai_server.py`` only ever sends tool calls one after another, never a
``finish_reason: length``, and ends a cut answer with a clean end of body.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Iterator

import httpx
import pytest

from gateway.agent import Agent, Handoff, Sentence
from gateway.clock import ManualClock
from gateway.hedge import HedgedChat
from gateway.providers.base import ProviderError, ToolSpec
from gateway.providers.elevenlabs_tts import ElevenLabsTTS
from gateway.providers.groq_llm import GroqChat
from gateway.providers.openai_llm import OpenAIChat
from tests.fakes.server import ServerThread

MESSAGES = [{"role": "user", "content": "What is the status of order 42 and account 7?"}]


# ------------------------------------------------------------------ a scripted SSE server


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def call(index: int, *, id: str | None = None, name: str | None = None,
         arguments: str | None = None) -> dict[str, Any]:
    """One tool-call fragment as OpenAI streams it: the first carries id, type and name
    (and ``arguments: ""``), the rest only their piece of the arguments."""
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    fragment: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        fragment.update(id=id, type="function")
    return fragment


def tools(*fragments: dict[str, Any]) -> bytes:
    return chunk({"tool_calls": list(fragments)})


ROLE = chunk({"role": "assistant", "content": None})
DONE = b"data: [DONE]\n\n"


class ScriptedSSE:
    """ASGI: each POST gets the next script in ``scripts`` (the last one repeats): a list of
    SSE byte strings sent in order. ``abort``: the worker dies after sending them (no end of
    the chunked body: what a crashed upstream or a reset proxy leaves the client). ``hold``:
    after them, nothing more until ``release`` is set (the connection kept open)."""

    def __init__(self, *scripts: list[bytes], abort: bool = False, hold: bool = False) -> None:
        self.scripts = list(scripts)
        self.abort = abort
        self.hold = hold
        self.release = threading.Event()
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(json.loads(raw))
        events = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if self.abort:
            raise RuntimeError("upstream worker died mid-stream")
        while self.hold and not self.release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture
def sse() -> Iterator[tuple[ScriptedSSE, list[ServerThread]]]:
    """``make(app)`` starts a server for ``app``; all are stopped at the end."""
    servers: list[ServerThread] = []
    apps: list[ScriptedSSE] = []

    def make(app: ScriptedSSE) -> ServerThread:
        apps.append(app)
        server = ServerThread(app).start()
        servers.append(server)
        return server

    try:
        yield make  # type: ignore[misc]
    finally:
        for app in apps:
            app.release.set()
        for server in servers:
            server.stop()


def chat(sdk: str, url: str, **kwargs: Any):
    if sdk == "groq":
        return GroqChat("m", api_key="gsk_test_key_0123456789", base_url=url, **kwargs)
    return OpenAIChat("m", base_url=url + "/v1", **kwargs)


async def tool_calls_of(model) -> list[tuple[str, str]]:
    out = []
    try:
        async for piece in model.stream(MESSAGES):
            if piece.tool_call is not None:
                out.append((piece.tool_call.name, piece.tool_call.arguments))
    finally:
        await model.aclose()
    return out


# Two parallel tool calls whose fragments interleave by index: both calls' headers first
# (each with ``arguments: ""``, as OpenAI sends a call's first fragment), then their
# arguments, alternating. The wire format says a fragment belongs to the call of its
# ``index`` (the openai SDK's own ChatCompletionStreamState accumulates by index, in any
# order); nothing promises one call's fragments all come before the next call's.
INTERLEAVED = [
    ROLE,
    tools(call(0, id="call_a", name="get_order", arguments="")),
    tools(call(1, id="call_b", name="get_account", arguments="")),
    tools(call(0, arguments='{"order": ')),
    tools(call(1, arguments='{"account": ')),
    tools(call(0, arguments='"42"}')),
    tools(call(1, arguments='"7"}')),
    chunk({}, "tool_calls"),
    DONE,
]


@pytest.mark.parametrize("sdk", ["openai", "groq"])
async def test_interleaved_tool_calls_each_get_all_their_arguments(sse, sdk):
    """chat_stream.ToolCallAssembler closes every open call as soon as a higher index
    appears: get_order is emitted with no arguments ("{}"), and its later fragments start a
    nameless call that is dropped at the finish."""
    server = sse(ScriptedSSE(INTERLEAVED))
    assert await tool_calls_of(chat(sdk, server.url)) == [
        ("get_order", '{"order": "42"}'), ("get_account", '{"account": "7"}')]


ORDER = ToolSpec("get_order", "An order's status.",
                 {"type": "object", "properties": {"order": {"type": "string"}},
                  "required": ["order"]})
ACCOUNT = ToolSpec("get_account", "An account's status.",
                   {"type": "object", "properties": {"account": {"type": "string"}},
                    "required": ["account"]})


async def test_interleaved_tool_calls_never_reach_a_webhook_without_their_arguments(sse, webhook):
    """The harm at the call: the agent runs get_order's webhook with ``arguments: {}`` (the
    "{}" the assembler put in for a call it closed early), a valid object, so the runner
    does not refuse it: the business system is asked about no order at all."""
    hook, hook_server = webhook
    app = ScriptedSSE(INTERLEAVED, [ROLE, chunk({"content": "Both are on their way."}),
                                    chunk({}, "stop"), DONE])
    server = sse(app)
    specs = [ToolSpec(t.name, t.description, t.parameters, url=f"{hook_server.url}/tool/{t.name}")
             for t in (ORDER, ACCOUNT)]
    agent = Agent(HedgedChat(OpenAIChat("m", base_url=server.url + "/v1"), clock=ManualClock()),
                  specs, filler_after_s=None)
    try:
        conversation = agent.new_conversation()
        events = [e async for e in agent.respond(conversation, MESSAGES[0]["content"],
                                                 clock=ManualClock())]
    finally:
        await agent.aclose()
    assert not any(isinstance(e, Handoff) for e in events)
    arguments = {c["tool"]: c["arguments"] for c in hook.calls}
    assert arguments == {"get_order": {"order": "42"}, "get_account": {"account": "7"}}


@pytest.mark.parametrize("sdk", ["openai", "groq"])
@pytest.mark.parametrize("content", [[{"type": "text", "text": "We open at nine."}], 9],
                         ids=["a-list-of-parts", "a-number"])
async def test_a_chunk_whose_content_is_no_text_fails_its_leg_not_the_hedge(sse, sdk,
                                                                            content):
    """Review (stop 62): the SDKs build chunks unchecked, so a ``delta.content`` that is not
    a string (a list of typed parts, as some OpenAI-compatible APIs stream a reasoning
    model's answer; any other value) reached the hedge as ``LLMChunk.text``, and its race
    loop crashed on it (``AttributeError: 'list' object has no attribute 'strip'``): not
    the leg's failure but the round's, escaping the hedge raw. The other leg, which had
    the answer, was never asked; the call apologised (``reply_failed``, naming no
    provider), on every miss. It is a malformed chunk: that leg fails, saying so, and
    the other answers."""
    odd = sse(ScriptedSSE([ROLE, chunk({"content": content}), chunk({}, "stop"), DONE]))
    good = sse(ScriptedSSE([ROLE, chunk({"content": "We open at nine."}), chunk({}, "stop"),
                            DONE]))
    # The secondary starts only when the primary fails (the clock never reaches the delay).
    hedged = HedgedChat(chat(sdk, odd.url), chat(sdk, good.url), hedge_delay_s=30.0,
                        clock=ManualClock())
    try:
        said = "".join([piece.text async for piece in hedged.stream(MESSAGES)])
    finally:
        await hedged.aclose()
        await hedged.primary.aclose()
        await hedged.secondary.aclose()  # type: ignore[union-attr]
    assert said == "We open at nine."
    assert hedged.stats.failovers == 1 and hedged.stats.secondary_wins == 1


async def _events(events: Any) -> list[Any]:
    return [event async for event in events]


@pytest.mark.parametrize("sdk", ["openai", "groq"])
@pytest.mark.parametrize("after_finish", ["held_open", "dropped"])
async def test_a_finished_answer_is_whole_whatever_its_body_does_after(sse, webhook, sdk,
                                                                       after_finish):
    """Review (stop 62): a model's answer is whole at its ``finish_reason``, but the hedge
    waited for the HTTP body's end ([DONE], then the close) before it ended the round. A
    body that does not end then (a proxy or server holding the connection open: groq's SDK
    reads on to the close even after [DONE]) stalled the round until
    ``llm_idle_timeout_s`` (10 s) and failed it as a stall; one that breaks then (a reset)
    failed it at once. Either way after the model had finished: the answer's last sentence
    (held by the chunker until the stream's end) was never said, the caller heard the
    apology after a complete answer (``llm_failed``), and a finished tool call never ran
    (the round's calls run at its end), the caller handed off instead. Each round now ends
    at its finish; what the body does after is no failure."""
    hook, hook_server = webhook
    app = ScriptedSSE(
        [ROLE, tools(call(0, id="call_a", name="get_order", arguments='{"order": "42"}')),
         chunk({}, "tool_calls")],  # no [DONE]: the openai SDK drains a body after it
        [ROLE, chunk({"content": "Order 42 left today."}),
         chunk({"content": " It arrives on Monday"}), chunk({}, "stop")],
        abort=after_finish == "dropped", hold=after_finish == "held_open")
    server = sse(app)
    spec = ToolSpec(ORDER.name, ORDER.description, ORDER.parameters,
                    url=f"{hook_server.url}/tool/{ORDER.name}")
    clock = ManualClock()
    # No timeout of the hedge passes as the clock moves (a stall would fail the round at
    # its idle timeout): only the body's rest is timed after the finish.
    agent = Agent(HedgedChat(chat(sdk, server.url), clock=clock, first_token_timeout_s=3600,
                             idle_timeout_s=3600), [spec],
                  filler_after_s=None, hold_after_s=None)
    conversation = agent.new_conversation()
    turn = asyncio.ensure_future(_events(agent.respond(conversation, "where is order 42",
                                                       clock=clock)))
    try:
        for _ in range(500):  # 10 s of wall time only bounds a hang
            if turn.done():
                break
            await clock.advance(0.05)  # the body's rest is cut once its grace passes
            await asyncio.sleep(0.02)
        events = turn.result()
    finally:
        turn.cancel()
        app.release.set()
        await agent.aclose()
    assert [c["arguments"] for c in hook.calls] == [{"order": "42"}]
    assert [e.text for e in events if isinstance(e, Sentence)] == [
        "Order 42 left today.", "It arrives on Monday"]
    assert not any(isinstance(e, Handoff) for e in events)


@pytest.mark.parametrize("sdk", ["openai", "groq"])
async def test_a_second_call_at_the_same_index_is_not_merged_into_the_first(sse, sdk):
    """Servers that send each parallel call whole in one chunk and reuse ``index`` 0 for every
    one (the id and name say a new call starts, as ``_unindexed`` already reads them when
    the index is missing): the assembler keeps the first name, takes the second id and
    concatenates the arguments ('{"order": "42"}{"account": "7"}'): one broken call, the
    second tool never called."""
    server = sse(ScriptedSSE([
        ROLE,
        tools(call(0, id="call_a", name="get_order", arguments='{"order": "42"}')),
        tools(call(0, id="call_b", name="get_account", arguments='{"account": "7"}')),
        chunk({}, "tool_calls"),
        DONE,
    ]))
    assert await tool_calls_of(chat(sdk, server.url)) == [
        ("get_order", '{"order": "42"}'), ("get_account", '{"account": "7"}')]


@pytest.mark.parametrize("sdk", ["openai", "groq"])
async def test_a_tool_call_cut_at_max_tokens_is_no_finished_call(sse, sdk):
    """``finish_reason: "length"`` (llm_max_tokens, 300 by default, reached) means the model
    was stopped mid-generation: a tool call's arguments are cut as surely as by a dropped
    connection (``CutShort``). ``chunks`` counts any finish_reason as finished and emits
    the half call as whole (ToolStarted, the filler, a webhook round refused for its
    arguments, one more LLM round) where a cut stream fails the round cleanly."""
    server = sse(ScriptedSSE([
        ROLE,
        tools(call(0, id="call_a", name="get_order", arguments='{"order": "4')),
        chunk({}, "length"),
        DONE,
    ]))
    try:
        calls = await tool_calls_of(chat(sdk, server.url))
    except ProviderError:
        return  # failed as a cut stream fails: fine
    assert calls == [], "a tool call cut at max_tokens was emitted as a finished call"


@pytest.mark.parametrize("sdk", ["openai", "groq"])
async def test_an_answer_cut_at_max_tokens_mid_sentence_says_its_whole_sentences_only(sse, sdk):
    """Review (stop 67): ``finish_reason: "length"`` mid-sentence (llm_max_tokens reached):
    the sentences before the cut are said and kept in the context, the one it broke off
    ("It arrives on") is neither said nor kept; a cut answer with no whole sentence is
    said as it is (better than nothing, then the apology of an empty round)."""
    app = ScriptedSSE(
        [ROLE, chunk({"content": "Order 42 left today."}), chunk({"content": " It arrives on"}),
         chunk({}, "length"), DONE],
        [ROLE, chunk({"content": "Order 42 left today and it arrives on"}),
         chunk({}, "length"), DONE])
    server = sse(app)
    agent = Agent(HedgedChat(chat(sdk, server.url)), filler_after_s=None, hold_after_s=None)
    conversation = agent.new_conversation()
    try:
        first = await _events(agent.respond(conversation, "where is order 42"))
        kept = conversation.messages()[-1]["content"]
        second = await _events(agent.respond(conversation, "and when does it arrive"))
    finally:
        await agent.aclose()
    assert [e.text for e in first if isinstance(e, Sentence)] == ["Order 42 left today."]
    assert kept == "Order 42 left today."
    assert [e.text for e in second if isinstance(e, Sentence)] == [
        "Order 42 left today and it arrives on"]


@pytest.mark.parametrize("fault", ["connection_dropped", "read_timeout"])
async def test_groq_mid_stream_transport_failure_is_a_provider_error(sse, fault):
    """The groq SDK (unlike openai's, which maps them to APIConnectionError/APITimeoutError)
    lets httpx's errors out of the stream's iteration unwrapped: a peer that drops the
    connection mid-answer (httpx.RemoteProtocolError) or stalls past the timeout
    (httpx.ReadTimeout) escapes ``GroqChat.stream`` as a raw httpx exception, not the
    ``ProviderError`` the ChatModel contract and SDKChat's docstring promise. Only the
    hedge's catch-all in ``_pump`` keeps it from a caller today."""
    app = ScriptedSSE([ROLE, chunk({"content": "Your order"})],
                      abort=fault == "connection_dropped", hold=fault == "read_timeout")
    server = sse(app)
    model = chat("groq", server.url, timeout_s=0.5)
    got: list[str] = []
    try:
        with pytest.raises(Exception) as info:
            async for piece in model.stream(MESSAGES):
                got.append(piece.text)
    finally:
        app.release.set()
        await model.aclose()
    assert "Your order" in got  # the failure came mid-stream, after the first token
    assert isinstance(info.value, ProviderError), \
        f"escaped as {type(info.value).__module__}.{type(info.value).__name__}: {info.value}"


# ------------------------------------------------------------------ ElevenLabs


async def test_elevenlabs_requests_carry_the_configured_http_timeout(eleven):
    """``ElevenLabsTTS(timeout_s=30)`` builds ``httpx.AsyncClient(timeout=30)``, but
    ``AsyncElevenLabs``' own ``timeout`` argument defaults to 240 and the SDK passes it
    with every request, overriding the client's: each read may wait 240 s. A synthesis that
    stalls after its first audio, where no gap timeout watches (a seed's answers:
    seeding.py joins ``tts.synthesize`` directly), holds its slot and connection 8x the
    documented 30 s."""
    fake, server = eleven
    seen: list[dict[str, Any]] = []
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url, timeout_s=30.0)

    async def record(request: httpx.Request) -> None:
        seen.append(request.extensions.get("timeout", {}))

    tts._http.event_hooks["request"].append(record)
    try:
        audio = b"".join([piece async for piece in tts.synthesize("Hello there.")])
    finally:
        await tts.aclose()
    assert audio and len(seen) == 1
    assert seen[0].get("read") == 30.0, f"request timeouts: {seen[0]}"


KEY = "sk_live_0123456789abcdef0123"


async def test_elevenlabs_refusal_that_echoes_the_key_keeps_it_out_of_the_error(eleven):
    """A gateway or proxy in front of the voice (``elevenlabs_base_url`` is configurable)
    may echo the key it was given in its refusal. SDKChat masks the key in every message
    it raises for exactly this reason ("a compatible server may echo it whole"); the
    ElevenLabs adapter copies the body's message into the ProviderError as is, and that
    message goes to the logs (tts_failed) and the caller's error event."""
    fake, server = eleven
    fake.api_key = KEY
    fake.refusals.append((401, {"status": "invalid_api_key",
                                "message": f"API key {KEY} is not allowed from this network"}, {}))
    tts = ElevenLabsTTS(KEY, voice_id="v", base_url=server.url)
    try:
        with pytest.raises(ProviderError) as info:
            [piece async for piece in tts.synthesize("Hello there.")]
    finally:
        await tts.aclose()
    assert "HTTP 401" in str(info.value)
    assert KEY not in str(info.value), str(info.value)


@pytest.mark.parametrize("body", [
    b'\xef\xbb\xbf{"detail": {"message": "Service temporarily unavailable"}}',
    "<!DOCTYPE html><title>Zugriff verweigert \u2013 bitte anmelden</title>".encode(),
], ids=["json-with-utf8-bom", "page-with-a-dash"])
async def test_a_text_body_with_one_non_ascii_byte_is_still_no_audio(eleven, body):
    """``_reads_as_text`` calls a body text only when every one of its first 16-64 bytes is
    printable ASCII: a UTF-8 BOM (emitted by many Windows/.NET proxies) or one accented
    letter or dash in a page's title, labelled application/octet-stream (or the
    text/event-stream ElevenLabs' OpenAPI names), passes as PCM and is played as noise
    (and seeded into the cache), the very case the check exists for."""
    fake, server = eleven
    fake.not_audio = ("application/octet-stream", body)
    tts = ElevenLabsTTS("test-key", voice_id="v", base_url=server.url)
    try:
        with pytest.raises(ProviderError):
            [piece async for piece in tts.synthesize("Your order shipped on Monday.")]
    finally:
        await tts.aclose()


@pytest.mark.parametrize("sdk", ["openai", "groq"])
async def test_the_answer_length_cap_is_sent_as_current_models_take_it(llm_server, sdk):
    # Review: `max_tokens` (llm_max_tokens, 300) went with every request: deprecated, and
    # refused with a 400 by OpenAI's current models (GPT-5, the o-series), as the fake now
    # refuses it: every miss of such a model would go to a person.
    fake, server = llm_server
    model = chat(sdk, server.url, max_tokens=300)
    try:
        got = "".join([c.text async for c in model.stream(MESSAGES) if c.text])
    finally:
        await model.aclose()
    assert got
    (body,) = fake.stats.bodies
    assert body["max_completion_tokens"] == 300 and "max_tokens" not in body
