"""The FAQ cache end to end: seed the example CSV with the real voice, ask over the WebSocket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from gateway.client import Caller
from gateway.seeding import seed_with_voice
from gateway.server import BackgroundServer
from intents.store import LocalStore

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
    for _ in range(100):
        if httpx.get(faq_server.base_url + "/readyz").json()["cache_version"] == report.version:
            break
        await asyncio.sleep(0.1)
    assert report.version != before
    async with Caller(faq_server.call_url) as caller:
        turn = await caller.say_text("what are your opening hours")
    assert turn.first("response")["text"] == new_answer
