"""Small pieces behind the admin API: stats bookkeeping, rows -> seed plan, miss grouping, and
the routes the operator docs name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from cache_seed import SeedValidationError, parse_seed_rows, rows_from_manifest
from gateway.admin.misses import QUESTIONS_PER_GROUP, group_misses, is_agent_intent
from gateway.app import create_app
from gateway.settings import Settings
from gateway.stats import FROM_SPEECH_END, LATENCY_STAGES, MissedQuestion, Stats, answer_mark
from gateway.timeline import TurnTimeline
from intents.embedder import normalize_text
from intents.types import entry_id_for

ROOT = Path(__file__).resolve().parents[1]


def turn(source: str, **extra):
    return {"source": source, "end_of_turn_ms": 1.0, "first_audio_ms": 2.0, **extra}


def test_stats_keep_entry_hits_a_minute_series_and_the_missed_questions():
    stats = Stats()
    stats.turn_finished(turn("cache", intent="hours", entry_id="hours"), "when are you open")
    stats.turn_finished(turn("cache", intent="hours", entry_id="hours"), "opening hours?")
    stats.turn_finished(turn("llm", intent=None, action="llm"), "  do you sell   insurance ",
                        route_score=0.2)
    stats.turn_finished(turn("llm"), None)
    snap = stats.snapshot()
    assert snap["entry_hits"] == {"hours": 2}
    assert (snap["hits"], snap["misses"]) == (2, 2)
    points = snap["series"]["points"]
    assert len(points) == 60 and points[-1]["hits"] == 2 and points[-1]["misses"] == 2
    assert sum(p["hits"] + p["misses"] for p in points[:-1]) == 0
    missed = stats.missed_questions()
    assert [m.text for m in missed] == ["do you sell insurance"]  # hits and empty texts not kept
    assert missed[0].score == 0.2 and missed[0].action == "llm"
    assert set(snap["latency_ms"]["hit"]) >= {"end_of_turn", "first_audio"}


def test_a_typed_turn_is_not_in_the_silence_a_caller_hears():
    """Review (stop 64): a typed turn (native `text`) marks speech end, end of turn and its
    final transcript at the moment it arrives: `end_of_turn_ms` 0, `reply_latency_ms` its
    `first_audio_ms`. Stats counted them in the same end-of-turn and reply-latency
    percentiles and `voicegate_stage_seconds` histograms as spoken turns ("the silence the
    caller hears"), so a deployment mixing a chat channel with phone calls saw both look
    better than its callers heard. A typed turn is still a hit or a miss, and in
    `first_audio` (its own figure, from the end of turn), but not in those two."""
    stats = Stats()
    stats.turn_finished({"source": "cache", "input": "audio", "end_of_turn_ms": 300.0,
                         "route_decided_ms": 301.0, "first_audio_ms": 5.0,
                         "reply_latency_ms": 305.0}, "when are you open")
    for _ in range(3):
        stats.turn_finished({"source": "cache", "input": "text", "end_of_turn_ms": 0.0,
                             "route_decided_ms": 1.0, "first_audio_ms": 4.0,
                             "reply_latency_ms": 4.0}, "opening hours?")
    snap = stats.snapshot()
    assert (snap["hits"], snap["misses"], snap["turns"]) == (4, 0, 4)
    hit = snap["latency_ms"]["hit"]
    assert hit["end_of_turn"] == {"p50": 300.0, "p99": 300.0, "n": 1}
    assert hit["reply_latency"] == {"p50": 305.0, "p99": 305.0, "n": 1}
    assert hit["first_audio"]["n"] == 4 and hit["route_decided"]["n"] == 1  # stop 65
    registry = stats.prometheus.registry

    def observed(stage: str) -> float | None:
        return registry.get_sample_value("voicegate_stage_seconds_count",
                                         {"stage": stage, "outcome": "hit"})

    assert (observed("end_of_turn"), observed("reply_latency")) == (1.0, 1.0)
    assert (observed("first_audio"), observed("route_decided")) == (4.0, 1.0)


def test_a_typed_turn_is_in_no_stage_measured_from_speech_end():
    """Review (stop 65): stop 64 took typed turns (native `text`) out of `end_of_turn` and
    `reply_latency`, but left them in `route_decided` and `first_token`, which are measured
    from speech end too (`TurnTimeline.metrics`): a spoken turn's include the end-of-turn
    wait, a typed turn's (speech end stamped as it arrives) do not, so the /admin/stats
    percentiles and `voicegate_stage_seconds` histograms of those stages mixed two clocks
    and a chat channel pulled a phone line's figures down. Every stage measured from speech
    end is spoken turns' only; `first_audio` (from the end of turn, the same for both) keeps
    every question, and the per-turn `turn_metrics` are unchanged."""
    # The stages left out are exactly those the timeline measures from speech end.
    tl = TurnTimeline(1)
    for offset, stage in enumerate(("speech_end", "end_of_turn", "route_decided",
                                    "first_token", "first_audio")):
        tl.mark(stage, 10.0 + offset)
    moved = TurnTimeline(1, marks=dict(tl.marks, speech_end=9.0))
    from_speech_end = {stage for stage in LATENCY_STAGES
                       if tl.metrics()[stage] != moved.metrics()[stage]}
    assert from_speech_end == set(FROM_SPEECH_END) == {
        "end_of_turn_ms", "route_decided_ms", "first_token_ms", "reply_latency_ms"}

    stats = Stats()
    stats.turn_finished({"source": "llm", "input": "audio", "end_of_turn_ms": 900.0,
                         "route_decided_ms": 905.0, "first_token_ms": 1400.0,
                         "first_audio_ms": 600.0, "reply_latency_ms": 1500.0}, "do you lend")
    for _ in range(3):
        stats.turn_finished({"source": "llm", "input": "text", "end_of_turn_ms": 0.0,
                             "route_decided_ms": 5.0, "first_token_ms": 500.0,
                             "first_audio_ms": 600.0, "reply_latency_ms": 600.0}, "loans?")
    snap = stats.snapshot()
    assert (snap["hits"], snap["misses"], snap["turns"]) == (0, 4, 4)
    miss = snap["latency_ms"]["miss"]
    assert miss["route_decided"] == {"p50": 905.0, "p99": 905.0, "n": 1}
    assert miss["first_token"] == {"p50": 1400.0, "p99": 1400.0, "n": 1}
    assert miss["end_of_turn"]["n"] == 1 and miss["reply_latency"]["n"] == 1
    assert miss["first_audio"]["n"] == 4
    registry = stats.prometheus.registry

    def observed(stage: str) -> float | None:
        return registry.get_sample_value("voicegate_stage_seconds_count",
                                         {"stage": stage, "outcome": "miss"})

    assert [observed(stage) for stage in ("end_of_turn", "route_decided", "first_token",
                                          "reply_latency", "first_audio")] == \
        [1.0, 1.0, 1.0, 1.0, 4.0]


def test_a_hit_count_belongs_to_the_entry_as_published():
    # Counts are per entry id; a publish that drops an id, or changes what a hit on it plays
    # (answer or action), starts it again at 0, and an id published again after its delete
    # does not get its old count back. A change of questions alone keeps the count.
    stats = Stats()
    hours, card = answer_mark("answer", "Nine to five."), answer_mark("answer", "Call us.")
    stats.entries_published({"hours": hours, "card": card}, "v1")
    for entry_id in ("hours", "hours", "card", "card", "card"):
        stats.turn_finished(turn("cache", intent=entry_id, entry_id=entry_id), None)
    observer = RecordingObserver()
    stats.attach(observer)  # linked after the first version loaded: told of it
    assert observer.events == [("entries", {"hours": hours, "card": card})]
    assert observer.versions == ["v1"]  # with the version they are of
    stats.entries_published({"hours": hours, "card": card})  # same answers (new questions)
    assert stats.snapshot()["entry_hits"] == {"hours": 2, "card": 3}
    stats.entries_published({"hours": answer_mark("answer", "Eight to eight."), "card": card})
    assert stats.snapshot()["entry_hits"] == {"card": 3}
    stats.entries_published({"hours": answer_mark("answer", "Eight to eight.")})  # card deleted
    assert stats.snapshot()["entry_hits"] == {}
    stats.entries_published({"hours": answer_mark("answer", "Eight to eight."), "card": card})
    stats.turn_finished(turn("cache", intent="card", entry_id="card"), None)
    stats.turn_finished(turn("cache", intent="hours", entry_id="hours"), None)
    assert stats.snapshot()["entry_hits"] == {"card": 1, "hours": 1}
    stats.entries_published({"hours": answer_mark("llm", "Eight to eight."), "card": card})
    assert stats.snapshot()["entry_hits"] == {"card": 1}  # the action changed: no hit now
    published = [marks for kind, marks in observer.events if kind == "entries"]
    assert len(published) == 6 and published[-1]["card"] == card  # each told to the observer
    assert observer.versions == ["v1"] + [None] * 5  # none given since


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.versions: list[str | None] = []  # of each entries_published

    def call_started(self) -> None:
        self.events.append(("call", None))

    def turn_finished(self, metrics) -> None:
        self.events.append(("turn", metrics.get("source")))

    def error(self, code: str) -> None:
        self.events.append(("error", code))

    def entries_published(self, marks, version=None, intents=None) -> None:
        self.events.append(("entries", dict(marks)))
        self.versions.append(version)


def test_an_observer_attached_late_is_told_what_was_counted_before_it():
    # A replica's shared counters are linked once its models have loaded; the refusals it
    # counted meanwhile must reach the cluster's figures too.
    stats = Stats()
    stats.error("not_ready")
    stats.error("not_ready")
    stats.error("admin_unauthorized")
    observer = RecordingObserver()
    stats.attach(observer)
    assert sorted(observer.events) == [("error", "admin_unauthorized"), ("error", "not_ready"),
                                       ("error", "not_ready")]
    stats.call_started()
    stats.error("stt_failed")
    stats.turn_finished(turn("cache", intent="hours", entry_id="hours"), "when are you open")
    assert observer.events[3:] == [("call", None), ("error", "stt_failed"), ("turn", "cache")]


def test_the_series_has_every_minute_and_forgets_the_old_ones():
    stats = Stats()
    stats._count_minute(1000, True)
    stats._count_minute(1000, False)
    stats._count_minute(1003, True)
    points = stats.series(minutes=5, now=1004 * 60 + 30)
    assert [(p["t"] // 60, p["hits"], p["misses"]) for p in points] == [
        (1000, 1, 1), (1001, 0, 0), (1002, 0, 0), (1003, 1, 0), (1004, 0, 0)]
    for minute in range(2000, 2100):
        stats._count_minute(minute, True)
    assert len(stats.minutes) == 60


def test_rows_validate_like_a_csv_with_line_numbers_by_row():
    rows = [{"question": "When are you open?", "answer": "Nine to five.", "intent": "hours"},
            {"question": "Opening hours", "answer": None, "intent": "hours"},
            {"question": "", "answer": "x", "intent": "other"},
            {"question": "Refund?", "answer": "Yes", "intent": "refund", "action": "refund"}]
    with pytest.raises(SeedValidationError) as caught:
        parse_seed_rows(rows)
    assert [(e.line, e.reason.split(" (")[0]) for e in caught.value.errors] == [
        (4, "empty question"), (5, "unknown action 'refund'")]
    plan = parse_seed_rows(rows[:2] + [{"question": "What is my balance?", "intent": "balance",
                                        "action": "llm"}])
    assert set(plan.entries) == {"hours", "balance"}
    manifest = {"entries": [{"id": e.id, "intent": e.intent, "action": e.action.value,
                             "answer": e.answer, "questions": list(e.questions)}
                            for e in plan.entries.values()]}
    again = parse_seed_rows(rows_from_manifest(manifest))
    assert again.entries == plan.entries and again.questions == plan.questions


@pytest.mark.parametrize("separator", ["\t", "\n", "\xa0", "\u3000"],
                         ids=["tab", "line-feed", "no-break-space", "ideographic-space"])
def test_an_intent_name_the_seed_csv_refuses_for_its_whitespace_is_refused_by_the_admin_api(
        separator):
    """Review (stop 60): gateway/admin/publish.py _entry_fields collapsed every run of
    whitespace in a name, so POST /admin/entries published "Card<TAB>lost" as "Card lost",
    where the seed CSV refuses it (cache_seed/validate.py _read_row: "a tab is refused, not
    collapsed", a cell boundary pasted into the name). One name, two verdicts by the way
    it came in. The admin API is to refuse it too, with the CSV's reason."""
    from cache_seed import parse_seed_csv
    from gateway.admin.publish import BadEntry, _entry_fields

    name = f"Card{separator}lost"
    with pytest.raises(SeedValidationError) as csv_refusal:
        parse_seed_csv(("question,answer,intent,action\n"
                        f'I lost my bank card,Call us to block it.,"{name}",\n'
                        "When are you open?,Nine to five.,opening_hours,\n").encode())
    [reason] = [e.reason for e in csv_refusal.value.errors]
    for field in ("intent", "id"):
        with pytest.raises(BadEntry) as admin_refusal:
            fields = _entry_fields({field: name, "answer": "Call us to block it.",
                                    "questions": ["I lost my bank card"]})
            pytest.fail(f"the CSV refuses {name!r} ({reason}); the admin API took {fields}")
        assert str(admin_refusal.value) == reason


def test_an_entry_posted_with_its_id_and_intent_as_the_listing_gives_them_is_one_entry():
    """Review (stop 69): GET /admin/entries lists an entry's `id` beside its `intent`; for a
    name not safe in a URL ("Card lost") the id is a slug and a hash of it. A client posting
    the entry back with both, as listed, was refused with 400 "'id' and 'intent' name the
    same entry; give one, or the same value": they did name the same entry. Both as listed
    are that one entry (its name); an id of another entry beside a name is still refused,
    naming both."""
    from gateway.admin.publish import BadEntry, _entry_fields

    listed_id = entry_id_for("Card lost")
    assert listed_id != "Card lost"
    body = {"id": listed_id, "intent": "Card lost", "answer": "Call us to block it.",
            "questions": ["I lost my bank card"]}
    name, answer, _, questions = _entry_fields(body)
    assert (name, answer, questions) == ("Card lost", "Call us to block it.",
                                         ["I lost my bank card"])
    assert _entry_fields({"id": "opening_hours", "intent": "opening_hours"})[0] == \
        "opening_hours"
    with pytest.raises(BadEntry) as refused:
        _entry_fields({"id": "opening_hours", "intent": "Card lost", "answer": "x"})
    assert "'opening_hours'" in str(refused.value) and "'Card lost'" in str(refused.value)
    assert listed_id in str(refused.value)  # what the id of that intent is


def test_a_csv_intents_name_survives_the_rows_an_admin_edit_rebuilds():
    # An admin edit of any entry re-validates every row of the serving version: an intent name
    # published from a CSV must come back the same (same entry id, same URL).
    from cache_seed import parse_seed_csv

    plan = parse_seed_csv(("question,answer,intent,action\n"
                           "I lost my bank card,Call us to block it.,  Card  lost ,\n"
                           "my bank card was stolen,,Card   lost,\n"
                           "When are you open?,Nine to five.,opening_hours,\n").encode())
    assert set(plan.entries) == {"Card lost", "opening_hours"}
    manifest = {"entries": [{"id": e.id, "intent": e.intent, "action": e.action.value,
                             "answer": e.answer, "questions": list(e.questions)}
                            for e in plan.entries.values()]}
    rows = [r for r in rows_from_manifest(manifest) if r["intent"] != "opening_hours"]
    edited = parse_seed_rows(rows + [{"question": "When are you open?", "intent": "opening_hours",
                                      "answer": "We open at eight on weekdays."}])
    assert edited.entries["Card lost"] == plan.entries["Card lost"]
    assert edited.entries["Card lost"].id == entry_id_for("Card lost")


class WordEmbedder:
    """Bag-of-words vectors: texts sharing words are similar."""

    vocabulary = ["boston", "branch", "mortgage", "loan", "car", "insurance"]

    def encode_many(self, texts, **_):
        out = np.zeros((len(texts), len(self.vocabulary)), dtype=np.float32)
        for i, text in enumerate(texts):
            for j, word in enumerate(self.vocabulary):
                out[i, j] = word in text.lower()
            out[i] /= max(np.linalg.norm(out[i]), 1e-9)
        return out


def missed(text, intent=None, action="llm", score=0.1, at=0.0):
    return MissedQuestion(text=text, intent=intent, action=action, at=at, score=score)


def test_misses_group_by_meaning_most_frequent_first():
    questions = [missed("Boston branch?", "hours", "answer"), missed("a branch in Boston"),
                 missed("boston branch?"), missed("mortgage loan"), missed("Mortgage loan"),
                 missed("mortgage loan"), missed("car insurance")]
    groups = group_misses(questions, WordEmbedder(), threshold=0.75)
    assert [g["count"] for g in groups] == [3, 3, 1]
    loans, city = sorted(groups[:2], key=lambda g: g["question"])[::-1]
    assert loans["question"] == "mortgage loan" and loans["examples"] == [
        {"text": "mortgage loan", "count": 3}]
    assert city["distinct"] == 2 and city["intents"] == [{"intent": None, "count": 2},
                                                         {"intent": "hours", "count": 1}]
    assert groups[2]["question"] == "car insurance"
    assert group_misses([], WordEmbedder()) == []
    assert len(group_misses(questions, WordEmbedder(), limit=1)) == 1


def test_the_dashboards_refresh_embeds_no_missed_question_again(runtime, monkeypatch):
    """Review (stop 69): GET /admin/misses, which the dashboard asks every 3 s, embedded
    every distinct missed question again past the router's cache (up to 2,000: ~5 s of
    forward passes a refresh on this machine, a core taken from the calls), and scored each
    against every group one by one in Python (~2 s more, holding the GIL). A question
    routed (or grouped) before is read from the cache now, and the groups are the same."""
    embedder = runtime.embedder
    encoded: list[str] = []
    original = embedder._encode

    def counting(texts, **kwargs):
        encoded.extend(texts)
        return original(texts, **kwargs)

    monkeypatch.setattr(embedder, "_encode", counting)
    questions = [missed(f"can I open a {kind} account {when}") for kind in
                 ("savings", "joint", "student", "business") for when in ("today", "online")]
    questions += [missed("what is the weather in paris"), missed("weather in paris today")]
    first = group_misses(questions, embedder, threshold=0.75)
    encoded.clear()
    again = group_misses(questions, embedder, threshold=0.75)
    assert encoded == [] and again == first
    assert sum(g["count"] for g in first) == len(questions) and 1 < len(first) < len(questions)


def test_a_group_holds_every_wordings_key_for_a_promotion_to_forget():
    # A promoted entry learns the group's 50 most frequent wordings; a promotion must take
    # every wording of the group off the misses list, or the rest come back as a group.
    wordings = [f"mortgage loan {'please ' * n}".strip() for n in range(QUESTIONS_PER_GROUP + 10)]
    questions = [missed(w) for w in wordings] + [missed("car insurance")]
    plain = group_misses(questions, WordEmbedder(), threshold=0.75)
    assert "keys" not in plain[0]  # not in what GET /admin/misses shows
    (loans, cars) = group_misses(questions, WordEmbedder(), threshold=0.75, with_keys=True)
    assert len(loans["questions"]) == QUESTIONS_PER_GROUP
    assert sorted(loans["keys"]) == sorted(wordings) and cars["keys"] == ["car insurance"]
    stats = Stats()
    stats.missed.extend(questions)
    assert stats.forget_missed(set(loans["keys"]), normalize_text) == len(wordings)
    assert [m.text for m in stats.missed_questions()] == ["car insurance"]


def test_only_confident_agent_intents_are_not_missing_faqs():
    assert is_agent_intent(missed("balance?", "balance", "llm", score=0.9), 0.6)
    assert not is_agent_intent(missed("mortgage?", "agent", "handoff", score=0.3), 0.6)
    assert not is_agent_intent(missed("hours?", "hours", "answer", score=0.9), 0.6)
    assert not is_agent_intent(missed("weather?", None, "llm", score=0.9), 0.6)


def test_every_route_the_operator_docs_name_exists(tmp_path):
    # docs/operations.md once promised `GET /cluster/stats`, a route that was dropped: a
    # scraper following the docs got 404. Every `METHOD /path` named there and in the README
    # must be routed ({id} filled in; no lifespan: data routes answer 503, never 404).
    documented = set()
    for doc in (ROOT / "docs" / "operations.md", ROOT / "README.md"):
        documented |= set(re.findall(r"`(GET|POST|DELETE) (/[^`\s]*)`", doc.read_text("utf-8")))
    assert ("GET", "/admin/stats") in documented and ("GET", "/metrics") in documented
    settings = Settings(store_dir=str(tmp_path / "store"), port=0, admin_token="t")
    client = TestClient(create_app(settings))
    missing = sorted((method, path) for method, path in documented
                     if client.request(method, re.sub(r"\{\w+\}", "x", path),
                                       headers={"Authorization": "Bearer t"},
                                       follow_redirects=False).status_code in (404, 405))
    assert missing == []


# Each is read by float() (an exponent, spaces, an underscore, a sign, other scripts' digits,
# full-width digits, a no-break space) but is not a plain decimal number.
NOT_PLAIN_DECIMALS = ["5e-2", "1E-2", " 0.05 ", "0.05\n", "0.0_5", "+.05", "+0.05",
                      "\u0660.\u0660\u0665", "\uff10.\uff10\uff15", "0.05\u00a0", "0.05.1",
                      "nan", "inf", "-0.05", "1", "0", "0.0", "1.0", ""]


@pytest.mark.parametrize("text", NOT_PLAIN_DECIMALS)
def test_a_target_wrong_rate_is_a_plain_decimal_in_the_cli_and_the_admin_api(text, capsys):
    """Review (stop 63): cache_seed parse_target_wrong_rate (the admin API's
    `target_wrong_rate`, the CLI's --target-wrong-rate) read the value with float(), which
    takes `5e-2`, ` 0.05 `, `0.0_5`, `+.05` and Arabic-Indic or full-width digits: a value an
    operator did not write as a number of the docs' form seeded, where GET /admin/misses'
    threshold is refused for the same. Only digits with one point, strictly between 0 and 1,
    are read; anything else is refused with the message showing the value, by both."""
    from cache_seed import parse_target_wrong_rate
    from gateway.cli import build_parser

    with pytest.raises(ValueError) as info:
        value = parse_target_wrong_rate(text)
        pytest.fail(f"{text!r} read as {value!r}")
    assert str(info.value).startswith("must be a number between 0 and 1"), info.value
    assert f"not {text!r}" in str(info.value), info.value
    with pytest.raises(SystemExit):
        args = build_parser().parse_args(["seed", "--target-wrong-rate", text, "faq.csv"])
        pytest.fail(f"the CLI read {text!r} as {args.target_wrong_rate!r}")
    assert f"not {text!r}" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("0.05", 0.05), (".05", 0.05), ("0.01", 0.01),
                                         ("0.5", 0.5), ("00.2", 0.2), ("0.999", 0.999)])
def test_a_plain_decimal_target_wrong_rate_is_read_as_before(text, value):
    from cache_seed import parse_target_wrong_rate
    from gateway.cli import build_parser

    assert parse_target_wrong_rate(text) == value
    args = build_parser().parse_args(["seed", "--target-wrong-rate", text, "faq.csv"])
    assert args.target_wrong_rate == value


def test_a_token_beyond_ascii_is_accepted_as_curl_and_as_a_browser_send_it(tmp_path):
    """Review (stop 64): a VOICEGATE_ADMIN_TOKEN with a letter beyond ASCII ("Schlüssel-...")
    was refused, 401 "missing or wrong admin token", to every request curl or a script sent
    with it: they send the header's text as UTF-8, the server reads a header's bytes as
    Latin-1, and the two never compared equal. Only a browser's fetch (the dashboard), which
    sends Latin-1, got in. Both spellings of the configured token are accepted now; anything
    else is still refused."""
    from gateway.clock import ManualClock
    from tests.admin_support import warm_app

    app = warm_app(tmp_path / "store", ManualClock())
    token = "Schlüssel-ñ-0f3c"
    services = app.state.services
    services.settings = services.settings.replace(admin_token=token)
    client = TestClient(app)

    def status(header: bytes) -> int:
        return client.get("/admin/stats", headers=[(b"authorization", header)]).status_code

    assert status(b"Bearer " + token.encode("utf-8")) == 200  # curl, httpx, requests
    assert status(b"Bearer " + token.encode("latin-1")) == 200  # a browser's fetch
    for wrong in ("Schlussel-ñ-0f3c", "Schlüssel-ñ-0f3", "Schlüssel-ñ-0f3cX"):
        for encoding in ("utf-8", "latin-1"):
            assert status(b"Bearer " + wrong.encode(encoding)) == 401, (wrong, encoding)
    # a token of characters no browser can send (beyond Latin-1) works for curl
    services.settings = services.settings.replace(admin_token="ключ-0f3c")
    assert status(b"Bearer " + "ключ-0f3c".encode("utf-8")) == 200
    assert status(b"Bearer " + "ключ-0f3d".encode("utf-8")) == 401


def test_the_last_seed_s_bad_rows_are_summed_up_in_the_seed_status_not_all_kept(tmp_path):
    """Review (stop 64): GET /admin/seed's ``last.error`` held the refused upload's whole
    listing of bad rows, one line per row: a 4 MB CSV whose every row was refused (a column
    mixed up) kept over 100 MB of text there, JSON-encoded on the serving loop and sent on
    every poll of the dashboard (each 3 s), until the next seed. It now says how many rows
    were bad and shows the first ones; the upload's own answer lists up to 1,000."""
    from gateway.clock import ManualClock
    from tests.admin_support import AUTH, warm_app

    app = warm_app(tmp_path / "store", ManualClock())
    client = TestClient(app)
    rows = "".join(f"Question {n}?,=x{n}\n" for n in range(2, 3002))
    upload = client.post("/admin/seed?name=faq.csv", content="question,answer\n" + rows,
                         headers={**AUTH, "content-type": "text/csv"})
    assert upload.status_code == 400, upload.text
    # Review (stop 64): the 400 itself listed every bad row (a 5 MB file of them, 100 MB
    # of JSON encoded on the serving loop): the first 1,000, and how many in all.
    answer = upload.json()
    assert [e["line"] for e in answer["errors"]] == list(range(2, 1002))
    assert answer["bad_rows"] == 3000 and "(the first 1000 listed)" in answer["error"]
    last = client.get("/admin/seed", headers=AUTH).json()["last"]
    assert last["outcome"] == "failed", last
    error = last["error"]
    assert len(error) < 3000, len(error)
    assert error.startswith("faq.csv: 3000 bad row(s), nothing published"), error
    assert "line 3: answer looks like a spreadsheet formula" in error, error  # the first ones
    assert "line 3001" not in error and "2995 more" in error, error
    # a short listing is kept whole, as before
    client.post("/admin/seed?name=faq.csv", content="question,answer\nA?,=x\nB?,ok\n",
                headers={**AUTH, "content-type": "text/csv"})
    error = client.get("/admin/seed", headers=AUTH).json()["last"]["error"]
    assert error.startswith("faq.csv: 1 bad row(s)") and "line 2: answer looks like" in error
    assert "more" not in error, error


def test_the_recent_hit_rate_counts_the_window_only():
    """Review (stop 66): the 5-minute hit rate read all 100,000 kept outcomes on the serving
    loop at every /admin/stats; it now reads back from the newest to the window's start.
    The figure is the same: outcomes before the window do not count, those in it do."""
    stats = Stats()
    for at, hit in [(100.0, True), (100.0, True), (800.0, True), (900.0, False), (999.0, False)]:
        stats.recent.append((at, hit))
    assert stats.recent_hit_rate(window_s=300.0, now=1000.0) == (1 / 3, 3)
    assert stats.recent_hit_rate(window_s=50.0, now=1000.0) == (0.0, 1)
    assert stats.recent_hit_rate(window_s=0.5, now=1000.0) == (None, 0)


async def test_the_stats_percentiles_are_computed_off_the_serving_loop():
    """Review (stop 66): /admin/stats computed every stage's p50 and p99 (20 series of up to
    10,000 samples) on the event loop the calls share: ~20 ms a request on a loaded 2-core
    host, every 3 s per open dashboard. The samples are copied on the loop and their
    percentiles computed on a thread; the figures are the ones computed in place."""
    import threading

    from gateway import services as services_module
    from gateway.services import Services
    from gateway.stats import latency_percentiles

    from collections import deque

    stats = Stats()
    stats.latencies["hit"] = {"first_audio_ms": deque(float(v) for v in range(1, 101)),
                              "end_of_turn_ms": deque(2.0 * v for v in range(1, 101))}
    threads: list[threading.Thread] = []

    def recorded(samples):
        threads.append(threading.current_thread())
        return latency_percentiles(samples)

    services = Services.__new__(Services)  # only what stats_snapshot reads
    services._runtime = type("R", (), {"stats": stats})()  # type: ignore[attr-defined]
    services.shared_stats, services.cache = None, None
    original = services_module.latency_percentiles
    services_module.latency_percentiles = recorded
    try:
        snapshot = await services.stats_snapshot()
    finally:
        services_module.latency_percentiles = original
    assert threads and threads[0] is not threading.main_thread()
    assert snapshot["latency_ms"] == stats.snapshot()["latency_ms"]
    assert snapshot["latency_ms"]["hit"]["first_audio"] == {"p50": 50.5, "p99": 99.01, "n": 100}


def test_no_other_site_may_frame_the_dashboard(tmp_path):
    """Review (stop 67): the dashboard's Content-Security-Policy had no `frame-ancestors`:
    any site could frame it, its delete and promote buttons under a decoy (clickjacking) in a
    tab whose session still holds the token. It now says `frame-ancestors 'none'`, as the
    caller page's does."""
    from gateway.settings import Settings

    settings = Settings.load({"store_dir": str(tmp_path / "store"), "admin_token": "t-0f3c"},
                             environ={})
    client = TestClient(create_app(settings))  # no lifespan: the page needs no models
    for path in ("/admin/", "/admin"):
        page = client.get(path)
        assert page.status_code == 200
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"], path
