"""The admin API against a real gateway on 127.0.0.1: auth, stats, entries, CSV upload, misses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.admin.publish import Publisher
from gateway.client import Caller
from gateway.clock import ManualClock
from gateway.server import BackgroundServer
from intents.types import entry_id_for
from tests.admin_support import (AUTH, SMALL_INTENTS, GatedVoice, admin, copy_store,
                                 seed_small, serving_version, small_faq_csv,
                                 start_admin_server, warm_app)

pytestmark = pytest.mark.slow

GET_ROUTES = ["/admin/stats", "/admin/entries", "/admin/entries/opening_hours", "/admin/misses",
              "/admin/seed"]


@pytest.fixture(scope="module")
def admin_store(tmp_path_factory, runtime):
    root = tmp_path_factory.mktemp("admin-store") / "store"
    seed_small(root, runtime)
    return root


@pytest.fixture(scope="module")
def admin_server(settings, runtime, admin_store):
    """Serves the seed as published: tests here never change its store."""
    server = start_admin_server(settings, runtime, admin_store)
    yield server
    server.stop()


@pytest.fixture
def own_server(settings, runtime, admin_store, tmp_path):
    """A gateway over a private copy of the seeded store, for tests that publish."""
    server = start_admin_server(settings, runtime, copy_store(admin_store, tmp_path / "store"))
    yield server
    server.stop()


async def ask(server: BackgroundServer, text: str) -> dict:
    """One text turn; returns its route event plus the response text and source."""
    async with Caller(server.call_url) as caller:
        turn = await caller.say_text(text)
    route = dict(turn.first("route") or {})
    response = turn.first("response") or {}
    route["response_text"], route["source"] = response.get("text"), response.get("source")
    return route


# ---------------------------------------------------------------------- auth


@pytest.mark.parametrize("path", GET_ROUTES)
def test_every_route_needs_the_token(admin_server, path):
    url = admin_server.base_url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + AUTH[
            "Authorization"].split()[1]}, {"Authorization": "Bearer"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert "Authorization: Bearer" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, headers=AUTH).status_code == 200


@pytest.mark.parametrize("method, path", [("POST", "/admin/entries"),
                                          ("DELETE", "/admin/entries/opening_hours"),
                                          ("POST", "/admin/seed"), ("DELETE", "/admin/seed")])
def test_writes_need_the_token(admin_server, method, path):
    version = serving_version(admin_server)
    response = httpx.request(method, admin_server.base_url + path,
                             headers={"Authorization": "Bearer nope"}, content=b"x")
    assert response.status_code == 401
    assert serving_version(admin_server) == version


def test_a_refused_token_is_counted(admin_server):
    """Every 401 is counted (``admin_unauthorized``) in /admin/stats and Prometheus, as
    every other refusal is: an operator sees someone guessing, or a stale dashboard token."""
    def refused() -> int:
        errors = httpx.get(admin_server.base_url + "/admin/stats", headers=AUTH).json()["errors"]
        return errors.get("admin_unauthorized", 0)

    before = refused()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.get(admin_server.base_url + "/admin/stats",
                         headers=headers).status_code == 401
    assert refused() == before + 2
    metrics = httpx.get(admin_server.base_url + "/metrics").text
    assert f'voicegate_errors_total{{code="admin_unauthorized"}} {before + 2}.0' in metrics


@pytest.mark.parametrize("path", GET_ROUTES + ["/admin/", "/admin"])
def test_admin_api_is_off_without_a_configured_token(server, path):
    # the session server is configured without VOICEGATE_ADMIN_TOKEN; "/admin" answered a
    # redirect to the page (307) before, showing an admin endpoint the docs say is off
    response = httpx.get(server.base_url + path, headers=AUTH)  # redirects are not followed
    assert response.status_code == 404
    assert response.json() == {"error": "admin API is disabled: set VOICEGATE_ADMIN_TOKEN"}


def test_admin_redirects_to_the_dashboard_when_the_admin_api_is_on(admin_server):
    response = httpx.get(admin_server.base_url + "/admin")
    assert (response.status_code, response.headers["location"]) == (307, "/admin/")


# ---------------------------------------------------------------------- stats


async def settled_stats(client: httpx.Client) -> dict:
    """/admin/stats once no call is active. The runtime's counters are the test session's: a
    call of an earlier module (or one just hung up) may still be ending, and its turn would be
    counted between two reads."""
    stats = client.get("/admin/stats").json()
    for _ in range(600):  # 30 s: a bound on a hang (a loaded machine ends a call slowly)
        if stats["active_calls"] == 0:
            return stats
        await asyncio.sleep(0.05)
        stats = client.get("/admin/stats").json()
    raise AssertionError(f"calls still active after 30 s: {stats['active_calls']}")


async def test_stats_count_a_hit_and_a_miss(admin_server):
    with admin(admin_server) as client:
        before = await settled_stats(client)
        hit = await ask(admin_server, "what time do your branches open")
        miss = await ask(admin_server, "do you sell car insurance")
        after = await settled_stats(client)
        entry = client.get("/admin/entries/opening_hours").json()["entry"]
    assert entry["hits"] == after["entry_hits"]["opening_hours"]
    assert hit["hit"] is True and hit["entry_id"] == "opening_hours"
    assert miss["hit"] is False
    assert after["cache_version"] == serving_version(admin_server)
    assert after["turns"] - before["turns"] == 2
    assert after["hits"] - before["hits"] == 1 and after["misses"] - before["misses"] == 1
    assert after["calls"] - before["calls"] == 2 and after["active_calls"] == 0
    assert after["hit_rate"] == after["hits"] / (after["hits"] + after["misses"])
    assert after["turns_5m"] >= 2 and 0.0 < after["hit_rate_5m"] < 1.0
    assert after["entry_hits"].get("opening_hours", 0) == \
        before["entry_hits"].get("opening_hours", 0) + 1
    assert after["intents"]["opening_hours"] >= 1
    points = after["series"]["points"]
    assert len(points) == 60 and after["series"]["minute_s"] == 60
    assert all(b["t"] - a["t"] == 60 for a, b in zip(points, points[1:]))
    # the two turns landed in the last minute or two of the series
    turned = sum(p["hits"] + p["misses"] for p in after["series"]["points"][-2:])
    assert turned >= 2
    for outcome in ("hit", "miss"):
        stages = after["latency_ms"][outcome]
        figures = stages["first_audio"]
        assert figures["n"] >= 1 and 0 <= figures["p50"] <= figures["p99"]
        # typed turns: in no stage measured from speech end (they have none)
        for stage in ("end_of_turn", "route_decided", "first_token", "reply_latency"):
            assert stages.get(stage, {}).get("n") == \
                before["latency_ms"].get(outcome, {}).get(stage, {}).get("n")


# ---------------------------------------------------------------------- entries (read)


def test_entries_list_and_get(admin_server):
    with admin(admin_server) as client:
        listing = client.get("/admin/entries").json()
        assert listing["version"] == serving_version(admin_server)
        by_id = {e["id"]: e for e in listing["entries"]}
        assert set(by_id) == set(SMALL_INTENTS)
        hours = by_id["opening_hours"]
        assert hours["action"] == "answer" and hours["answer"].startswith("Our branches are open")
        assert "What are your opening hours?" in hours["paraphrases"]
        assert isinstance(hours["hits"], int) and hours["audio_s"] > 0
        assert by_id["account_balance"]["action"] == "llm"
        assert by_id["account_balance"]["answer"] is None
        assert by_id["speak_to_person"]["action"] == "handoff"

        one = client.get("/admin/entries/routing_number").json()
        assert one["entry"] == by_id["routing_number"] | {"hits": one["entry"]["hits"]}
        missing = client.get("/admin/entries/no_such_entry")
        assert missing.status_code == 404 and "no_such_entry" in missing.json()["error"]


# ---------------------------------------------------------------------- entries (write)


async def test_add_change_and_delete_an_entry_serve_at_once(own_server):
    server = own_server
    first = serving_version(server)
    new_answer = "Call us right away on the number on the back of your card and we will block it."
    with admin(server) as client:
        created = client.post("/admin/entries", json={
            "intent": "lost_card", "answer": new_answer,
            "questions": ["I lost my debit card", "My card was stolen",
                          "I can't find my bank card", "Someone took my credit card",
                          "How do I report a lost card?"]})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["created"] is True and body["version"] != first
        # only the new answer was rendered; the others reused their audio
        assert body["report"]["rendered"] == 1
        assert body["report"]["reused"] == body["report"]["answer_entries"] - 1
        assert body["entry"]["answer"] == new_answer and len(body["entry"]["paraphrases"]) == 5
        # served at once: the poll interval is ten minutes
        assert serving_version(server) == body["version"]
        assert client.get("/admin/entries/lost_card").json()["entry"]["answer"] == new_answer
        route = await ask(server, "I lost my debit card")
        assert route["intent"] == "lost_card" and route["hit"] is True
        assert route["response_text"] == new_answer and route["source"] == "cache"
        assert client.get("/admin/stats").json()["entry_hits"]["lost_card"] == 1
        assert (await ask(server, "When are you open?"))["entry_id"] == "opening_hours"
        assert client.get("/admin/stats").json()["entry_hits"]["opening_hours"] >= 1

        # change an existing entry's answer, keeping its paraphrases
        changed = client.post("/admin/entries", json={
            "id": "opening_hours", "answer": "We are open every day from eight to eight."})
        assert changed.status_code == 200, changed.text
        # its hits were the old answer's: the changed entry starts again at 0
        assert client.get("/admin/entries/opening_hours").json()["entry"]["hits"] == 0
        assert client.get("/admin/stats").json()["entry_hits"]["lost_card"] == 1  # unchanged
        assert changed.json()["created"] is False and changed.json()["report"]["rendered"] == 1
        entry = client.get("/admin/entries/opening_hours").json()["entry"]
        assert entry["answer"] == "We are open every day from eight to eight."
        assert "When are you open?" in entry["paraphrases"]
        route = await ask(server, "what are your opening hours")
        assert route["response_text"] == "We are open every day from eight to eight."

        deleted = client.delete("/admin/entries/lost_card")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["deleted"] == "lost_card"
        assert deleted.json()["report"]["rendered"] == 0
        assert serving_version(server) == deleted.json()["version"]
        assert client.get("/admin/entries/lost_card").status_code == 404
        route = await ask(server, "I lost my debit card")
        assert route["intent"] != "lost_card" and route["entry_id"] != "lost_card"
        # the stats report hits of the entries the serving version holds, not of dropped ones
        stats = client.get("/admin/stats").json()
        assert stats["cache_version"] == deleted.json()["version"]
        assert "lost_card" not in stats["entry_hits"], stats["entry_hits"]
        assert stats["entry_hits"]["opening_hours"] == 1  # since its change; the id serves

        assert client.delete("/admin/entries/lost_card").status_code == 404


def test_bad_entries_are_refused_with_the_validation_errors(own_server):
    server = own_server
    version = serving_version(server)
    with admin(server) as client:
        no_answer = client.post("/admin/entries", json={
            "intent": "lost_card", "action": "answer",
            "questions": ["I lost my card", "Lost card"]})
        assert no_answer.status_code == 400
        errors = no_answer.json()["errors"]
        # One error for the entry, on its first row (the rows share the entry's answer).
        assert [e["reason"] for e in errors] == [
            "action 'answer' needs an answer: no row of intent 'lost_card' has one"]
        assert [e["question"] for e in errors] == ["I lost my card"]
        assert all(e["changed"] and e["entry"] == "lost_card" for e in errors)

        bad = client.post("/admin/entries", json={
            "intent": "bad\u0007intent", "answer": "x", "questions": ["one", ""]})
        assert bad.status_code == 400
        reasons = [e["reason"] for e in bad.json()["errors"]]
        assert any(r.startswith("bad intent 'bad\\x07intent'") and "control" in r
                   for r in reasons)
        assert "empty question" in reasons

        clash = client.post("/admin/entries", json={
            "intent": "lost_card", "answer": "Call us.",
            "questions": ["What is your routing number?", "I lost my card"]})
        assert clash.status_code == 400
        assert any("duplicate question" in e["reason"] for e in clash.json()["errors"])

        for body, needle in [({"answer": "x", "questions": ["a"]}, "intent"),
                             ({"intent": "new_one", "answer": "x"}, "questions"),
                             ({"intent": "x", "questions": "not a list"}, "list of strings"),
                             ({"intent": "x", "colour": "red"}, "unknown field"),
                             ([1, 2], "JSON object")]:
            response = client.post("/admin/entries", json=body)
            assert response.status_code == 400 and needle in response.json()["error"], body
        not_json = client.post("/admin/entries", content=b"{nope",
                               headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
    assert serving_version(server) == version


def test_a_blank_answer_is_refused_not_taken_for_no_answer(own_server):
    """Review (stop 62): an entry's "answer" of spaces (or "") was collapsed to no answer
    by the rows: a new entry was published as an agent (llm) entry, 201, though an answer
    was given, and an edit of a cached answer got "no row of intent ... has one". A blank
    string is now refused as such (null is how an entry has no answer); nothing published."""
    server = own_server
    version = serving_version(server)
    with admin(server) as client:
        for body in ({"intent": "lost_card", "answer": "   ",
                      "questions": ["I lost my card", "My card was stolen"]},
                     {"intent": "lost_card", "answer": "",
                      "questions": ["I lost my card", "My card was stolen"]},
                     {"id": "opening_hours", "answer": " \n\t "}):
            response = client.post("/admin/entries", json=body)
            assert response.status_code == 400, (body, response.text)
            assert "'answer' is blank" in response.json()["error"], response.text
        ids = {e["id"] for e in client.get("/admin/entries").json()["entries"]}
        assert "lost_card" not in ids
        # null is still an entry without an answer
        agent = client.post("/admin/entries", json={
            "intent": "lost_card", "answer": None, "action": "handoff",
            "questions": ["I lost my card", "My card was stolen"]})
        assert agent.status_code == 201, agent.text
        assert agent.json()["entry"]["action"] == "handoff"
    assert serving_version(server) != version


def test_an_edit_that_would_leave_an_entry_without_questions_is_refused(own_server):
    """Given questions replace an entry's, and an entry has at least one. An edit with
    "questions": [] published the new answer with the old questions kept, silently, and
    answered 200 as if the list had been applied."""
    server = own_server
    version = serving_version(server)
    with admin(server) as client:
        before = client.get("/admin/entries/opening_hours").json()["entry"]
        for questions, needle in (([], "an entry keeps at least one question"),
                                  (None, "list of strings")):
            response = client.post("/admin/entries", json={
                "id": "opening_hours", "answer": "We open at eight.", "questions": questions})
            assert response.status_code == 400, response.text
            assert needle in response.json()["error"], response.text
        after = client.get("/admin/entries/opening_hours").json()["entry"]
        assert (after["answer"], after["paraphrases"]) == (before["answer"],
                                                           before["paraphrases"])
    assert serving_version(server) == version


def test_one_seed_at_a_time(own_server):
    server = own_server
    services = server.app.state.services
    publisher = Publisher(services)
    server.app.state.admin_publisher = publisher
    # Hold the lock as a running seed would (an uncontended asyncio.Lock binds no loop).
    asyncio.run(publisher.lock.acquire())
    try:
        with admin(server) as client:
            for response in (
                    client.post("/admin/seed", content=small_faq_csv().encode(),
                                headers={"Content-Type": "text/csv"}),
                    client.post("/admin/entries", json={"intent": "opening_hours",
                                                        "answer": "Always open."}),
                    client.delete("/admin/entries/swift_code")):
                assert response.status_code == 409
                assert "another seed is running" in response.json()["error"]
    finally:
        publisher.lock.release()


def test_a_seed_under_way_is_cancelled_and_publishes_nothing(settings, runtime, admin_store,
                                                            tmp_path, admin_server):
    """A seed rendering for hours could not be stopped: the lock stayed held until it ended.
    DELETE /admin/seed now stops it before its next answer; the upload's request answers 409
    "cancelled", nothing is published and the next seed may run."""
    voice = GatedVoice()
    # The prompts the real voice rendered stay (admin_server's start rendered them into the
    # shared runtime): the gated one renders only the seed.
    server = start_admin_server(settings, dataclasses.replace(runtime, tts=voice),
                                copy_store(admin_store, tmp_path / "store"))
    csv_upload = {"content": small_faq_csv().encode(), "headers": {"Content-Type": "text/csv"},
                  "params": {"target_wrong_rate": "0.05"}}

    def upload() -> httpx.Response:
        with admin(server) as uploader:
            return uploader.post("/admin/seed", **csv_upload)

    try:
        version = serving_version(server)
        with admin(server) as client, ThreadPoolExecutor(max_workers=1) as pool:
            idle = client.delete("/admin/seed")
            assert idle.status_code == 409 and idle.json()["error"] == \
                "no seed is running: nothing to cancel", idle.text
            seeding = pool.submit(upload)
            assert voice.rendering.wait(timeout=120), seeding.result()
            cancelling = client.delete("/admin/seed")
            assert cancelling.status_code == 202, cancelling.text
            assert cancelling.json()["cancelling"] is True
            voice.release.set()  # the answer under way finishes; the next one never starts
            cancelled = seeding.result(timeout=120)
            assert cancelled.status_code == 409, cancelled.text
            body = cancelled.json()
            assert body["error"] == ("seed cancelled after rendering 1 of 4 new answers; "
                                     "nothing published; the previous version keeps serving")
            assert body["cancelled"] is True and body["version"] == version
            assert len(voice.texts) == 1 and serving_version(server) == version
            # The lock is released: the next seed runs, reusing the answer rendered.
            again = client.post("/admin/seed", **csv_upload)
            assert again.status_code == 200, again.text
            assert (again.json()["report"]["rendered"], again.json()["report"]["reused"]) == \
                (3, 1)
            assert serving_version(server) == again.json()["version"] != version
    finally:
        voice.release.set()
        server.stop()


def test_the_seed_under_way_and_the_last_one_are_shown(settings, runtime, admin_store,
                                                       tmp_path, admin_server):
    """An operator with a long upload running could not see whether it still ran or how far
    it got. GET /admin/seed shows the seed under way (its phase, answers rendered of those to
    render, cancelling once DELETE /admin/seed asked), then how the last one ended."""
    voice = GatedVoice(free=1)  # the first answer renders, the second is held
    # admin_server's start rendered the prompts with the real voice (GatedVoice: why)
    server = start_admin_server(settings, dataclasses.replace(runtime, tts=voice),
                                copy_store(admin_store, tmp_path / "store"))
    csv_upload = {"content": small_faq_csv().encode(), "headers": {"Content-Type": "text/csv"},
                  "params": {"target_wrong_rate": "0.05", "name": "faq.csv"}}

    def upload() -> httpx.Response:
        with admin(server) as uploader:
            return uploader.post("/admin/seed", **csv_upload)

    try:
        with admin(server) as client, ThreadPoolExecutor(max_workers=1) as pool:
            idle = client.get("/admin/seed")
            assert idle.status_code == 200, idle.text
            assert idle.json() == {"running": False, "last": None}
            seeding = pool.submit(upload)
            assert voice.rendering.wait(timeout=120), seeding.result()
            running = client.get("/admin/seed").json()
            started_at, elapsed = running.pop("started_at"), running.pop("elapsed_s")
            assert running == {"running": True, "kind": "upload", "source": "faq.csv",
                               "phase": "rendering", "rendered": 1, "to_render": 4,
                               "reused": 0, "cancelling": False}
            assert started_at > 1.7e9 and elapsed >= 0
            assert client.delete("/admin/seed").status_code == 202
            cancelling = client.get("/admin/seed").json()
            assert (cancelling["running"], cancelling["cancelling"]) == (True, True)
            voice.release.set()  # the answer under way finishes; the next one never starts
            assert seeding.result(timeout=120).status_code == 409
            ended = client.get("/admin/seed").json()
            assert ended["running"] is False, ended
            last = ended["last"]
            assert last["ended_at"] >= last["started_at"] == started_at, last
            assert {k: last[k] for k in ("kind", "source", "outcome", "version", "error",
                                         "phase", "rendered", "to_render", "reused")} == {
                "kind": "upload", "source": "faq.csv", "outcome": "cancelled", "version": None,
                "error": "seed cancelled after rendering 2 of 4 new answers; nothing published",
                "phase": "rendering", "rendered": 2, "to_render": 4, "reused": 0}

            published = client.post("/admin/entries", json={
                "intent": "opening_hours", "answer": "We open at nine, every weekday."})
            assert published.status_code == 200, published.text
            last = client.get("/admin/seed").json()["last"]
            assert {k: last[k] for k in ("kind", "source", "outcome", "version", "error",
                                         "phase")} == {
                "kind": "entry", "source": "admin: entry opening_hours",
                "outcome": "published", "version": published.json()["version"],
                "error": None, "phase": "publishing"}
    finally:
        voice.release.set()
        server.stop()


# ---------------------------------------------------------------------- CSV upload


def test_seed_upload_raw_and_multipart(own_server):
    server = own_server
    first = serving_version(server)
    csv_text = small_faq_csv() + \
        'Do you offer mortgages?,"Yes: fixed and adjustable mortgages, apply in the app.",' \
        'mortgage_info,\nCan I get a home loan?,,mortgage_info,\n' \
        'What mortgage options do you have?,,mortgage_info,\n' \
        'How do I apply for a mortgage?,,mortgage_info,\nDo you do home loans?,,mortgage_info,\n'
    with admin(server) as client:
        raw = client.post("/admin/seed", content=csv_text.encode("utf-8"),
                          headers={"Content-Type": "text/csv"})
        assert raw.status_code == 200, raw.text
        report = raw.json()["report"]
        assert raw.json()["version"] == report["version"] != first
        assert report["entries"] == len(SMALL_INTENTS) + 1
        assert report["rendered"] == 1 and report["reused"] == report["answer_entries"] - 1
        assert 0.0 <= report["expected_hit_rate"] <= 1.0
        assert set(report["thresholds"]) >= {"hit_confidence", "min_similarity", "bounded"}
        assert "precision: " in report["summary"]
        assert serving_version(server) == report["version"]
        ids = {e["id"] for e in client.get("/admin/entries").json()["entries"]}
        assert "mortgage_info" in ids
        # curl --data-binary without -H labels the file a form; whole, it is a CSV.
        curl_default = client.post("/admin/seed", content=csv_text.encode("utf-8"),
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert curl_default.status_code == 200, curl_default.text

        form = client.post("/admin/seed", files={"file": ("faq.csv", small_faq_csv().encode(),
                                                          "text/csv")})
        assert form.status_code == 200, form.text
        assert form.json()["report"]["rendered"] == 0  # every answer's audio is in the store
        assert serving_version(server) == form.json()["version"]
        ids = {e["id"] for e in client.get("/admin/entries").json()["entries"]}
        assert ids == set(SMALL_INTENTS)

        empty_form = client.post("/admin/seed", files={"other": ("x.csv", b"a,b\n")})
        assert empty_form.status_code == 400 and "'file'" in empty_form.json()["error"]
        # curl -F 'file=<faq.csv' sends the CSV as a text field: said as such, not "no field".
        as_text = client.post("/admin/seed", data={"file": small_faq_csv()},
                              files={"other": ("x.txt", b"")})
        assert as_text.status_code == 400, as_text.text
        assert "came as text, not as a file" in as_text.json()["error"]
        no_boundary = client.post("/admin/seed", content=b"question,answer\n",
                                  headers={"Content-Type": "multipart/form-data"})
        assert no_boundary.status_code == 400
        assert "malformed multipart upload" in no_boundary.json()["error"]
        assert serving_version(server) == form.json()["version"]  # still serving


def test_a_seed_over_the_new_answer_limit_is_a_400_before_anything_renders(
        settings, runtime, admin_store, tmp_path):
    """A 5 MB CSV of tens of thousands of distinct answers rendered for hours, holding the
    seed lock. Over VOICEGATE_SEED_MAX_NEW_ANSWERS it is refused before its first answer
    renders; answers whose audio the store has are reused and do not count."""
    store = copy_store(admin_store, tmp_path / "store")
    server = start_admin_server(settings.replace(seed_max_new_answers=2), runtime, store)

    def with_new_answers(count: int) -> bytes:
        return (small_faq_csv() + "".join(
            f'Question {n} about the new thing?,"New answer number {n}.",new_{n},\n'
            f"Another way to ask question {n}?,,new_{n},\n" for n in range(count))).encode()

    try:
        version = serving_version(server)
        audio = sorted(p.name for p in (store / "audio").iterdir())
        with admin(server) as client:
            refused = client.post("/admin/seed", content=with_new_answers(3),
                                  headers={"Content-Type": "text/csv"})
            assert refused.status_code == 400, refused.text
            body = refused.json()
            assert body["error"] == (
                "this seed would render 3 new answers (4 more are already in the store), over "
                "the limit of 2 new answers a seed may render (VOICEGATE_SEED_MAX_NEW_ANSWERS): "
                "nothing was rendered or published; raise VOICEGATE_SEED_MAX_NEW_ANSWERS if so "
                "many new answers are meant; the previous version keeps serving"), body
            assert (body["new_answers"], body["reused"], body["limit"], body["setting"]) == \
                (3, 4, 2, "VOICEGATE_SEED_MAX_NEW_ANSWERS")
            assert body["version"] == version == serving_version(server)
            assert sorted(p.name for p in (store / "audio").iterdir()) == audio
            accepted = client.post("/admin/seed", content=with_new_answers(2),
                                   headers={"Content-Type": "text/csv"},
                                   params={"target_wrong_rate": "0.05"})
            assert accepted.status_code == 200, accepted.text
            assert (accepted.json()["report"]["rendered"],
                    accepted.json()["report"]["reused"]) == (2, 4)
    finally:
        server.stop()


def test_an_uploaded_intent_keeps_its_name_and_id_through_an_edit_of_another(own_server):
    # Every admin edit re-validates the serving version's rows, spaces collapsed: a CSV's name
    # with a run of spaces is read the same way on upload, so the edit renames nothing.
    server = own_server
    csv_text = small_faq_csv() + "I lost my bank card,Call us to block it.,Card  lost,\n" \
                                 "my bank card was stolen,,Card  lost,\n"
    card_id = entry_id_for("Card lost")
    with admin(server) as client:
        uploaded = client.post("/admin/seed", content=csv_text.encode("utf-8"),
                               headers={"Content-Type": "text/csv"})
        assert uploaded.status_code == 200, uploaded.text
        entry = client.get(f"/admin/entries/{card_id}")
        assert entry.status_code == 200 and entry.json()["entry"]["intent"] == "Card lost"
        edited = client.post("/admin/entries", json={"intent": "opening_hours",
                                                     "answer": "We open at eight on weekdays."})
        assert edited.status_code == 200, edited.text
        ids = {e["id"] for e in client.get("/admin/entries").json()["entries"]}
        assert card_id in ids and ids == set(SMALL_INTENTS) | {card_id}
        assert client.get(f"/admin/entries/{card_id}").status_code == 200


async def test_bad_csv_upload_lists_every_row_and_keeps_serving(own_server):
    server = own_server
    version = serving_version(server)
    bad = ("question,answer,intent,action\n"
           "What are your opening hours?,We open at nine.,opening_hours,\n"
           ",An answer without a question,orphan,\n"
           "Can I get a refund?,Yes.,refunds,refund\n"
           "What is your routing number?,It is 021.,bad\x01intent,\n"
           "When are you open?,,opening_hours,\n")
    with admin(server) as client:
        response = client.post("/admin/seed", content=bad.encode(),
                               headers={"Content-Type": "text/csv"})
        assert response.status_code == 400
        body = response.json()
        assert [e["line"] for e in body["errors"]] == [3, 4, 5]
        reasons = {e["line"]: e["reason"] for e in body["errors"]}
        assert reasons[3] == "empty question"
        assert "unknown action 'refund'" in reasons[4]
        assert reasons[5].startswith("bad intent 'bad\\x01intent'")
        assert "3 bad row(s)" in body["error"] and body["version"] == version

        binary = client.post("/admin/seed", files={"file": ("x.csv", b"\x00\x01\x02", "text/csv")})
        assert binary.status_code == 400 and binary.json()["errors"][0]["line"] == 1
        assert client.post("/admin/seed", content=b"",
                           headers={"Content-Type": "text/csv"}).status_code == 400
    assert serving_version(server) == version
    route = await ask(server, "what time do your branches open")
    assert route["hit"] is True and route["entry_id"] == "opening_hours"


async def test_a_bad_target_wrong_rate_is_refused_before_the_body_is_read(tmp_path):
    """POST /admin/seed?target_wrong_rate=2 was answered only once the whole body had
    arrived (up to 5 MB, or 408 after body_timeout_s for a stalled one): the parameter,
    known from the request line, is now refused at once. Here the body never ends."""
    app = warm_app(tmp_path / "store", ManualClock())

    async def post(query: str) -> tuple[list[dict], bool]:
        sent: list[dict] = []
        started = False

        async def receive() -> dict:
            nonlocal started
            if not started:
                started = True
                return {"type": "http.request", "body": b"question,answer\n",
                        "more_body": True}
            await asyncio.Event().wait()  # the rest of the body never comes
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/admin/seed",
                 "raw_path": b"/admin/seed", "root_path": "", "query_string": query.encode(),
                 "headers": [(b"host", b"gateway"), (b"content-type", b"text/csv"),
                             (b"authorization", AUTH["Authorization"].encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
        handling = asyncio.create_task(app(scope, receive, send))
        for _ in range(200):
            if handling.done():
                break
            await asyncio.sleep(0)
        done = handling.done()
        handling.cancel()
        return sent, done

    for value in ("2", "0", "1", "-0.5", "x", "", "nan"):
        sent, done = await post(f"target_wrong_rate={value}&name=faq.csv")
        assert done and sent, f"target_wrong_rate={value!r}: no answer while the body is " \
                              f"still coming: {sent}"
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert sent[0]["status"] == 400, (value, body)
        assert body["error"].startswith("target_wrong_rate must be a number between 0 and 1"), body
        assert f"not {value!r}" in body["error"], body
    # a good value waits for the body, as before
    sent, done = await post("target_wrong_rate=0.05")
    assert not done and sent == []


async def test_an_upload_option_the_seed_would_not_read_is_refused_not_ignored(tmp_path):
    """Review (stop 62): POST /admin/seed read target_wrong_rate and name and ignored any
    other query parameter or multipart field: `?target-wrong-rate=0.2` (the CLI's
    spelling), a typo, or `curl -F file=@faq.csv -F target_wrong_rate=0.2` seeded at the
    current version's target (or 1 %), answering 200, and of `target_wrong_rate` given twice
    the last was taken. Each is now a 400 naming it (the query's at once, before the body
    is read), counted; nothing is published."""
    app = warm_app(tmp_path / "store", ManualClock())
    csv_type = {"content-type": "text/csv"}
    bad_row = b"question,answer\nWhen are you open?,=1+1\nWhere are you?,Main St\n"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=AUTH) as client:
        for query, named in (("target-wrong-rate=0.2", "'target-wrong-rate'"),
                             ("target_wrong_rate=0.05&targetWrongRate=0.2",
                              "'targetWrongRate'"),
                             ("target_wrong_rate=0.05&target_wrong_rate=0.2",
                              "'target_wrong_rate' given more than once")):
            response = await client.post(f"/admin/seed?{query}", content=bad_row,
                                         headers=csv_type)
            assert response.status_code == 400, (query, response.text)
            error = response.json()["error"]
            assert named in error and "nothing published" in error, (query, error)
            assert "errors" not in response.json(), (query, response.json())  # rows unread
        form = await client.post("/admin/seed", files={"file": ("faq.csv", bad_row)},
                                 data={"target_wrong_rate": "0.2"})
        assert form.status_code == 400, form.text
        error = form.json()["error"]
        assert "'target_wrong_rate'" in error and "query parameters" in error, error
        # what is read is still read
        named = await client.post("/admin/seed?name=mine.csv&target_wrong_rate=0.05",
                                  content=bad_row, headers=csv_type)
        assert named.status_code == 400 and named.json()["error"].startswith("mine.csv: 1 bad")
        assert [e["line"] for e in named.json()["errors"]] == [2]
        stats = (await client.get("/admin/stats")).json()
    assert stats["errors"] == {"admin_bad_request": 5}, stats["errors"]
    assert not (tmp_path / "store" / "CURRENT").exists()


# ---------------------------------------------------------------------- misses


@pytest.mark.parametrize("flag", ["on", "", "2", "tru"])
def test_a_misses_all_flag_it_cannot_read_is_refused_not_taken_for_false(tmp_path, flag):
    """`?all=on` (a form's checkbox), a bare `?all` or a typo listed the misses without the
    agent intents, as if all=0, and said nothing: the operator took the list for all of
    them. A value that is none of 1/true/yes, 0/false/no is a 400 that names them."""
    from starlette.testclient import TestClient

    app = warm_app(tmp_path / "store", ManualClock())
    app.state.services._runtime.embedder = None  # no misses: nothing is embedded
    client = TestClient(app)  # no lifespan: warm_app's services hold no models to load
    response = client.get("/admin/misses", params={"all": flag}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert "'all' must be 1, true or yes" in response.json()["error"]
    for given, included in (("1", True), ("TRUE", True), ("no", False), ("0", False)):
        listed = client.get("/admin/misses", params={"all": given}, headers=AUTH)
        assert listed.status_code == 200, listed.text
        assert listed.json()["agent_intents_included"] is included


async def test_misses_are_grouped_by_meaning(admin_server):
    boston = ["do you have a branch in Boston", "Do you have a branch in Boston?",
              "is there a Boston branch", "is there a Boston branch",
              "where is your branch in boston"]
    mortgage = ["can I get a mortgage", "can I get a mortgage with you"]
    agent = "how much money is in my checking account"
    # Asked by callers at once: each turn waits for its reply to play out in real time.
    texts = boston + mortgage + [agent]
    routes = dict(zip(texts, await asyncio.gather(*(ask(admin_server, t) for t in texts))))
    for route in routes.values():
        assert route["hit"] is False, route
    # an llm intent, confidently: not a missing FAQ
    assert routes[agent]["intent"] == "account_balance" and routes[agent]["score"] > 0.7

    with admin(admin_server) as client:
        everything = client.get("/admin/misses", params={"all": "1", "limit": 100}).json()
        default = client.get("/admin/misses", params={"limit": 100}).json()
        assert client.get("/admin/misses", params={"limit": "x"}).status_code == 400

    def group_of(groups, text):
        found = [g for g in groups if any(e["text"] == text for e in g["examples"])]
        assert len(found) <= 1
        return found[0] if found else None

    for listing in (everything, default):
        groups = listing["groups"]
        counts = [g["count"] for g in groups]
        assert counts == sorted(counts, reverse=True)
        city = group_of(groups, "is there a Boston branch")
        assert city is not None and city["count"] >= len(boston)
        assert all(group_of(groups, text) is city for text in boston)
        # the same words asked twice: one example counted twice, and the group's representative
        assert {"text": "is there a Boston branch", "count": 2} in city["examples"]
        assert city["question"] == "is there a Boston branch"
        guessed = {routes[text]["intent"] for text in boston}
        assert {i["intent"] for i in city["intents"]} == guessed
        assert sum(i["count"] for i in city["intents"]) == city["count"]
        loans = group_of(groups, "can I get a mortgage")
        assert loans is not None and loans is not city
    assert group_of(everything["groups"], agent) is not None
    assert group_of(default["groups"], agent) is None
    assert everything["total"] > default["total"]


def test_bodies_are_limited_while_they_stream_in(admin_server):
    from gateway.admin.routes import MAX_ENTRY_BODY_BYTES, MAX_UPLOAD_BYTES

    sent = 0

    def chunks(total: int):  # no Content-Length: a chunked body
        nonlocal sent
        piece = b"q" * 65536
        while sent < total:
            sent += len(piece)
            yield piece

    with admin(admin_server) as client:
        big = client.post("/admin/seed", content=chunks(50 * MAX_UPLOAD_BYTES),
                          headers={"Content-Type": "text/csv"})
        assert big.status_code == 413 and "larger than" in big.json()["error"]
        sent = 0
        entry = client.post("/admin/entries", content=chunks(4 * MAX_ENTRY_BODY_BYTES),
                            headers={"Content-Type": "application/json"})
        assert entry.status_code == 413


@pytest.mark.parametrize("body", [b"[" * 30000, b'{"question": 1' + b"0" * 5000 + b"}"])
def test_pathological_json_entries_are_a_400(admin_server, body):
    with admin(admin_server) as client:
        response = client.post("/admin/entries", content=body,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]


async def test_read_body_stops_reading_once_the_limit_passes():
    from starlette.requests import Request

    from gateway.http_body import BodyTooLarge, read_body

    pulled = 0

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(BodyTooLarge):
        await read_body(request, 10_000, 60.0)
    assert pulled == 11  # the chunk that passed the limit was the last one read


# ---------------------------------------------------------------------- unmatched routes


async def test_an_admin_route_or_method_that_does_not_exist_answers_json(tmp_path):
    """Review (stop 62): a path or method the admin API has no route for got Starlette's
    plain text, `404 Not Found` or `405 Method Not Allowed`, though every admin route is
    documented to answer JSON: `POST /admin/entries/opening_hours` (an entry is changed with
    POST /admin/entries), an entry addressed by an intent name holding a slash (`/` or
    `%2F`, decoded before routing, so no route matches), a typo. A 405's `Allow` named the
    first route of the path only (`PUT /admin/seed`: "GET, HEAD", not POST or DELETE). Each
    is now JSON in the admin API's error shape, saying which methods the path takes or which
    routes there are (and how to address such an entry: by its id), counted as every
    refusal is; the token is checked first, as on every admin route. Other paths keep
    Starlette's answers (and an admin path's trailing slash its redirect)."""
    app = warm_app(tmp_path / "store", ManualClock())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=AUTH) as client:
        post_entry = await client.post("/admin/entries/opening_hours", json={"answer": "x"})
        put_seed = await client.put("/admin/seed", content=b"question,answer\n")
        post_admin = await client.post("/admin")
        slash = await client.delete("/admin/entries/card/lost")
        encoded = await client.get("/admin/entries/card%2Flost")
        typo = await client.get("/admin/stat")
        stats = (await client.get("/admin/stats")).json()
        no_token = await client.get("/admin/stat", headers={"Authorization": "Bearer no"})
        # not admin routes: Starlette's own answers, as before
        other = await client.get("/nope")
        healthz = await client.post("/healthz")
        trailing = await client.get("/admin/stats/")
    for response in (post_entry, put_seed, post_admin, slash, encoded, typo, no_token):
        assert response.headers["content-type"] == "application/json", (
            response.request.method, response.request.url.path, response.status_code,
            response.text[:100])
    assert post_entry.status_code == 405, post_entry.text
    body = post_entry.json()
    assert body["allowed"] == ["GET", "HEAD", "DELETE"], body
    assert post_entry.headers["allow"] == "GET, HEAD, DELETE"
    assert "POST is not allowed" in body["error"] and "POST /admin/entries" in body["error"]
    assert put_seed.status_code == 405 and put_seed.json()["allowed"] == [
        "GET", "HEAD", "POST", "DELETE"], put_seed.text
    assert post_admin.status_code == 405 and post_admin.json()["allowed"] == ["GET", "HEAD"]
    card_id = entry_id_for("card/lost")
    for response in (slash, encoded):
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert "%2F" in error and repr(card_id) in error, error
    assert typo.status_code == 404
    assert "no admin route GET /admin/stat" in typo.json()["error"]
    assert "GET /admin/stats" in typo.json()["error"]  # the routes there are
    assert stats["errors"] == {"admin_bad_request": 6}, stats["errors"]
    assert no_token.status_code == 401
    assert (other.status_code, other.headers["content-type"], other.text) == (
        404, "text/plain; charset=utf-8", "Not Found")
    assert (healthz.status_code, healthz.text) == (405, "Method Not Allowed")
    assert (trailing.status_code, trailing.headers["location"]) == (
        307, "http://gateway/admin/stats")


def test_an_unmatched_admin_path_is_off_with_the_admin_api(tmp_path):
    """With no token configured every /admin path answers the documented 404, unmatched ones
    too (they answered Starlette's plain "Not Found")."""
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import Settings

    client = TestClient(create_app(Settings(store_dir=str(tmp_path / "store"), port=0)))
    for method, path in (("GET", "/admin/nope"), ("POST", "/admin/entries/x"),
                         ("DELETE", "/admin/entries/a/b")):
        response = client.request(method, path, headers=AUTH)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"error": "admin API is disabled: set VOICEGATE_ADMIN_TOKEN"}


# ---------------------------------------------------------------------- misses parameters


@pytest.mark.parametrize("query, named", [
    ("treshold=0.6", "unknown query parameter(s) 'treshold'"),
    ("limit=10&Limit=5", "unknown query parameter(s) 'Limit'"),
    ("limit=5&limit=6", "'limit' given more than once"),
    ("threshold=0.6&threshold=0.9", "'threshold' given more than once"),
    ("all=1&all=0", "'all' given more than once"),
    ("limit=1_0", "limit must be"),
    ("limit=+5", "limit must be"),
    ("limit= 5", "limit must be"),
    ("limit=\u0665", "limit must be"),  # an Arabic-Indic 5: int() reads it
    ("limit=0", "limit must be"),
    ("limit=" + "9" * 5000, "limit must be"),
    ("limit=2001", "limit must be a whole number of groups from 1 to 2000"),
    ("threshold=1e-320", "threshold must be"),
    ("threshold=1_0", "threshold must be"),
    ("threshold=0.6_0", "threshold must be"),
    ("threshold=inf", "threshold must be"),
    ("threshold=nan", "threshold must be"),
    ("threshold=%200.6", "threshold must be"),
    ("threshold=0", "threshold must be"),
    ("threshold=1.5", "threshold must be"),
])
def test_misses_parameters_are_read_as_given_or_refused(tmp_path, query, named):
    """Review (stop 62): GET /admin/misses ignored a parameter it does not read
    (`?treshold=0.6` listed the groups at 0.75), took the last of one given twice, and read
    `limit=1_0` as 10 (int() takes underscores, signs, spaces and any script's digits),
    `threshold=1e-320` or `1_0` as numbers: the list answered 200 for something the
    operator did not ask for. As POST /admin/seed's options (the same check): an unknown or
    repeated parameter is a 400 naming it, `limit` plain digits (1 or more) and `threshold`
    a plain decimal in (0, 1]; counted."""
    from starlette.testclient import TestClient

    app = warm_app(tmp_path / "store", ManualClock())
    app.state.services._runtime.embedder = None  # no misses: nothing is embedded
    client = TestClient(app)
    response = client.get(f"/admin/misses?{query}", headers=AUTH)
    assert response.status_code == 400, (query, response.status_code, response.text[:300])
    assert named in response.json()["error"], (query, response.json())
    errors = client.get("/admin/stats", headers=AUTH).json()["errors"]
    assert errors == {"admin_bad_request": 1}, errors


def test_misses_parameters_given_plainly_are_read(tmp_path):
    from starlette.testclient import TestClient

    app = warm_app(tmp_path / "store", ManualClock())
    app.state.services._runtime.embedder = None
    client = TestClient(app)
    for query, threshold in (("", 0.75), ("limit=5&threshold=0.6&all=1", 0.6),
                             ("threshold=1", 1.0), ("threshold=.5", 0.5),
                             ("threshold=0.80&limit=0020", 0.8),
                             ("limit=2000&threshold=1.", 1.0), ("limit=" + "0" * 50 + "7", 0.75)):
        response = client.get(f"/admin/misses?{query}", headers=AUTH)
        assert response.status_code == 200, (query, response.text)
        assert response.json()["threshold"] == threshold


# ---------------------------------------------------------------------- review stop 63


def test_a_target_wrong_rate_float_reads_but_no_plain_decimal_is_refused_by_the_api(tmp_path):
    """Review (stop 63): POST /admin/seed?target_wrong_rate=5e-2 (or ` 0.05 `, `0.0_5`,
    Arabic-Indic digits) was read by float() and seeded; it is refused with a 400 showing the
    value, as the CLI's --target-wrong-rate refuses it (one parser for both)."""
    app = warm_app(tmp_path / "store", ManualClock())
    client = TestClient(app, headers=AUTH)  # no lifespan: warm_app holds no models
    for value in ("5e-2", " 0.05 ", "0.0_5", "+.05", "\u0660.\u0660\u0665"):
        response = client.post("/admin/seed", params={"target_wrong_rate": value},
                               content=b"question,answer\n",
                               headers={"Content-Type": "text/csv"})
        assert response.status_code == 400, (value, response.text)
        error = response.json()["error"]
        assert error.startswith("target_wrong_rate must be a number between 0 and 1"), error
        assert f"not {value!r}" in error, error
    assert not (tmp_path / "store" / "CURRENT").exists()


# Each admin API route that reads no query parameter, with one an operator might believe
# took effect: (method, path, query, JSON body or None).
UNREAD_QUERIES = [
    ("GET", "/admin/stats", "reset=1", None),
    ("GET", "/admin/entries", "limit=5", None),
    ("POST", "/admin/entries", "target_wrong_rate=0.05", {"intent": "x"}),
    ("GET", "/admin/entries/opening_hours", "version=3", None),
    ("DELETE", "/admin/entries/x", "force=1", None),
    ("GET", "/admin/seed", "wait=1", None),
    ("DELETE", "/admin/seed", "force=1", None),
    ("POST", "/admin/misses/promote", "threshold=0.6", {"question": "q", "intent": "x"}),
]


@pytest.mark.parametrize("method, path, query, body", UNREAD_QUERIES,
                         ids=[f"{m} {p}?{q}" for m, p, q, _ in UNREAD_QUERIES])
def test_an_admin_route_refuses_a_query_parameter_it_does_not_read(tmp_path, method, path,
                                                                   query, body):
    """Review (stop 63): only POST /admin/seed and GET /admin/misses refused query
    parameters they do not read; every other admin route ignored its query string:
    `DELETE /admin/entries/x?force=1`, `GET /admin/entries?limit=5` or `POST
    /admin/entries?target_wrong_rate=0.05` answered as without it, and an operator believing
    the option took effect had no sign it did not. Each route now refuses a parameter it does
    not read with a 400 naming it and saying the route takes none, before any work (the token
    still checked first), counted as every refusal is."""
    app = warm_app(tmp_path / "store", ManualClock())
    app.state.services.runtime.embedder = None  # no misses to group: none is embedded
    name = query.split("=")[0]
    client = TestClient(app)  # no lifespan: warm_app holds no models
    unauthorized = client.request(method, f"{path}?{query}")
    assert unauthorized.status_code == 401, unauthorized.text  # the token first
    response = client.request(method, f"{path}?{query}", headers=AUTH,
                              content=None if body is None else json.dumps(body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"unknown query parameter(s) {name!r}" in error, error
    route = path.replace("opening_hours", "{entry_id}").replace("/x", "/{entry_id}")
    assert f"{method} {route} takes no query parameters" in error, error
    stats = client.get("/admin/stats", headers=AUTH).json()
    assert stats["errors"] == {"admin_unauthorized": 1, "admin_bad_request": 1}, stats["errors"]
    assert not (tmp_path / "store" / "CURRENT").exists()


def test_the_dashboards_own_requests_are_not_refused(tmp_path):
    """Review (stop 63): what the dashboard page sends (gateway/admin/static/dashboard.html:
    GET /admin/stats, GET /admin/misses?limit=10, GET /admin/seed, DELETE /admin/seed, no
    cache-busting parameter: it asks with cache: "no-store") is still answered, and the page
    itself, opened in a browser with any query string, is served."""
    app = warm_app(tmp_path / "store", ManualClock())
    app.state.services.runtime.embedder = None  # no misses to group: none is embedded
    client = TestClient(app, headers=AUTH)  # no lifespan: warm_app holds no models
    for method, path in (("GET", "/admin/stats"), ("GET", "/admin/misses?limit=10"),
                         ("GET", "/admin/seed")):
        response = client.request(method, path)
        assert response.status_code == 200, (path, response.text)
    assert client.delete("/admin/seed").status_code == 409  # none running, as before
    assert client.get("/admin/?utm_source=mail").status_code == 200
    stats = client.get("/admin/stats").json()
    assert stats["errors"] == {}, stats["errors"]


def test_a_cancel_while_the_seed_writes_its_version_is_refused_not_accepted(tmp_path):
    """Review (stop 70): DELETE /admin/seed while the seed under way was writing its version
    to the store (GET /admin/seed: phase "publishing") answered 202 {"cancelling": true}
    ("stops ... and publishes nothing"), and the dashboard said "cancelling ... publishes
    nothing"; the write cannot be stopped, and the seed then published, its own request
    answering 200. The operator is told at once that it cannot be cancelled: 409, the cancel
    not asked for."""
    import threading

    from cache_seed import SeedProgress
    from gateway.admin.seed_status import UPLOAD

    app = warm_app(tmp_path / "store", ManualClock())
    publisher = Publisher(app.state.services)
    app.state.admin_publisher = publisher
    cancel = threading.Event()
    publisher._cancel = cancel  # as Publisher._seed sets them for the seed it runs
    progress = publisher.status.start(UPLOAD, "faq.csv", cancel)
    progress(SeedProgress("publishing", 3, 3, 1))  # cache_seed: right before Store.publish
    client = TestClient(app, headers=AUTH)  # no lifespan: warm_app holds no models
    response = client.delete("/admin/seed")
    assert response.status_code == 409, response.text
    assert "cannot be cancelled" in response.json()["error"], response.text
    assert not cancel.is_set()
    status = client.get("/admin/seed").json()
    assert (status["phase"], status["cancelling"]) == ("publishing", False), status


def test_an_edit_published_but_not_loaded_here_is_not_answered_with_the_old_entry(
        tmp_path, monkeypatch):
    """Review (stop 70): an entry edit published version B, then the store did not answer
    while this replica loaded B (a Redis timeout: it answers 200, the next poll loads B). The
    answer paired "version": B with "entry" read from A, the version still serving here: the
    old answer, as if B held it. An entry is given only from the version published; else
    null (GET /admin/entries/{id} shows it once this replica serves B)."""
    from types import SimpleNamespace

    import gateway.admin.routes as routes
    from intents.loader import CachedEntry
    from intents.types import Action

    app = warm_app(tmp_path / "store", ManualClock())
    services = app.state.services
    old = CachedEntry(id="opening_hours", intent="opening_hours", action=Action.ANSWER,
                      answer="We open at eight.", paraphrases=("When are you open?",),
                      pcm=b"\0\0" * 1600, sample_rate=16000)
    services.cache = SimpleNamespace(version="A", loaded=SimpleNamespace(
        version="A", entries={"opening_hours": old}))

    class Published:  # the edit's publish: B, which this replica did not load
        async def upsert_entry(self, body, create_only=False, kind="entry"):
            return SimpleNamespace(version="B"), "opening_hours", False

    app.state.admin_publisher = Published()
    monkeypatch.setattr(routes, "report_json", lambda report: {"version": report.version})
    client = TestClient(app, headers=AUTH)  # no lifespan: warm_app holds no models
    response = client.post("/admin/entries", json={"intent": "opening_hours",
                                                   "answer": "We open at nine."})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "B"
    assert body["entry"] is None, body


@pytest.mark.parametrize("upload", ["multipart", "raw"])
def test_an_uploads_name_parameter_is_the_source_it_is_published_under(tmp_path, monkeypatch,
                                                                        upload):
    """Review (stop 69): POST /admin/seed?name=faq-2026-11.csv with the CSV as the multipart
    field `file` recorded the version under the file's own name (faq.csv) and answered as
    usual: the `name` the operator gave was taken and not read, where every other parameter
    no route reads is refused (400) for that reason. A given `name` is the source, multipart
    or raw; without it, the file's name (multipart) or upload.csv (raw)."""
    from gateway.admin.publish import SeedBusy

    sources: list[str] = []

    async def seed_csv(self, data, source, target_wrong_rate=None):
        sources.append(source)
        raise SeedBusy("another seed is running; try again when it has finished")

    monkeypatch.setattr(Publisher, "seed_csv", seed_csv)
    app = warm_app(tmp_path / "store", ManualClock())
    client = TestClient(app, headers=AUTH)  # no lifespan: warm_app holds no models
    csv_text = "question,answer\nWhen are you open?,Nine to five.\nWhere are you?,On Main St.\n"

    def post(query: str):
        if upload == "multipart":
            return client.post(f"/admin/seed{query}",
                               files={"file": ("faq.csv", csv_text, "text/csv")})
        return client.post(f"/admin/seed{query}", content=csv_text,
                           headers={"Content-Type": "text/csv"})

    for query in ("?name=faq-2026-11.csv", ""):
        response = post(query)
        assert response.status_code == 409, response.text  # the fake's SeedBusy
    unnamed = "faq.csv" if upload == "multipart" else "upload.csv"
    assert sources == ["faq-2026-11.csv", unnamed]
