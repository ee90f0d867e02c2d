"""Missed questions promoted to a FAQ entry: one request turns a group into an entry that
goes through validation, rendering, calibration and the atomic publish of a seed."""

from __future__ import annotations

import pytest

from gateway.admin.misses import group_misses
from gateway.stats import MissedQuestion
from tests.admin_support import admin, copy_store, seed_small, serving_version, start_admin_server
from tests.call_harness import CallHarness
from tests.test_admin_api import ask

pytestmark = pytest.mark.slow

INSURANCE = [("do you sell car insurance", "call-a", "No."),
             ("Do you sell car insurance?", "call-b", None),
             ("do you sell auto insurance", "call-c", "Sorry, I can't help with that."),
             ("do you sell car insurance please", "call-c",
              "We don't sell car insurance, but our partner Acme does.")]


@pytest.fixture(scope="module")
def promote_store(tmp_path_factory, runtime):
    root = tmp_path_factory.mktemp("promote-store") / "store"
    seed_small(root, runtime)
    return root


@pytest.fixture
def promote_server(settings, runtime, promote_store, tmp_path):
    # The runtime (and its stats) is the session's: misses other tests left are not ours.
    runtime.stats.missed.clear()
    server = start_admin_server(settings, runtime, copy_store(promote_store, tmp_path / "s"))
    yield server
    server.stop()


def miss(runtime, text: str, call_id: str, answer: str | None) -> None:
    """A finished turn the agent answered, as the call engine reports it."""
    runtime.stats.turn_finished({"turn": 1, "source": "llm", "intent": None, "action": "llm"},
                                text, route_score=0.2, answer=answer, call_id=call_id)


def group_with(client, text: str) -> dict:
    groups = client.get("/admin/misses", params={"limit": 100}).json()["groups"]
    found = [g for g in groups if text in g["questions"]]
    assert len(found) == 1, groups
    return found[0]


async def test_a_group_of_misses_becomes_an_entry_that_answers_at_once(promote_server,
                                                                       runtime):
    for text, call_id, answer in INSURANCE:
        miss(runtime, text, call_id, answer)
    with admin(promote_server) as client:
        group = group_with(client, "do you sell car insurance")
        assert group["calls"] == 3  # three calls would have been answered instantly
        assert group["draft_answer"] == INSURANCE[-1][2]  # the agent's most recent answer
        assert set(group["questions"]) == {text for text, _, _ in INSURANCE}
        before = serving_version(promote_server)
        promoted = client.post("/admin/misses/promote", json={
            "question": "do you sell auto insurance", "intent": "car_insurance"})
        assert promoted.status_code == 201, promoted.text
        body = promoted.json()
        assert body["version"] != before and serving_version(promote_server) == body["version"]
        assert body["entry"]["answer"] == INSURANCE[-1][2]
        assert set(body["entry"]["paraphrases"]) == set(group["questions"])
        assert body["promoted"] == {"questions": 4, "calls": 3, "answer": INSURANCE[-1][2],
                                    "skipped": []}
        assert body["report"]["rendered"] == 1  # only the new answer was rendered
        listed = client.get("/admin/misses", params={"limit": 100}).json()["groups"]
        assert not any("do you sell car insurance" in g["questions"] for g in listed)
    route = await ask(promote_server, "do you sell car insurance")
    assert route["hit"] is True and route["entry_id"] == "car_insurance"
    assert route["response_text"] == INSURANCE[-1][2] and route["source"] == "cache"


def test_an_operator_answer_replaces_the_draft(promote_server, runtime):
    miss(runtime, "can I open an account for my dog", "call-d", "I don't think so.")
    with admin(promote_server) as client:
        promoted = client.post("/admin/misses/promote", json={
            "question": "can I open an account for my dog", "intent": "pet_accounts",
            "answer": "Accounts are for people, but pets are welcome in our branches."})
        assert promoted.status_code == 201, promoted.text
        assert promoted.json()["entry"]["answer"].startswith("Accounts are for people")


def test_bad_promotions_are_refused_and_nothing_published_is_lost(promote_server, runtime):
    miss(runtime, "do you buy gold coins", "call-e", "We don't buy gold.")
    miss(runtime, "do you have a notary", "call-f", None)
    with admin(promote_server) as client:
        version = serving_version(promote_server)
        entries = client.get("/admin/entries").json()["entries"]
        cases = [
            ([1, 2], 400, "JSON object"),
            ({"question": "do you buy gold coins"}, 400, "'intent'"),
            ({"question": "", "intent": "gold"}, 400, "'question'"),
            ({"question": "do you buy gold coins", "intent": "gold", "colour": "red"}, 400,
             "unknown field"),
            ({"question": "do you buy gold coins", "intent": "gold", "answer": 5}, 400,
             "'answer'"),
            ({"question": "do you buy gold coins", "intent": "gold", "threshold": 2}, 400,
             "'threshold'"),
            ({"question": "what is the meaning of life", "intent": "gold"}, 404,
             "no group"),
            ({"question": "do you buy gold coins", "intent": "opening_hours"}, 409,
             "already exists"),
            ({"question": "do you have a notary", "intent": "notary"}, 400, "no draft"),
            # refused by the seed's validation (a formula-looking answer): nothing published
            ({"question": "do you buy gold coins", "intent": "gold",
              "answer": "=HYPERLINK(\"http://evil.example\")"}, 400, "unchanged"),
            # any printable intent name is legal (a safe id is derived); a control character is not
            ({"question": "do you buy gold coins", "intent": "bad\u0007id"}, 400, ""),
        ]
        for body, status, needle in cases:
            response = client.post("/admin/misses/promote", json=body)
            assert response.status_code == status, (body, response.text)
            assert needle in response.json()["error"], (body, response.text)
        assert client.post("/admin/misses/promote", content=b"{nope").status_code == 400
        assert serving_version(promote_server) == version
        assert client.get("/admin/entries").json()["entries"] == entries
        assert group_with(client, "do you buy gold coins")["draft_answer"] == "We don't buy gold."


async def test_the_engine_keeps_the_agents_answer_and_call_of_a_miss():
    h = CallHarness()
    h.llm.reply = "We open at nine. See you soon."
    await h.start()
    await h.text("when do you open on mondays")
    await h.wait(3000)
    await h.stop()
    (missed,) = h.stats.missed_questions()
    assert missed.text == "when do you open on mondays"
    assert missed.answer == "We open at nine. See you soon." and missed.call_id == "test-call"


async def test_a_reply_the_caller_cut_off_is_no_draft_answer():
    """Review (stop 60): a reply stopped part-way (here by the caller's barge-in) left the
    sentences that had started as the miss's draft, the most recent one: a promotion
    without an answer would publish the first sentences of an answer as all of it."""
    h = CallHarness()
    h.llm.reply = " ".join(f"Sentence {i} of a long answer." for i in range(30))
    await h.start()
    await h.text("tell me everything about my account")
    await h.wait(800)
    assert h.call.speaking
    await h.say("cancel my card please", then_silence_ms=1500)
    await h.stop()
    assert h.output.of("interrupt")
    asked = {m.text: m.answer for m in h.stats.missed_questions()}
    assert asked["tell me everything about my account"] is None, asked
    # The call's end cut the second reply short too (a reply played out keeps its draft:
    # test_the_engine_keeps_the_agents_answer_and_call_of_a_miss).
    assert asked["cancel my card please"] is None, asked


def test_groups_count_calls_and_take_the_latest_answer(runtime):
    missed = [MissedQuestion("is the branch open late", None, "llm", 10.0, 0.1, "Old.", "c1"),
              MissedQuestion("is the branch open late", None, "llm", 20.0, 0.1, "New.", "c2"),
              MissedQuestion("is the branch open late", None, "llm", 30.0, 0.1, None, "c2"),
              MissedQuestion("is the branch open late", None, "llm", 5.0, 0.1, "Oldest.", None)]
    (group,) = group_misses(missed, runtime.embedder)
    assert group["calls"] == 3 and group["draft_answer"] == "New."


def test_a_promotion_takes_every_wording_of_its_group_off_the_misses_list(promote_server,
                                                                          runtime):
    # The entry learns the group's 50 most frequent wordings; the misses list must lose all
    # of them, or the rest come back as a group the operator already promoted.
    wordings = [f"do you sell car insurance for car number {n}" for n in range(60)]
    for n, text in enumerate(wordings):
        miss(runtime, text, f"call-{n}", "We don't sell car insurance.")
    with admin(promote_server) as client:
        assert group_with(client, wordings[0])["distinct"] == len(wordings)
        promoted = client.post("/admin/misses/promote", json={
            "question": wordings[0], "intent": "car_insurance"})
        assert promoted.status_code == 201, promoted.text
        assert promoted.json()["promoted"]["questions"] == 50
        listed = client.get("/admin/misses", params={"limit": 100}).json()
        assert listed["groups"] == [] and listed["total"] == 0


@pytest.mark.parametrize("reply", ["We open at nine. FAIL the rest of it.",
                                   "We open at nine. We close at FAIL."])
async def test_a_reply_that_failed_half_way_is_no_draft_answer(reply):
    """Review (stop 60): a reply that broke off (here its voice failed on a later sentence,
    the caller hearing the first, then the apology) is half an answer: kept as the miss's
    draft, the most recent one, a promotion without an answer would publish it, and a
    wrong cached answer is worse than a miss."""
    h = CallHarness()
    h.llm.reply = reply
    await h.start()
    await h.text("when do you open on mondays")
    await h.wait(3000)
    await h.stop()
    assert h.stats.errors["tts_failed"] == 1, h.stats.errors
    assert [e["source"] for e in h.output.of("response")] == ["llm", "apology"]
    (missed,) = h.stats.missed_questions()
    assert missed.text == "when do you open on mondays" and missed.answer is None


def test_a_group_holding_a_wording_no_seed_takes_is_promoted_without_it(promote_server, runtime):
    """Review (stop 68): a group of misses is every wording callers used, typed ones too: a
    caller who typed "@bank do you exchange euros" (a formula to a spreadsheet), or a
    message past the 2,000 characters a seed question may have, put a wording in the group
    that the seed's validation refuses. Its promotion answered 400 every time (the rows do
    not validate), and neither the API nor the dashboard can leave a wording out: the
    group could never become an entry. The wordings a seed would refuse are left out and
    listed (``promoted.skipped``, with why); the rest become the entry."""
    for text, call_id in (("do you exchange euros", "call-g"),
                          ("can I exchange euros with you", "call-h"),
                          ("@bank do you exchange euros", "call-i")):
        miss(runtime, text, call_id, "Yes, at any branch.")
    with admin(promote_server) as client:
        group = group_with(client, "do you exchange euros")
        assert "@bank do you exchange euros" in group["questions"], group
        promoted = client.post("/admin/misses/promote", json={
            "question": "do you exchange euros", "intent": "euro_exchange"})
        assert promoted.status_code == 201, promoted.text
        body = promoted.json()
        assert "@bank do you exchange euros" not in body["entry"]["paraphrases"]
        assert "do you exchange euros" in body["entry"]["paraphrases"]
        [skipped] = body["promoted"]["skipped"]
        assert skipped["question"] == "@bank do you exchange euros"
        assert "formula" in skipped["reason"], skipped
        listed = client.get("/admin/misses", params={"limit": 100}).json()["groups"]
        assert not any("exchange euros" in q for g in listed for q in g["questions"]), listed
