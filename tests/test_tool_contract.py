"""The agent's tools and their webhooks' contract (gateway/agent.py, gateway/tools.py): a
redirect is no success, arguments fit the tool's schema before any POST, a tools file with
a bad schema stops the start-up, a call runs once a turn, call ids are unique, one hung
service holds only its own tool's connections.

Each test failed before its fix (a review). No wall-clock timing: tool timeouts run on a ManualClock that the tests
never advance, fake servers on 127.0.0.1 (tests/conftest.py's ``llm_server``, ``webhook``).
"""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from gateway.agent import Agent, Sentence
from gateway.clock import ManualClock
from gateway.providers.base import LLMChunk, ToolCall, ToolSpec
from gateway.providers.chat_stream import ToolCallAssembler
from gateway.tools import MAX_RESULT_CHARS, ToolConfigError, ToolRunner, load_tools
from tests.fakes.server import ServerThread
from tests.test_agent import BALANCE, ScriptLLM, run


# ------------------------------------------------------------------ the webhook's answer


async def test_a_redirecting_webhook_is_not_taken_for_an_empty_success():
    """The operator's tools file says http://…; the service answers every POST with a
    redirect (http → https, a moved path: 301/302/307/308). httpx does not follow it (its
    default), and ToolRunner takes any status below 400 as the answer: the redirect's
    (empty) body goes back to the model as a *successful* result. The POST never reached
    the service that acts (the payment was not taken, the ticket not opened), yet the
    model is told it went fine and tells the caller so. A redirect must either be
    followed (307/308 keep the POST) or come back as an error, never as a result."""
    hits: list[dict[str, Any]] = []

    async def moved(request: Request) -> RedirectResponse:
        return RedirectResponse(url="/tool/real", status_code=307)

    async def real(request: Request) -> JSONResponse:
        hits.append(await request.json())
        return JSONResponse({"balance": "12.00"})

    app = Starlette(routes=[Route("/tool/moved", moved, methods=["POST"]),
                            Route("/tool/real", real, methods=["POST"])])
    with ServerThread(app) as server:
        runner = ToolRunner([ToolSpec("get_balance", "", url=server.url + "/tool/moved",
                                      timeout_s=10.0)])
        try:
            content, ok = await runner.run(ToolCall("c1", "get_balance", '{"account": "42"}'),
                                           ManualClock())
        finally:
            await runner.aclose()
    followed = ok and hits and json.loads(content) == {"balance": "12.00"}
    refused = not ok and "error" in json.loads(content)
    assert followed or refused, (
        f"a 307 came back as ok={ok} with content {content!r}; the service that acts was "
        f"called {len(hits)} times")


async def test_an_answer_cut_to_what_the_model_gets_says_it_was_cut(webhook):
    """Review (stop 67): a webhook's answer longer than MAX_RESULT_CHARS reaches the model
    cut (its JSON broken off mid-row) and saying so, within MAX_RESULT_CHARS: the model must
    not take the first rows of a long history for the whole of it. An answer that fits is
    given whole, with no note."""
    hook, hook_server = webhook
    rows = [{"id": n, "amount": "12.50"} for n in range(2000)]
    runner = ToolRunner([ToolSpec("get_history", "", url=hook_server.url + "/tool/get_history",
                                  timeout_s=10.0)])
    try:
        hook.handler = lambda payload: {"transactions": rows}
        content, ok = await runner.run(ToolCall("c1", "get_history", "{}"), ManualClock())
        hook.handler = lambda payload: {"transactions": rows[:3]}
        whole, _ = await runner.run(ToolCall("c2", "get_history", "{}"), ManualClock())
    finally:
        await runner.aclose()
    assert ok and len(content) <= MAX_RESULT_CHARS
    assert content.startswith('{"transactions":[{"id":0,'), content[:80]
    assert "cut" in content[-200:], f"the model is not told the answer was cut: ...{content[-80:]}"
    assert json.loads(whole) == {"transactions": rows[:3]}


# ------------------------------------------------------- arguments against the schema


@pytest.mark.parametrize("arguments", ["{}", '{"account": 42}', "null"],
                         ids=["required-missing", "wrong-type", "null"])
async def test_arguments_that_break_the_tools_schema_never_reach_the_webhook(webhook, arguments):
    """get_balance declares ``account`` a required string. A model (a small local one
    especially, or any model after a barge-in cut the caller's account number) calls it
    with no account, or with a number. ToolRunner checks only that the arguments are a
    JSON object and POSTs them as they are: the operator's webhook receives a request its
    own contract forbids (a 500, or worse, a lookup of account "None"/42), and the model
    gets that webhook's failure instead of a precise "account is required" it could act
    on (ask the caller). Arguments are validated against ``parameters`` first; the
    webhook is called only with valid ones."""
    hook, hook_server = webhook
    runner = ToolRunner([ToolSpec(BALANCE.name, BALANCE.description, BALANCE.parameters,
                                  url=hook_server.url + "/tool/get_balance", timeout_s=10.0)])
    try:
        content, ok = await runner.run(ToolCall("c1", "get_balance", arguments), ManualClock())
    finally:
        await runner.aclose()
    assert list(hook.calls) == [], f"the webhook was sent {list(hook.calls)}"
    assert not ok and "account" in json.loads(content)["error"], content


# ---------------------------------------------------------------- the tools file


@pytest.mark.parametrize("tool, what", [
    ({"parameters": {"type": "array", "items": {"type": "string"}}}, "parameters"),
    ({"parameters": {"type": "object", "properties": {"account": {"type": "strnig"}}}},
     "parameters"),
    ({"parameters": {"type": "object", "properties": ["account"]}}, "parameters"),
    ({"parameters": {"type": "object", "required": "account"}}, "parameters"),
    ({"parameters": ""}, "parameters"),
    ({"parameters": []}, "parameters"),
    ({"description": ["The caller's balance."]}, "description"),
], ids=["not-an-object-schema", "unknown-type", "properties-a-list", "required-a-string",
        "parameters-empty-string", "parameters-empty-list", "description-a-list"])
def test_a_tools_file_with_a_bad_schema_or_wrong_types_stops_the_start_up(tmp_path, tool, what):
    """load_tools checks only that ``parameters`` is a (non-empty) dict. A schema the chat
    API refuses (OpenAI: "Invalid schema for function 'get_balance'", HTTP 400, for a
    top-level type other than object, an unknown type, properties that are no object,
    required that is no list) is accepted at start-up, then every LLM request that offers
    the tools fails: every cache miss of every call is a handoff with llm_failed. Falsy
    wrong values ("" or [] for parameters) are silently replaced by the empty schema, and a
    description that is no string is sent as Python's repr. Each should stop the start-up
    with a ToolConfigError naming the tool and the field."""
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps([{"name": "get_balance", "url": "http://127.0.0.1:9/tool",
                                **tool}]))
    with pytest.raises(ToolConfigError, match=f"get_balance.*{what}"):
        specs = load_tools(str(bad))
        print("accepted:", specs)


def test_a_bad_tool_url_is_reported_without_its_password(tmp_path):
    """A tools file has no headers: a webhook's credentials can only travel in its URL
    (user:password@, as httpx sends Basic auth). A URL refused at start-up is quoted whole
    in the ToolConfigError, password included, and that message goes to the service's log
    (docs/architecture.md: logs never contain a URL's password; settings.redact_url
    exists for exactly this)."""
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps([{"name": "pay_bill",
                                "url": "https://billing:S3cr3t-t0ken@127.0.0.1:8o80/pay"}]))
    with pytest.raises(ToolConfigError) as raised:
        load_tools(str(bad))
    assert "pay_bill" in str(raised.value)
    assert "S3cr3t-t0ken" not in str(raised.value), str(raised.value)


# ------------------------------------------------------------- the tool call itself


class RecordingRunner:
    """A tool runner that answers at once, keeping every call it ran (webhook POSTs)."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    async def run(self, call: ToolCall, clock: Any) -> tuple[str, bool]:
        self.calls.append(call)
        return json.dumps({"ticket": f"T-{len(self.calls)}", "status": "opened"}), True

    async def aclose(self) -> None:
        return None


TICKET = ToolSpec("create_ticket", "Open a support ticket.",
                  {"type": "object", "properties": {"summary": {"type": "string"}},
                   "required": ["summary"]})
SAME = '{"summary": "card lost"}'


@pytest.mark.parametrize("scripts", [
    # Parallel calls, identical (name and arguments), in one round: small local models
    # repeat a call inside one tool_calls list.
    ([LLMChunk(tool_call=ToolCall("c1", "create_ticket", SAME)),
      LLMChunk(tool_call=ToolCall("c2", "create_ticket", SAME))],
     [LLMChunk(text="Your ticket is open.")]),
    # The same call again in the next round, its result already in the context (a model
    # that loops on a tool until the last round stops offering it).
    ([LLMChunk(tool_call=ToolCall("c1", "create_ticket", SAME))],
     [LLMChunk(tool_call=ToolCall("c2", "create_ticket", SAME))],
     [LLMChunk(text="Your ticket is open.")]),
], ids=["same-round", "next-round"])
async def test_the_same_tool_call_is_not_run_twice_in_one_turn(scripts):
    """The agent runs every tool call the model streams, each as its own webhook POST. An
    identical call (same tool, same arguments) repeated within one turn, in the same
    tool_calls list or in the round after the first one's result came back, is POSTed
    again: a side-effecting webhook (a ticket, a payment, a callback booked) acts twice
    for one request of the caller. Within a turn an identical call should be answered
    from the first one's result (or refused), never sent again."""
    runner = RecordingRunner()
    agent = Agent(ScriptLLM(*scripts), [TICKET], runner=runner,  # type: ignore[arg-type]
                  filler_after_s=None)
    events, _ = await run(agent, "I lost my card, open a ticket please")
    assert Sentence("Your ticket is open.") in events
    assert len(runner.calls) == 1, (
        f"one request of the caller, {len(runner.calls)} webhook calls: "
        f"{[(c.id, c.arguments) for c in runner.calls]}")


class TimingOutRunner(RecordingRunner):
    """A tool runner whose webhook never answers in time: every call comes back as the
    timeout's error, after the service may have acted."""

    async def run(self, call: ToolCall, clock: Any) -> tuple[str, bool]:
        self.calls.append(call)
        return json.dumps({"error": f"{call.name} did not answer within 5 seconds"}), False


@pytest.mark.parametrize("scripts, runs", [
    # Repeated in the round of the first: one POST.
    ([[LLMChunk(tool_call=ToolCall("c1", "create_ticket", SAME)),
       LLMChunk(tool_call=ToolCall("c2", "create_ticket", SAME))]], 1),
    # Failed in round one, retried twice in round two (the model saw the failure): the
    # retry is one POST, its repeat in its round shares it.
    ([[LLMChunk(tool_call=ToolCall("c1", "create_ticket", SAME))],
      [LLMChunk(tool_call=ToolCall("c2", "create_ticket", SAME)),
       LLMChunk(tool_call=ToolCall("c3", "create_ticket", SAME))]], 2),
], ids=["same-round", "retried-twice-in-the-next-round"])
async def test_a_call_repeated_in_its_round_is_not_sent_again_when_the_first_failed(scripts,
                                                                                   runs):
    """Review (stop 67): a call the model repeats in the same round (same tool, same
    arguments) shares the first one's result even when that one failed (a timeout: the
    service may have acted): the model never saw that failure, so the repeat is no retry,
    and it is never POSTed again (nor does the turn wait a second timeout). A retry in a
    later round is one POST however often that round repeats it."""
    runner = TimingOutRunner()
    agent = Agent(ScriptLLM(*scripts, [LLMChunk(text="Sorry, the ticket service is slow.")]),
                  [TICKET], runner=runner, filler_after_s=None)  # type: ignore[arg-type]
    events, conversation = await run(agent, "I lost my card, open a ticket please")
    assert Sentence("Sorry, the ticket service is slow.") in events
    assert len(runner.calls) == runs, (
        f"{runs} webhook calls expected, {len(runner.calls)} made")
    results = [m["content"] for m in conversation.messages() if m["role"] == "tool"]
    assert len(results) == sum(map(len, scripts)) and \
        all("did not answer" in r for r in results), results


def _go_float(text: str) -> float:
    """What a strict server (Ollama: Go's encoding/json into a map) makes of a JSON number:
    one outside float64's range is an error ("cannot unmarshal number 1e999")."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


async def test_an_out_of_range_number_in_tool_arguments_does_not_poison_the_context(webhook):
    """A model writes a tool call whose arguments hold a number past float64's range
    (``{"amount": 1e999}``: digits run away). ``parse_arguments`` takes it (json.loads
    reads it as inf: its NaN/Infinity guard only sees the literals), so the context keeps
    the arguments as streamed; the runner then fails to send them (httpx refuses inf).
    A strict OpenAI-compatible server (Ollama decodes every history tool call into a map)
    refuses every later request of the call with HTTP 400: the very poisoning
    _readable_arguments exists to prevent (test_agent's NaN case), reached by another
    spelling. The context must keep arguments a strict parser reads ("{}" as for NaN)."""
    hook, hook_server = webhook
    pay = ToolSpec("pay_bill", "Pay the bill.", url=hook_server.url + "/tool/pay_bill",
                   timeout_s=10.0)
    llm = ScriptLLM([LLMChunk(tool_call=ToolCall("c1", "pay_bill", '{"amount": 1e999}'))],
                    [LLMChunk(text="Sorry, what amount?")])
    agent = Agent(llm, [pay], filler_after_s=None)  # type: ignore[arg-type]
    try:
        events, conversation = await run(agent, "pay my bill")
    finally:
        await agent.aclose()
    assert events[-1] == Sentence("Sorry, what amount?")
    assert list(hook.calls) == []
    sent = [c["function"]["arguments"] for m in conversation.messages()
            for c in m.get("tool_calls") or ()]
    for arguments in sent:
        try:
            json.loads(arguments, parse_float=_go_float, parse_int=_go_float)
        except ValueError as exc:
            pytest.fail(f"the next request carries arguments {arguments!r} a strict server "
                        f"refuses ({exc}): every later turn of the call fails")


def _call_without_id(arguments: str) -> SimpleNamespace:
    # A streamed tool-call fragment from a server that sends no call id (index only).
    return SimpleNamespace(index=0, id=None, type="function",
                           function=SimpleNamespace(name="pay_bill", arguments=arguments))


async def test_the_call_id_a_webhook_gets_is_unique(webhook):
    """The webhook receives ``call_id`` (tools.py: POST {tool, call_id, arguments}), the
    one field that tells two calls apart: what an operator keys idempotency or an audit
    on. With a server that streams tool calls without an id, ToolCallAssembler names
    each ``call_{index}``: every turn's first call, in every call on the gateway, is
    ``call_0``. Two different payments reach the webhook under one id (the second
    deduplicated away, or answered with the first's result, another caller's included).
    A call id the gateway makes up must be unique (a random suffix)."""
    hook, hook_server = webhook
    runner = ToolRunner([ToolSpec("pay_bill", "", url=hook_server.url + "/tool/pay_bill",
                                  timeout_s=10.0)])
    try:
        for amount in ("12", "80"):  # two turns (or two callers): one stream each
            assembler = ToolCallAssembler()
            calls = assembler.add([_call_without_id(f'{{"amount": "{amount}"}}')])
            calls += assembler.finish()
            assert len(calls) == 1
            _, ok = await runner.run(calls[0], ManualClock())
            assert ok
    finally:
        await runner.aclose()
    ids = [c["call_id"] for c in hook.calls]
    assert len(set(ids)) == 2, f"two different payments, webhook call ids {ids}"


async def test_one_hung_webhook_does_not_starve_every_other_tool(webhook):
    """ToolRunner sends every tool's webhook through one httpx.AsyncClient with httpx's
    default pool (100 connections in all, every host together), shared by every call on
    the replica. A webhook that hangs (an outage that answers nothing until each call's
    timeout_s) holds a connection per call waiting on it; at 100 such calls, every other
    tool, on another service that answers at once, waits for a free connection and fails
    with "did not answer" (httpx's PoolTimeout) though its request was never sent: one
    slow back end takes the agent's every tool down for every caller. A tool's calls
    must not be able to take all the connections (a pool per tool, or a per-tool cap
    below the pool's)."""
    hook, hook_server = webhook
    hook.hold = {"get_history"}  # the hung service: answers only when the test releases it
    hung = ToolSpec("get_history", "", url=hook_server.url + "/tool/get_history",
                    timeout_s=60.0)
    fast = ToolSpec("get_balance", "", url=hook_server.url + "/tool/get_balance",
                    timeout_s=3.0)
    runner = ToolRunner([hung, fast])
    clock = ManualClock()  # stands still: no tool's own timeout_s passes
    waiting = [asyncio.create_task(runner.run(ToolCall(f"h{n}", "get_history", "{}"), clock))
               for n in range(100)]
    try:
        assert await hook.calls.reach(100), "the hung calls never arrived"
        content, ok = await runner.run(ToolCall("b1", "get_balance", "{}"), clock)
        balance_calls = [c for c in hook.calls if c["tool"] == "get_balance"]
    finally:
        hook.release.set()
        await asyncio.gather(*waiting, return_exceptions=True)
        await runner.aclose()
    assert ok and balance_calls, (
        f"get_balance answered {content!r}; its webhook received {len(balance_calls)} calls")


async def test_a_refusal_tells_the_model_why(webhook):
    # Review (suspicion, proven): a 4xx answer's body was never read: a 422 saying
    # "account is required" reached the model as "failed with status 422", nothing it
    # could act on (ask the caller). The reason goes with the status now, briefly; a
    # 5xx's body (the service's own trouble) does not.
    hook, hook_server = webhook
    hook.status = 422
    hook.handler = lambda payload: {"detail": "account is required"}
    runner = ToolRunner([ToolSpec("get_balance", "", url=hook_server.url + "/tool/get_balance",
                                  timeout_s=10.0)])
    try:
        content, ok = await runner.run(ToolCall("c1", "get_balance", "{}"), ManualClock())
        assert not ok
        assert json.loads(content)["error"] == (
            'get_balance failed with status 422: {"detail":"account is required"}')
        hook.status = 503
        hook.handler = lambda payload: {"trace": "internal stack"}
        content, ok = await runner.run(ToolCall("c2", "get_balance", "{}"), ManualClock())
        assert not ok and json.loads(content)["error"] == "get_balance failed with status 503"
    finally:
        await runner.aclose()


# ------------------------------------------------------------------- tool metrics


async def test_every_tool_call_is_counted_by_tool_and_outcome_for_prometheus():
    """A webhook that fails is not an error of the call (the model tells the caller it
    could not do it), so before voicegate_tool_calls nothing an operator watches showed a
    tool service down or a model making calls up. Each outcome is counted under its tool;
    a made-up name under one label, never a series of its own."""
    from gateway.stats import Stats

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"balance": "12.00"})

    async def refused(request: Request) -> JSONResponse:
        return JSONResponse({"error": "account is required"}, status_code=422)

    async def broken(request: Request) -> JSONResponse:
        return JSONResponse({}, status_code=503)

    app = Starlette(routes=[Route("/ok", ok, methods=["POST"]),
                            Route("/refused", refused, methods=["POST"]),
                            Route("/broken", broken, methods=["POST"])])
    stats = Stats()
    with ServerThread(app) as server:
        runner = ToolRunner([ToolSpec(name, "", BALANCE.parameters, url=f"{server.url}/{name}",
                                      timeout_s=10.0) for name in ("ok", "refused", "broken")])
        stats.watch_tools(runner)
        try:
            for call in (ToolCall("c1", "ok", '{"account": "42"}'),
                         ToolCall("c2", "ok", '{"account": "43"}'),
                         ToolCall("c3", "ok", '{"account": 42}'),
                         ToolCall("c4", "refused", '{"account": "42"}'),
                         ToolCall("c5", "broken", '{"account": "42"}'),
                         ToolCall("c6", "made_up", "{}"),
                         ToolCall("c7", "also_made_up", "{}")):
                await runner.run(call, ManualClock())
        finally:
            await runner.aclose()
    registry = stats.prometheus.registry
    counted = {(s.labels["tool"], s.labels["outcome"]): s.value
               for metric in registry.collect() if metric.name == "voicegate_tool_calls"
               for s in metric.samples}
    assert counted == {("ok", "ok"): 2, ("ok", "bad_arguments"): 1, ("refused", "refused"): 1,
                       ("broken", "failed"): 1, ("(unknown)", "unknown_tool"): 2}, counted


@pytest.mark.parametrize("call_id", [7, ["call_1"]], ids=["a-number", "a-list"])
def test_a_tool_call_id_that_is_no_text_is_a_malformed_chunk(call_id):
    """Review (stop 66): a server streams a tool call whose ``id`` is no string (the SDKs
    build chunks unchecked). The assembler kept it: the webhook got it as its call_id,
    and the context sent it back, which a chat API refuses (the id must be a string) at
    every later request of the call. It is the leg's malformed chunk (a ValueError, read
    as "malformed stream chunk"), as a ``delta.content`` that is no string is."""
    fragment = SimpleNamespace(index=0, id=call_id, type="function",
                               function=SimpleNamespace(name="pay_bill", arguments="{}"))
    assembler = ToolCallAssembler()
    with pytest.raises(ValueError, match="tool call's id is a"):
        assembler.add([fragment])
        print("assembled:", assembler.finish())


_REF_TO_NOTHING = {"type": "object",
                   "properties": {"account": {"$ref": "#/$defs/Account"}},
                   "$defs": {"Acount": {"type": "string"}}}  # the operator's typo


def test_a_tools_file_schema_with_a_ref_to_nothing_stops_the_start_up(tmp_path):
    """Review (stop 66): a tools file's schema refers to a definition it lacks (a typo in
    ``$defs``, or a remote ``$ref``). ``check_schema`` only checks that a ``$ref`` is a
    URI, so the start-up accepted it (docs/architecture.md: the tools file's schemas are
    checked at start-up), and the ref was resolved at the first call: jsonschema raised
    out of ToolRunner.run, every call of the tool failed the caller's turn (the apology,
    "the gateway failed" in the context). The start-up stops, naming the tool and the ref."""
    for parameters in (_REF_TO_NOTHING,
                       {"type": "object", "properties": {
                           "account": {"$ref": "https://schemas.example.com/account.json"}}}):
        bad = tmp_path / "tools.json"
        bad.write_text(json.dumps([{"name": "get_balance", "url": "http://127.0.0.1:9/tool",
                                    "parameters": parameters}]))
        with pytest.raises(ToolConfigError, match=r"get_balance.*\$ref"):
            specs = load_tools(str(bad))
            print("accepted:", specs)
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps([{"name": "get_balance", "url": "http://127.0.0.1:9/tool",
                                 "parameters": {**_REF_TO_NOTHING,
                                                "$defs": {"Account": {"type": "string"}}}}]))
    assert [spec.name for spec in load_tools(str(fine))] == ["get_balance"]


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"$id": {"type": "string"}}},
    {"type": "object", "properties": {"doc": {"type": "object", "default": {"$ref": "x"}}}},
    {"type": "object", "properties": {"kind": {"const": {"$ref": "#/nope"}}}},
    {"type": "object", "properties": {"kind": {"enum": [{"$ref": "#/nope"}, "a"]}}},
], ids=["property-named-$id", "$ref-in-a-default", "$ref-in-a-const", "$ref-in-an-enum"])
def test_a_valid_schema_whose_data_looks_like_keywords_still_loads(tmp_path, parameters):
    """Review (stop 66, second look): the $ref check walked every object of the schema as a
    schema, data included. A property named "$id" crashed the start-up (AttributeError out
    of referencing), and a "$ref" inside a default or a const, which jsonschema never
    resolves, was refused: tools files that loaded before kept the replica from starting.
    Only the keywords that hold schemas are walked now."""
    good = tmp_path / "tools.json"
    good.write_text(json.dumps([{"name": "get_record", "url": "http://127.0.0.1:9/tool",
                                 "parameters": parameters}]))
    assert [spec.name for spec in load_tools(str(good))] == ["get_record"]


async def test_a_schema_that_cannot_be_checked_is_a_result_for_the_model_not_a_crash(webhook):
    """Review (stop 66): ToolRunner is also built from specs in code (not only the tools
    file), and its promise is that the model gets a string back whatever happens. A schema
    whose check raises (a ``$ref`` to nothing) raised out of ``run``: the turn failed with
    the apology instead of the model saying it could not do it. The webhook is never
    called with arguments that were not checked."""
    hook, hook_server = webhook
    runner = ToolRunner([ToolSpec("get_balance", "", _REF_TO_NOTHING,
                                  url=hook_server.url + "/tool/get_balance", timeout_s=10.0)])
    try:
        content, ok = await runner.run(ToolCall("c1", "get_balance", '{"account": "42"}'),
                                       ManualClock())
    finally:
        await runner.aclose()
    assert not ok and "get_balance" in json.loads(content)["error"], content
    assert list(hook.calls) == []
    assert runner.outcomes[("get_balance", "not_sent")] == 1
