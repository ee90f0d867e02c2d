"""The FAQ cache end to end: seed the example CSV with the real voice, ask over the WebSocket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from cache_seed import parse_seed_csv, seed_plan
from gateway.agent import Conversation
from gateway.audio import resample_pcm16
from gateway.audio_bank import AudioBank
from gateway.client import Caller
from gateway.faq_cache import FaqCache
from gateway.responder import Responder, Turn
from gateway.seeding import seed_with_voice
from gateway.server import BackgroundServer
from gateway.timeline import TurnTimeline
from intents.store import LocalStore
from tests.admin_support import small_faq_csv
from tests.intents_support import shared_embedder, tone_render

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "cache_seed" / "examples" / "bank_faq.csv"


@pytest.fixture(scope="module")
def faq_store(tmp_path_factory, runtime):
    root = tmp_path_factory.mktemp("faq-store")
    report = seed_with_voice(EXAMPLE, LocalStore(root), runtime.tts, runtime.embedder,
                             progress=False)
    assert report.rendered == report.answer_entries and report.reused == 0
    return root


@pytest.fixture(scope="module")
def faq_server(settings, runtime, faq_store):
    server = BackgroundServer(settings.replace(store_dir=str(faq_store),
                                                  cache_poll_s=0.2), runtime).start()
    yield server
    server.stop()


def served_clip(server: BackgroundServer, entry_id: str, rate: int) -> bytes:
    cache = server.app.state.services.cache
    return cache.audio.audio(entry_id, rate)


async def test_spoken_faq_is_answered_with_the_pre_rendered_audio(faq_server, speak):
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say(speak("Hi, what time do your branches open on Saturday?"),
                                nothing_heard_ms=30000)  # loaded machine: slow first words
    route = turn.first("route")
    assert route["hit"] is True and route["intent"] == "opening_hours"
    assert turn.first("response")["source"] == "cache"
    clip = served_clip(faq_server, "opening_hours", 16000)
    # exactly the pre-rendered bytes; only the last frame is padded with silence
    assert bytes(turn.audio[:len(clip)]) == clip
    assert len(turn.audio) - len(clip) < 640 and not any(turn.audio[len(clip):])
    assert turn.metrics["source"] == "cache" and turn.metrics["hit"] is True


async def test_decision_made_on_partials_is_reused_at_end_of_turn(faq_server):
    # Partials of 3 and 5 words are routed (2 new words each): the last is the final.
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say_text("what is my routing number",
                                     partial_words=True, word_interval_s=0.05)
    route = turn.first("route")
    assert route["reused"] is True and route["hit"] is True
    assert route["entry_id"] == "routing_number"
    assert turn.metrics["route_reused"] is True and turn.metrics["source"] == "cache"


async def test_a_decision_settled_on_partials_stops_their_routing_the_final_is_checked(
        faq_server):
    # Two partials in a row hit the same entry: later partials are not routed, and the
    # final, whose words no partial routing saw, is routed on its own words.
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say_text("I need the routing number for a direct deposit",
                                     partial_words=True, word_interval_s=0.05)
    route = turn.first("route")
    assert route["hit"] is True and route["entry_id"] == "routing_number"
    assert turn.metrics["partials_skipped"] > 0 and route["reused"] is False


@pytest.mark.parametrize("question, intent, action", [
    ("how much money do I have in checking", "account_balance", "llm"),
    ("please move a hundred dollars into my savings account", "transfer_money", "llm"),
    ("let me talk to a human", "speak_to_person", "handoff"),
])
async def test_llm_and_handoff_intents_never_come_from_the_cache(faq_server, question, intent,
                                                                 action):
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say_text(question)
    route = turn.first("route")
    assert (route["intent"], route["action"], route["hit"]) == (intent, action, False)
    sources = [e["source"] for e in turn.events if e["type"] == "response"]
    assert "cache" not in sources and sources  # answered, never from the cache


async def test_out_of_scope_question_misses(faq_server):
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say_text("who won the football game last night")
    route = turn.first("route")
    assert route["hit"] is False and route["intent"] is None


async def test_a_new_version_is_picked_up_without_restart(faq_server, faq_store, runtime,
                                                         tmp_path):
    before = httpx.get(faq_server.base_url + "/readyz").json()["cache_version"]
    changed = tmp_path / "faq.csv"
    text = EXAMPLE.read_text(encoding="utf-8")
    new_answer = "Our branches now open at eight every weekday."
    changed.write_text(text.replace(
        "Our branches are open Monday to Friday from nine to five, and Saturdays from nine to "
        "one. Phone banking is available around the clock.", new_answer), encoding="utf-8")
    report = seed_with_voice(changed, LocalStore(faq_store), runtime.tts, runtime.embedder,
                             progress=False)
    assert report.rendered == 1 and report.reused == report.answer_entries - 1
    for _ in range(600):  # 60 s: a bound on a hang, not a pace (a loaded machine's swap)
        if httpx.get(faq_server.base_url + "/readyz").json()["cache_version"] == report.version:
            break
        await asyncio.sleep(0.1)
    assert report.version != before
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say_text("what are your opening hours")
    assert turn.first("response")["text"] == new_answer


OLD_HOURS = ("Our branches are open Monday to Friday from nine to five, and Saturdays from "
             "nine to one. Phone banking is available around the clock.")
NEW_HOURS = "Our branches are closed on Saturdays from now on."


async def test_a_reply_routed_before_a_reload_says_one_answer_and_plays_another(tmp_path) -> None:
    """A caller asks "What are your opening hours?" just as the operator publishes a new
    answer for that entry. The turn was routed (at the caller's pause) against the version
    then serving; before its reply starts, the replica swaps in the new version. The reply
    event and the agent's context get the old answer's text (the decision's), while the
    caller hears the new version's clip (the bank is keyed by entry id only): what the bot
    says it said and what the caller heard differ, and the agent's next turns reason on an
    answer the caller never heard. A reply's text and audio must come from one version
    (carry the clip, or its audio key, with the decision)."""
    store = LocalStore(tmp_path / "store")
    embedder = shared_embedder()
    faq = small_faq_csv()
    assert OLD_HOURS in faq
    seed_plan(parse_seed_csv(faq.encode()), store, tone_render, "tone", source="faq.csv",
              target_wrong_rate=0.05, progress=False, embedder=embedder)
    cache = FaqCache(store, embedder)
    assert cache.refresh()
    decision = cache.route("What are your opening hours?")
    assert decision.hit and decision.answer == OLD_HOURS, decision

    # The operator's edit is published and this replica loads it before the reply starts.
    seed_plan(parse_seed_csv(faq.replace(OLD_HOURS, NEW_HOURS).encode()), store, tone_render,
              "tone", source="faq.csv", target_wrong_rate=0.05, progress=False,
              embedder=embedder)
    assert cache.refresh()

    responder = Responder(agent=None, tts=None, prompts=AudioBank(),  # type: ignore[arg-type]
                          cache_audio=cache.audio)
    conversation = Conversation()
    turn = Turn(number=1, text="What are your opening hours?", sample_rate=16000,
                timeline=TurnTimeline(1), conversation=conversation, decision=decision)
    segments = [s async for s in responder.respond(turn)]
    assert len(segments) == 1 and segments[0].source == "cache"
    heard = b"".join([chunk async for chunk in segments[0].audio])
    said = segments[0].text
    recorded = conversation.history[-1]["content"]

    def clip(text: str) -> bytes:
        pcm, rate = tone_render(text)
        return resample_pcm16(pcm, rate, 16000)

    heard_answer = {clip(OLD_HOURS): "the OLD answer", clip(NEW_HOURS): "the NEW answer"}.get(
        heard, "neither answer")
    assert heard == clip(said), (
        f"the reply event and the agent's context say {said!r} (recorded: {recorded!r}), "
        f"but the caller heard {heard_answer}")


def test_every_decision_names_the_version_that_made_it(tmp_path) -> None:
    """Review (stop 66): a call reuses a partial's decision at the final only while the
    version that made it serves (gateway.call.speculation); the cache stamps it on every
    decision, single and batched, and a new version's decisions name the new one."""
    store = LocalStore(tmp_path / "store")
    embedder = shared_embedder()
    faq = small_faq_csv()
    cache = FaqCache(store, embedder)
    assert cache.route("What are your opening hours?").version is None  # none published
    seed_plan(parse_seed_csv(faq.encode()), store, tone_render, "tone", source="faq.csv",
              target_wrong_rate=0.05, progress=False, embedder=embedder)
    assert cache.refresh() and cache.version is not None
    first = cache.version
    assert cache.route("What are your opening hours?").version == first
    assert [d.version for d in cache.route_many(["What are your opening hours?", ""])] \
        == [first, first]
    seed_plan(parse_seed_csv(faq.replace(OLD_HOURS, NEW_HOURS).encode()), store, tone_render,
              "tone", source="faq.csv", target_wrong_rate=0.05, progress=False,
              embedder=embedder)
    assert cache.refresh() and cache.version != first
    assert cache.route("What are your opening hours?").version == cache.version
    assert "version" not in cache.route("What are your opening hours?").as_json()
