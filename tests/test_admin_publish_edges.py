"""The admin API's publishing at its edges (gateway/admin/publish.py, routes.py): what an
upload inherits from the version it replaces, and what the operator is told when an edit
cannot be made. Each test failed before its fix (a review, stop 59).

The Publisher is driven directly, on a real store and the real embedder, with a cheap
deterministic voice (a tone): what is checked is what gets published, and what the
operator is told."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cache_seed import parse_seed_csv, seed_plan
from gateway.admin.publish import LabelledValidationError, Publisher, _rebuilt_plan
from gateway.admin.routes import _publish_failed
from gateway.faq_cache import FaqCache
from gateway.settings import Settings
from gateway.stats import Stats
from intents.store import LocalStore, StoreUnavailable
from tests.admin_support import small_faq_csv
from tests.intents_support import TONE_RATE, shared_embedder, tone_render

OPERATOR_NEGATIVES = ("do you sell car insurance", "can I book a flight with you")
OPERATOR_TARGET = 0.05


class ToneVoice:
    """A local voice (``synthesize_all``, as Piper has) whose audio is ``tone_render``'s, under
    the voice id the stores below are seeded with: answers seeded before are reused."""

    name = audio_id = "tone"
    sample_rate = TONE_RATE

    def synthesize_all(self, text: str) -> bytes:
        return tone_render(text)[0]


def publisher_on(cache: FaqCache) -> tuple[Publisher, SimpleNamespace]:
    services = SimpleNamespace(cache=cache, settings=Settings(), stats=Stats(),
                               runtime=SimpleNamespace(tts=ToneVoice(),
                                                       embedder=shared_embedder()))
    return Publisher(services), services  # type: ignore[arg-type]


def cli_seed(store, csv_text: str, target: float = OPERATOR_TARGET,
             negatives: tuple[str, ...] = OPERATOR_NEGATIVES) -> str:
    """What `voicegate seed --target-wrong-rate T --negatives N.csv faq.csv` publishes."""
    return seed_plan(parse_seed_csv(csv_text.encode()), store, tone_render, "tone",
                     source="faq.csv", target_wrong_rate=target, progress=False,
                     embedder=shared_embedder(), negatives=negatives).version


def manifest(store, version: str | None = None) -> dict:
    return store.read(version)[1].manifest


# ------------------------------------------------------------------------------------------
# The operator's negatives and wrong-answer target, lost by an upload (the earlier review's
# suspicion: proven).


async def test_an_upload_on_a_replica_without_a_loaded_version_drops_the_operators_negatives_and_target(
        tmp_path: Path) -> None:
    """The store's current version was seeded with the operator's own negatives and a 5 %
    wrong-answer target, and does not load on this replica (one answer's audio is gone):
    the replica starts ready with no cache (``loaded is None``), and /readyz says why. The
    docs' way out is to seed again (POST /admin/seed). The upload takes its defaults from
    ``cache.loaded`` only, so the new version is calibrated at 1 % (docs: "default: the
    serving version's, 0.01 when nothing is published"; a version *is* published) and
    without the negatives, which the admin API gives no way to send again: every later
    edit carries the loss. Out-of-domain questions the operator listed to stop wrong cached
    answers are no longer trained against."""
    store = LocalStore(tmp_path / "store")
    published = cli_seed(store, small_faq_csv())
    keys = [e["audio_key"] for e in manifest(store)["entries"] if e["audio_key"]]
    (tmp_path / "store" / "audio" / f"{keys[0]}.wav").unlink()  # unloadable, manifest fine
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh() is False and cache.loaded is None  # a replica started now
    assert cache.last_error and published in cache.last_error
    publisher, _ = publisher_on(cache)

    report = await publisher.seed_csv(small_faq_csv().encode(), "faq.csv")

    new = manifest(store, report.version)
    assert store.current_version() == report.version == cache.version  # repaired and served
    lost = {"target_wrong_rate": new["thresholds"]["target_wrong_rate"],
            "negatives": new["negatives"]}
    assert lost == {"target_wrong_rate": OPERATOR_TARGET,
                    "negatives": list(OPERATOR_NEGATIVES)}, (
        f"the reseed replaced {published} (target {OPERATOR_TARGET}, negatives "
        f"{list(OPERATOR_NEGATIVES)}) and published {lost}")


async def test_an_upload_on_a_replica_behind_the_store_takes_the_defaults_of_a_version_it_does_not_replace(
        tmp_path: Path) -> None:
    """The operator re-seeds with the CLI (`voicegate seed --negatives ... --target-wrong-rate
    0.05`) while a gateway runs; before that gateway's poll (2 s local, 30 s Redis; or a
    pub/sub message missed) picks it up, an upload arrives through the admin API. An entry
    edit refreshes first and builds on the store's current version; an upload does not: it
    replaces the CLI's version with the defaults of the older one this replica still holds
    (1 %, no negatives), and the operator's negatives are gone for good."""
    store = LocalStore(tmp_path / "store")
    cli_seed(store, small_faq_csv(), target=0.01, negatives=())
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh()
    newer = cli_seed(store, small_faq_csv())  # the CLI's seed; this replica has not polled yet
    publisher, _ = publisher_on(cache)

    report = await publisher.seed_csv(small_faq_csv().encode(), "faq.csv")

    new = manifest(store, report.version)
    got = {"target_wrong_rate": new["thresholds"]["target_wrong_rate"],
           "negatives": new["negatives"]}
    assert got == {"target_wrong_rate": OPERATOR_TARGET, "negatives": list(OPERATOR_NEGATIVES)}, (
        f"the upload replaced {newer} (target {OPERATOR_TARGET}, negatives "
        f"{list(OPERATOR_NEGATIVES)}) and published {got}: the defaults of the version this "
        "replica held")


class SilentPointerStore(LocalStore):
    """A store that does not answer the next ``silent`` reads of its pointer (a Redis
    timeout: ``StoreUnavailable``), then answers again."""

    silent = 0

    def current_version(self):
        if self.silent:
            self.silent -= 1
            raise StoreUnavailable("Redis at redis://cache:6379/0 is unreachable "
                                   "(current_version): Timeout reading from socket")
        return super().current_version()


async def test_an_upload_while_the_store_does_not_answer_is_refused_not_seeded_with_memorys_defaults(
        tmp_path: Path) -> None:
    """Review (stop 60): gateway/admin/publish.py _upload_defaults: the store did not answer
    the read of its current version's target and negatives (one timeout), so the upload
    took this replica's copy, silently. Here that copy is behind: the CLI has published
    the operator's negatives and 5 % since this replica's last poll. The store answers
    again for the publish, and replaces them with 1 % and none. Nothing in the answer said
    which defaults were used; the operator's negatives are gone for good. The upload is to
    be refused as the store's outage (retry it), publishing nothing."""
    store = SilentPointerStore(tmp_path / "store")
    cli_seed(store, small_faq_csv(), target=0.01, negatives=())
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh()
    newer = cli_seed(store, small_faq_csv())  # the CLI's seed; this replica has not polled yet
    publisher, services = publisher_on(cache)
    store.silent = 1  # the defaults' read

    with pytest.raises(StoreUnavailable) as raised:
        report = await publisher.seed_csv(small_faq_csv().encode(), "faq.csv")
        new = manifest(store, report.version)
        pytest.fail(f"the upload replaced {newer} (target {OPERATOR_TARGET}, negatives "
                    f"{list(OPERATOR_NEGATIVES)}) with target "
                    f"{new['thresholds']['target_wrong_rate']}, negatives {new['negatives']}")
    assert store.current_version() == newer
    response = _publish_failed(raised.value, services)  # type: ignore[arg-type]
    said = json.loads(response.body)["error"]
    assert response.status_code == 503 and "negatives" in said and "retry" in said, said


# ------------------------------------------------------------------------------------------
# Misleading errors


class BlinkingStore(LocalStore):
    """A store that does not answer one read of one version (as a Redis timeout reading a
    large version's hash does: ``StoreUnavailable``), then answers again."""

    fail_read_of: str | None = None

    def read(self, version=None):
        if version is not None and version == self.fail_read_of:
            self.fail_read_of = None
            raise StoreUnavailable("Redis at redis://cache:6379/0 is unreachable (read): "
                                   "Timeout reading from socket")
        return super().read(version)


async def test_an_edit_after_a_store_timeout_is_told_to_replace_a_good_version_with_a_whole_csv(
        tmp_path: Path) -> None:
    """Another replica (or the CLI) published B; this replica, serving A, reads B and the
    store does not answer that once (a timeout). The cache marks it as the store's failure
    (``failed_for_store``: retried at the next poll, nothing wrong with B). An entry edit
    then refreshes, finds ``last_error`` set and B not serving, and answers 503 "entries
    cannot be edited while the current cache version cannot be loaded ...: seed a whole CSV
    to replace it". B is fine and a retry succeeds; following the advice replaces B (and
    every edit made since the operator's last CSV) with an old CSV."""
    store = BlinkingStore(tmp_path / "store")
    cli_seed(store, small_faq_csv())
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh()
    serving = cache.version
    b = cli_seed(store, small_faq_csv().replace("Our branches are open",
                                                "All our branches are open"))
    store.fail_read_of = b
    publisher, services = publisher_on(cache)
    try:
        await publisher.upsert_entry({"intent": "swift_code",
                                      "answer": "Our SWIFT code is VGBKUS33."})
    except Exception as exc:  # noqa: BLE001 - what the admin route answers
        response = _publish_failed(exc, services)  # type: ignore[arg-type]
        answer = (response.status_code, json.loads(response.body)["error"])
    else:
        answer = (200, "published")
    assert answer[0] == 200 or "retry" in answer[1], answer
    assert "seed a whole CSV" not in answer[1], (
        f"{b} is current and loadable (one read timed out; this replica serves {serving}); "
        f"the edit answered {answer}")


async def test_deleting_the_last_entry_is_refused_in_csv_jargon_naming_no_entry(
        tmp_path: Path) -> None:
    """DELETE /admin/entries/{id} of a version's only entry: the rebuilt seed has no rows, and
    the operator gets 400 with `{"line": 1, "reason": "no rows after the header", "entry":
    null}`: a CSV's header the operator never sent, no word of the entry or why it cannot
    go (a version keeps at least one entry and two questions)."""
    store = LocalStore(tmp_path / "store")
    cli_seed(store, "question,answer,intent\nwhen are you open,Nine to five.,hours\n"
                    "what are your opening hours,Nine to five.,hours\n")
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh()
    publisher, services = publisher_on(cache)
    with pytest.raises(Exception) as caught:
        await publisher.delete_entry("hours")
    response = _publish_failed(caught.value, services)  # type: ignore[arg-type]
    body = json.loads(response.body)
    assert response.status_code == 400, body
    said = json.dumps(body)
    assert "header" not in said and "hours" in said, (
        f"deleting the only entry 'hours' answered: {body}")


async def test_an_entry_is_found_by_its_intent_name_by_get_as_by_delete(tmp_path: Path) -> None:
    """Review (stop 62): GET /admin/entries/{id} looked the entry up by its id alone, while
    DELETE on the same path (and POST /admin/entries) also take its intent name: for the
    intent "Card lost" (id Card_lost-<hash>) GET /admin/entries/Card%20lost answered 404 "no
    entry", and DELETE on that same URL deleted the entry. The three find an entry one way
    now (its id or its intent name)."""
    import httpx

    from gateway.clock import ManualClock
    from intents.types import entry_id_for
    from tests.admin_support import AUTH, warm_app

    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    cli_seed(store, small_faq_csv() + "I lost my bank card,Call us to block it.,Card lost,\n"
                                      "my bank card was stolen,,Card lost,\n")
    app = warm_app(store_dir, ManualClock())
    services = app.state.services
    services.cache = FaqCache(store, shared_embedder())
    assert services.cache.refresh()
    services._runtime.tts, services._runtime.embedder = ToneVoice(), shared_embedder()
    card_id = entry_id_for("Card lost")
    assert card_id != "Card lost"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=AUTH) as client:
        by_id = await client.get(f"/admin/entries/{card_id}")
        by_name = await client.get("/admin/entries/Card%20lost")
        assert by_id.status_code == 200, by_id.text
        assert by_name.status_code == 200, by_name.text
        assert by_name.json() == by_id.json()
        assert by_name.json()["entry"]["id"] == card_id
        deleted = await client.delete("/admin/entries/Card%20lost")
        assert deleted.status_code == 200, deleted.text
        for path in (f"/admin/entries/{card_id}", "/admin/entries/Card%20lost"):
            gone = await client.get(path)
            assert gone.status_code == 404, (path, gone.text)


async def test_an_edit_rebuilds_the_versions_rows_off_the_serving_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 66): an entry edit, a deletion and a promotion rebuilt every row of the
    serving version (one per question) on the serving event loop, before handing them to
    the worker thread that validates them: for a FAQ of tens of thousands of questions a
    tenth of a second and more in which no call on the replica got a frame. The rows are
    now rebuilt on the worker thread, as they are validated."""
    import threading

    import gateway.admin.publish as publish

    store = LocalStore(tmp_path / "store")
    cli_seed(store, small_faq_csv())
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh()
    publisher, _ = publisher_on(cache)
    loop_thread = threading.get_ident()
    rebuilt_on: list[int] = []
    rows_from_manifest = publish.rows_from_manifest

    def recorded(manifest):
        rebuilt_on.append(threading.get_ident())
        return rows_from_manifest(manifest)

    monkeypatch.setattr(publish, "rows_from_manifest", recorded)
    await publisher.upsert_entry({"intent": "lost_card", "answer": "Call us to block it.",
                                  "questions": ["I lost my card", "my card was stolen"]})
    await publisher.delete_entry("lost_card")
    assert len(rebuilt_on) == 2 and loop_thread not in rebuilt_on, (
        "the version's rows were rebuilt on the serving loop")


async def test_an_upload_does_not_replace_an_edit_published_while_it_ran(tmp_path: Path) -> None:
    """Review (stop 68): an upload publishes over whatever is current when its calibration
    ends (minutes for a large seed). Another replica's admin API (one Redis behind a
    balancer) corrected an answer meanwhile, and answered that edit 200: the upload then
    published over it, and the wrong answer the edit had fixed served again, no one told.
    An upload now replaces only the version current when it began, as an edit does: a
    version published meanwhile is kept, and the upload answers 409, nothing published."""
    store = LocalStore(tmp_path / "store")
    first = cli_seed(store, small_faq_csv())
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh()
    edited: list[str] = []

    class EditMeanwhile(ToneVoice):
        """Renders the upload's new answer while another replica publishes an edit."""

        def synthesize_all(self, text: str) -> bytes:
            if not edited:  # replica B's POST /admin/entries, built on (and replacing) first
                fixed = small_faq_csv().replace("Our branches are open",
                                                "All our branches are open")
                edited.append(seed_plan(parse_seed_csv(fixed.encode()), store, tone_render,
                                        "tone", source="admin: entry opening_hours",
                                        target_wrong_rate=OPERATOR_TARGET, progress=False,
                                        embedder=shared_embedder(),
                                        negatives=OPERATOR_NEGATIVES, replaces=first).version)
            return super().synthesize_all(text)

    publisher, services = publisher_on(cache)
    services.runtime.tts = EditMeanwhile()
    upload = small_faq_csv().replace("Bluestone Bank's routing number",
                                     "The routing number")  # one answer to render
    try:
        report = await publisher.seed_csv(upload.encode(), "faq.csv")
    except Exception as exc:  # noqa: BLE001 - what the admin route answers
        response = _publish_failed(exc, services)  # type: ignore[arg-type]
        answer = (response.status_code, json.loads(response.body)["error"])
    else:
        answer = (200, f"published {report.version}")
    assert edited, "the voice rendered nothing: the edit never happened"
    assert store.current_version() == edited[0], (
        f"the upload answered {answer} and replaced the edit {edited[0]} published meanwhile")
    assert answer[0] == 409 and edited[0] in answer[1], answer


# An entry no rule refuses, and an edit of it: what the tests of rebuilt versions edit.
CARDS = {"intent": "cards", "answer": "Cards arrive in a week.", "action": "answer",
         "questions": ["when does my card arrive"]}
CARDS_EDITED = [{"question": "when will my card come", "answer": "Cards arrive in five days.",
                 "intent": "cards", "action": "answer"}]


def test_an_entry_published_before_a_newer_rule_does_not_block_edits_of_the_others() -> None:
    """Review (stop 68): this stop's seed rules refuse answers that are a placeholder
    ("TBD"), markup or an audio file's name, and questions of punctuation alone. Every entry
    edit, deletion or promotion re-checks the whole version's rows, so a version published
    before the rules, holding one such row, refused every edit of any other entry (400), and
    with two such entries fixing one still failed on the other: only a whole new seed got out.
    The other entries' rows are now taken as published; the entry being edited still meets
    every rule."""
    manifest = {"entries": [
        {"intent": "hours", "answer": "TBD", "action": "answer",
         "questions": ["when are you open", "?"]},
        {"intent": "fees", "answer": "<p>No fees.</p>", "action": "answer",
         "questions": ["what are the fees"]},
        CARDS]}
    plan = _rebuilt_plan(manifest, "cards", CARDS_EDITED, "entry cards")
    assert set(plan.entries) == {"hours", "fees", "cards"}
    assert plan.entries["cards"].answer == "Cards arrive in five days."
    deleted = _rebuilt_plan(manifest, "fees", [], "entry fees")  # deleting one of them
    assert set(deleted.entries) == {"hours", "cards"}
    # The entry edited is held to every rule.
    with pytest.raises(LabelledValidationError) as refused:
        _rebuilt_plan(manifest, "hours", [{"question": "when are you open", "answer": "N/A",
                                           "intent": "hours", "action": "answer"}],
                      "entry hours")
    assert [(e["entry"], e["changed"]) for e in refused.value.errors] == [("hours", True)]


def test_an_intent_published_in_two_unicode_forms_does_not_block_edits_of_the_others() -> None:
    """Review (stop 68): an intent name is now read composed (NFC), so "résiliation" typed
    with é as one character and as e plus an accent is one intent. A version published
    before that holds both as entries of their own (the rows without an answer an agent,
    llm, entry: the very split the rule fixes). Every entry edit, deletion or promotion
    rebuilds the version from its rows, and read composed the two became one intent with two
    actions: every edit of any other entry was refused (400, "intent 'résiliation' has
    action 'answer' on line 3, not 'llm'"), for an entry nobody touched. The other entries'
    rows keep their names as published (their own entries, as they serve)."""
    composed, decomposed = "r\u00e9siliation", "re\u0301siliation"
    manifest = {"entries": [
        {"intent": composed, "answer": "Call us to cancel.", "action": "answer",
         "questions": ["how do I cancel"]},
        {"intent": decomposed, "answer": None, "action": "llm",
         "questions": ["I want to end my contract"]},
        CARDS]}
    plan = _rebuilt_plan(manifest, "cards", CARDS_EDITED, "entry cards")
    assert plan.entries["cards"].answer == "Cards arrive in five days."
    assert set(plan.entries) == {composed, decomposed, "cards"}  # served as before
    assert plan.entries[decomposed].action.value == "llm"
    deleted = _rebuilt_plan(manifest, "cards", [], "entry cards")
    assert set(deleted.entries) == {composed, decomposed}
