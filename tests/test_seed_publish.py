"""Seeding end to end: audio by content hash, re-seeds render only changes, atomic publish."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import importlib
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

import intents.store as store_module
from cache_seed.seed import SeedReport
from cache_seed import (NewAnswerLimit, RenderError, SeedCancelled, TooManyNewAnswers,
                        parse_seed_csv, read_seed_csv, seed, seed_plan)
from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.faq_cache import FaqCache
from gateway.services import Services
from gateway.settings import Settings
from intents.embedder import Embedder
from intents.loader import load_cache
from intents.store import CacheBundle, LocalStore, StoreError, StoreUnavailable, audio_key
from intents.types import Action, Audio
from tests.admin_support import small_faq_csv
from tests.intents_support import BANK_FAQ, intent_embedder, shared_embedder, tone_render  # noqa: F401

ADMIN_TOKEN = "seed-publish-token"
# the module (the package's `seed` is the function of that name)
seed_module = importlib.import_module("cache_seed.seed")


class CountingRender:
    """Wraps the test tone renderer; can be told to fail on the n-th call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.texts: list[str] = []
        self.fail_on_call = fail_on_call

    def __call__(self, text: str) -> tuple[bytes, int]:
        self.texts.append(text)
        if self.fail_on_call is not None and len(self.texts) == self.fail_on_call:
            raise RuntimeError("TTS went away")
        return tone_render(text)


def test_seed_loads_every_entry_with_its_exact_audio(tmp_path: Path,
                                                      intent_embedder: Embedder) -> None:  # noqa: F811
    store = LocalStore(tmp_path)
    render = CountingRender()
    report = seed(BANK_FAQ, store, render, "voice-a", progress=False, embedder=intent_embedder)
    answers = sorted(set(render.texts))
    assert len(render.texts) == len(answers) == report.rendered == report.answer_entries
    assert report.reused == 0
    assert 0.0 < report.expected_hit_rate <= 1.0
    assert report.thresholds.expected_wrong_rate <= report.thresholds.target_wrong_rate

    cache = load_cache(store, intent_embedder)
    assert cache.version == report.version == store.current_version()
    assert len(cache.entries) == report.entries
    for entry in cache.entries.values():
        if entry.action is Action.ANSWER:
            assert entry.answer and entry.paraphrases
            assert (entry.pcm, entry.sample_rate) == tone_render(entry.answer)
        else:
            assert entry.pcm is None and entry.answer is None
    assert {e.action for e in cache.entries.values()} == set(Action)


def test_reseed_renders_only_changed_answers(tmp_path: Path,
                                             intent_embedder: Embedder) -> None:  # noqa: F811
    store = LocalStore(tmp_path / "store")
    first = seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
                 embedder=intent_embedder)

    again = CountingRender()
    second = seed(BANK_FAQ, store, again, "voice-a", progress=False, embedder=intent_embedder)
    assert again.texts == [] and second.rendered == 0 and second.reused == first.rendered
    assert second.version != first.version

    old = "Bluestone ATMs are free for our customers."
    new = "Bluestone ATMs are always free for our customers."
    changed_csv = tmp_path / "changed.csv"
    changed_csv.write_text(BANK_FAQ.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    changed = CountingRender()
    third = seed(changed_csv, store, changed, "voice-a", progress=False, embedder=intent_embedder)
    assert len(changed.texts) == 1 and changed.texts[0].startswith(new)
    assert (third.rendered, third.reused) == (1, first.rendered - 1)

    other_voice = CountingRender()
    seed(BANK_FAQ, store, other_voice, "voice-b", progress=False, embedder=intent_embedder)
    assert len(other_voice.texts) == first.rendered  # audio is keyed by voice too


def test_an_answer_two_intents_share_is_counted_once_rendered_or_reused(tmp_path: Path) -> None:
    """Review (stop 69): each distinct answer renders once, and `rendered` counts it once, but
    `reused` counted it once per intent holding it: a re-seed of a FAQ whose intents share
    an answer ("Please call us on 0800 ...") reported more answers reused than the first
    seed rendered, and the new-answer limit's refusal said so ("... more are already in the
    store"). Reused answers are counted as rendered ones are: each distinct answer once."""
    from cache_seed import render_answers

    plan = parse_seed_csv(b"question,answer,intent,action\n"
                          b"I lost my card,Please call us on 0800 123.,lost_card,\n"
                          b"My card was stolen,Please call us on 0800 123.,stolen_card,\n"
                          b"When are you open?,Nine to five.,hours,\n")
    store = LocalStore(tmp_path / "store")
    first = CountingRender()
    _, rendered, reused = render_answers(plan, store, first, "voice-a", progress=False)
    assert (rendered, reused, len(first.texts)) == (2, 0, 2)
    again = CountingRender()
    _, rendered, reused = render_answers(plan, store, again, "voice-a", progress=False)
    assert (rendered, reused, again.texts) == (0, 2, [])
    grown = parse_seed_csv(b"question,answer,intent,action\n"
                           b"I lost my card,Please call us on 0800 123.,lost_card,\n"
                           b"My card was stolen,Please call us on 0800 123.,stolen_card,\n"
                           b"When are you open?,Nine to five.,hours,\n"
                           b"Where are you?,On Main Street.,where,\n")
    with pytest.raises(TooManyNewAnswers) as refused:
        render_answers(grown, store, again, "voice-a", progress=False,
                       limit=NewAnswerLimit(0, "THE_LIMIT"))
    assert (refused.value.new, refused.value.reused) == (1, 2)
    assert "(2 more are already in the store)" in str(refused.value)


def test_failed_render_mid_seed_leaves_previous_version_serving(
        tmp_path: Path, intent_embedder: Embedder) -> None:  # noqa: F811
    store = LocalStore(tmp_path / "store")
    first = seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
                 embedder=intent_embedder)
    before = load_cache(store, intent_embedder)

    failing = CountingRender(fail_on_call=3)
    with pytest.raises(RenderError, match="TTS went away"):
        seed(BANK_FAQ, store, failing, "voice-b", progress=False, embedder=intent_embedder)
    assert len(failing.texts) == 3
    assert store.current_version() == first.version
    assert store.versions() == [first.version]
    after = load_cache(store, intent_embedder)
    assert {k: v.pcm for k, v in after.entries.items()} == {k: v.pcm for k, v in before.entries.items()}

    # What was rendered before the failure is kept (content-addressed) and reused next time.
    retry = CountingRender()
    report = seed(BANK_FAQ, store, retry, "voice-b", progress=False, embedder=intent_embedder)
    assert report.reused == 2 and report.rendered == first.rendered - 2


def test_a_seed_over_the_new_answer_limit_is_refused_before_any_rendering(
        tmp_path: Path, intent_embedder: Embedder) -> None:  # noqa: F811
    """A seed of tens of thousands of distinct answers rendered for hours. Past the limit
    it is refused before its first answer renders; answers already in the store are reused,
    so only the new ones count."""
    store = LocalStore(tmp_path / "store")
    answers = {e.answer for e in read_seed_csv(BANK_FAQ).entries.values() if e.answer}
    limit = NewAnswerLimit(len(answers) - 1, "THE_LIMIT")
    refused = CountingRender()
    with pytest.raises(TooManyNewAnswers) as info:
        seed(BANK_FAQ, store, refused, "voice-a", progress=False, embedder=intent_embedder,
             limit=limit)
    assert (info.value.new, info.value.reused, info.value.limit) == (len(answers), 0, limit)
    assert str(info.value) == (
        f"this seed would render {len(answers)} new answers (0 more are already in the store), "
        f"over the limit of {len(answers) - 1} new answers a seed may render (THE_LIMIT): "
        "nothing was rendered or published; raise THE_LIMIT if so many new answers are meant")
    assert refused.texts == [] and store.current_version() is None

    first = seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
                 embedder=intent_embedder, limit=NewAnswerLimit(len(answers), "THE_LIMIT"))
    assert first.rendered == len(answers)  # the limit itself is allowed

    changed_csv = tmp_path / "changed.csv"
    text = BANK_FAQ.read_text(encoding="utf-8")
    for old in ("Bluestone ATMs are free for our customers.",
                "Certificates of deposit pay from"):
        assert old in text
        text = text.replace(old, old.rstrip(".") + " (changed).")
    changed_csv.write_text(text, encoding="utf-8")
    again = CountingRender()
    with pytest.raises(TooManyNewAnswers) as info:
        seed(changed_csv, store, again, "voice-a", progress=False, embedder=intent_embedder,
             limit=NewAnswerLimit(1, "THE_LIMIT"))
    assert (info.value.new, info.value.reused) == (2, len(answers) - 2)
    assert again.texts == [] and store.current_version() == first.version
    report = seed(changed_csv, store, again, "voice-a", progress=False,
                  embedder=intent_embedder, limit=NewAnswerLimit(2, "THE_LIMIT"))
    assert (report.rendered, report.reused, len(again.texts)) == (2, len(answers) - 2, 2)


def test_an_agent_or_handoff_intents_answer_is_never_rendered(tmp_path: Path) -> None:
    """Review (stop 69): an `llm` or `handoff` intent is never answered from the cache (the
    agent or a person answers), yet an answer written on its rows (a help centre's export
    keeps every answer; the operator marks the personal ones `llm`) was rendered by the
    voice, billed by a cloud one, counted against the new-answer limit and loaded by every
    replica, for audio no caller hears. Only `answer` entries' answers are rendered; the
    others keep their answer text and have no audio."""
    from cache_seed import render_answers

    plan = parse_seed_csv(b"question,answer,intent,action\n"
                          b"When are you open?,Nine to five.,hours,\n"
                          b"What's my balance?,Your balance is in the app.,balance,llm\n"
                          b"I want a person,Transferring you now.,person,handoff\n")
    render = CountingRender()
    entries, rendered, reused = render_answers(plan, LocalStore(tmp_path / "store"), render,
                                               "voice-a", progress=False,
                                               limit=NewAnswerLimit(1, "THE_LIMIT"))
    assert render.texts == ["Nine to five."] and (rendered, reused) == (1, 0)
    assert entries["hours"].audio_key == audio_key("Nine to five.", "voice-a")
    assert (entries["balance"].audio_key, entries["person"].audio_key) == (None, None)
    assert entries["balance"].answer == "Your balance is in the app."


def test_a_cancelled_seed_stops_at_the_next_answer_and_publishes_nothing(
        tmp_path: Path, intent_embedder: Embedder) -> None:  # noqa: F811
    store = LocalStore(tmp_path / "store")
    first = seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
                 embedder=intent_embedder)
    cancel = threading.Event()

    def render(text: str) -> tuple[bytes, int]:
        rendering.texts.append(text)
        if len(rendering.texts) == 2:  # cancelled while its second answer renders
            cancel.set()
        return tone_render(text)

    rendering = CountingRender()
    with pytest.raises(SeedCancelled, match=f"cancelled after rendering 2 of {first.rendered} "
                                            "new answers; nothing published"):
        seed(BANK_FAQ, store, render, "voice-b", progress=False, embedder=intent_embedder,
             cancel=cancel)
    assert len(rendering.texts) == 2
    assert store.current_version() == first.version and store.versions() == [first.version]
    # What it rendered is kept (content-addressed) and reused by the next seed.
    report = seed(BANK_FAQ, store, CountingRender(), "voice-b", progress=False,
                  embedder=intent_embedder)
    assert (report.rendered, report.reused) == (first.rendered - 2, 2)


def test_a_seed_cancelled_after_its_last_answer_still_publishes_nothing(
        tmp_path: Path, intent_embedder: Embedder,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while calibrating (nothing left to render): stopped before the publish."""
    store = LocalStore(tmp_path / "store")
    cancel = threading.Event()
    real_train = seed_module.train_router

    def train(*args, **kwargs):
        trained = real_train(*args, **kwargs)
        cancel.set()
        return trained

    monkeypatch.setattr(seed_module, "train_router", train)
    with pytest.raises(SeedCancelled, match="cancelled while calibrating; nothing published"):
        seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
             embedder=intent_embedder, cancel=cancel)
    assert store.current_version() is None and store.versions() == []


def test_a_cancel_that_lands_as_the_publish_begins_publishes_nothing(
        tmp_path: Path) -> None:
    """Review (stop 70): the seed checked its cancel after calibrating, then said "publishing"
    and published. A DELETE /admin/seed in between (the status still "calibrating": accepted,
    202 "publishes nothing") was never checked again, and the seed published. A cancel is
    now refused once the status says "publishing" (gateway/admin/seed_status.py), and the
    seed checks it once more after saying so: one accepted before is honoured."""
    store = LocalStore(tmp_path / "store")
    plan = parse_seed_csv(small_faq_csv().encode())
    cancel = threading.Event()

    def progress(step) -> None:
        if step.phase == "publishing":  # the cancel accepted just before the phase changed
            cancel.set()

    with pytest.raises(SeedCancelled, match="before publishing; nothing published"):
        seed_plan(plan, store, tone_render, "tone", progress=False, embedder=shared_embedder(),
                  cancel=cancel, on_progress=progress)
    assert store.current_version() is None and store.versions() == []


def test_a_seed_cancelled_before_its_calibration_does_not_calibrate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 66): a cancel that came while the seed validated (an upload whose answers
    the store all has: nothing to render) or while its last answer rendered was first
    checked once the calibration had ended: seconds for a few hundred questions, minutes for
    ten thousand, on the gateway's CPU beside its calls, for a seed nobody wanted, its lock
    held (every other seed 409) and GET /admin/seed showing it calibrating. It now stops
    before calibrating."""
    store = LocalStore(tmp_path / "store")
    plan = parse_seed_csv(small_faq_csv().encode())
    answers = len({e.answer for e in plan.entries.values() if e.answer})
    calibrated: list[bool] = []
    real_train = seed_module.train_router

    def train(*args, **kwargs):
        calibrated.append(True)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(seed_module, "train_router", train)
    cancel = threading.Event()
    rendered: list[str] = []

    def render(text: str) -> tuple[bytes, int]:
        rendered.append(text)
        if len(rendered) == answers:  # cancelled while its last answer renders
            cancel.set()
        return tone_render(text)

    with pytest.raises(SeedCancelled, match="before calibrating; nothing published"):
        seed_plan(plan, store, render, "tone", progress=False, embedder=shared_embedder(),
                  cancel=cancel)
    assert len(rendered) == answers and calibrated == []
    # Nothing to render (the store has every answer now), cancelled while it validated.
    with pytest.raises(SeedCancelled, match="before calibrating; nothing published"):
        seed_plan(plan, store, render, "tone", progress=False, embedder=shared_embedder(),
                  cancel=cancel)
    assert len(rendered) == answers and calibrated == []
    assert store.current_version() is None and store.versions() == []


def test_renderer_returning_garbage_is_a_render_error(tmp_path: Path,
                                                      intent_embedder: Embedder) -> None:  # noqa: F811
    store = LocalStore(tmp_path)
    with pytest.raises(RenderError, match="no 16-bit PCM"):
        seed(BANK_FAQ, store, lambda text: (b"\x01", 16000), "v", progress=False,
             embedder=intent_embedder)
    assert store.current_version() is None


def test_interrupted_publish_leaves_previous_version_and_no_debris(
        tmp_path: Path, intent_embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store = LocalStore(tmp_path / "store")
    first = seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
                 embedder=intent_embedder)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C while the version is being written

    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        seed(BANK_FAQ, store, CountingRender(), "voice-a", progress=False,
             embedder=intent_embedder)
    monkeypatch.undo()
    assert store.current_version() == first.version
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == [first.version]
    assert load_cache(store, intent_embedder).version == first.version


def _local_client(store_dir) -> TestClient:
    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(store_dir),
                              "admin_token": ADMIN_TOKEN}, environ={})
    services = Services(settings)
    tts = SimpleNamespace(name="fake", voice_id="fake", sample_rate=16000,
                          synthesize_all=lambda text: b"\x00\x01" * 1600)
    services._runtime = SimpleNamespace(stats=services.stats, tts=tts,  # warm, no lifespan
                                        embedder=shared_embedder(), load_times_s={})
    services.responder = object()
    services.cache = FaqCache(LocalStore(store_dir), embedder=shared_embedder())
    client = TestClient(create_app(settings, services=services), raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    return client


def test_a_full_disk_under_the_local_store_is_a_clear_error_not_a_bare_500(
        tmp_path, monkeypatch) -> None:
    """The operator uploads a seed (POST /admin/seed) to a gateway whose store directory's
    disk is full. LocalStore lets the OSError out (only reads are turned into StoreError),
    the admin API does not expect it, and the operator gets Starlette's bare text/plain
    "Internal Server Error" with no reason (the CLI prints a traceback). It should answer
    like an unreachable Redis does: JSON, the store's reason (no space left), "the
    previous version keeps serving"."""
    def disk_full(path, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "_write_synced", disk_full)
    client = _local_client(tmp_path / "store")
    response = client.post("/admin/seed", content=small_faq_csv(),
                           headers={"Content-Type": "text/csv"})
    assert response.headers["content-type"].startswith("application/json"), (
        f"POST /admin/seed with the disk full answered {response.status_code} "
        f"{response.headers['content-type']}: {response.text[:200]!r}")
    assert "No space left" in response.json()["error"]


def test_an_upload_published_but_not_loadable_here_says_which_version_serves(
        tmp_path, monkeypatch) -> None:
    """POST /admin/seed publishes the new version, then this replica loads it. When that load
    fails (here its question vectors are torn on disk), the replica keeps serving the old one
    and /readyz says why, but the upload was answered 200 naming the new version, as if it
    served. It must say the truth: published, not served here, why, and what serves."""
    client = _local_client(tmp_path / "store")
    services = client.app.state.services
    first = client.post("/admin/seed", content=small_faq_csv(),
                        headers={"Content-Type": "text/csv"})
    assert first.status_code == 200, first.text
    serving = first.json()["version"]
    writing = store_module._write_synced

    def torn_vectors(path, data) -> None:
        writing(path, data[:len(data) // 2] if path.name == "vectors.npy" else data)

    monkeypatch.setattr(store_module, "_write_synced", torn_vectors)
    response = client.post("/admin/seed", content=small_faq_csv(),
                           headers={"Content-Type": "text/csv"})
    body = response.json()
    published = services.cache.store.current_version()
    assert published != serving and services.cache.version == serving
    assert services.cache.last_error and published in services.cache.last_error
    assert response.status_code == 500, (
        f"published {published}, this replica serves {serving} ({services.cache.last_error});"
        f" the upload answered {response.status_code}: {body}")
    assert body["version"] == serving and body["published"] == published
    assert body["cache_error"] == services.cache.last_error
    assert published in body["error"] and serving in body["error"]
    assert "published" in body["error"] and "keeps serving" in body["error"]
    assert body["report"]["version"] == published


@pytest.mark.parametrize("manifest", ["[]", "null", '"v"'], ids=["list", "null", "string"])
def test_a_manifest_that_is_json_but_no_object_is_a_bad_version_a_seed_replaces(
        tmp_path: Path, manifest: str) -> None:
    """Review (stop 67): a version's manifest.json that parses but is no JSON object (a list,
    null) made the store's read raise AttributeError, not StoreError: the whole upload that
    replaces the bad version (what the error advises) failed with a 500. Now the read says
    the version is bad, and the upload publishes over it."""
    store_dir = tmp_path / "store"
    first = _local_client(store_dir).post("/admin/seed", content=small_faq_csv(),
                                          headers={"Content-Type": "text/csv"})
    assert first.status_code == 200, first.text
    bad = first.json()["version"]
    (store_dir / "versions" / bad / "manifest.json").write_text(manifest, encoding="utf-8")
    with pytest.raises(StoreError, match=f"cache version {bad}") as raised:
        LocalStore(store_dir).read()
    assert not isinstance(raised.value, StoreUnavailable), raised.value

    client = _local_client(store_dir)  # a replica started since: it cannot load the bad one
    assert client.app.state.services.cache.refresh() is False
    response = client.post("/admin/seed", content=small_faq_csv(),
                           headers={"Content-Type": "text/csv"})
    assert response.status_code == 200, response.text
    assert LocalStore(store_dir).current_version() == response.json()["version"] != bad


def test_a_full_disk_while_publishing_a_version_leaves_the_previous_one_and_no_debris(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The version's files or the pointer cannot be written (disk full): a StoreError naming
    the file and the reason (the CLI prints it, "the previous version keeps serving"),
    the pointer unchanged, no half-written version left behind."""
    store = LocalStore(tmp_path / "store")
    first = store.publish(CacheBundle({"entries": []}, np.zeros((1, 4), np.float32), b"m"))
    writing = store_module._write_synced
    for full_after in (1, 3):  # a version file; the pointer (after the version's 3 files)
        written = 0

        def fills_up(path, data) -> None:
            nonlocal written
            if written == full_after:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            written += 1
            writing(path, data)

        monkeypatch.setattr(store_module, "_write_synced", fills_up)
        with pytest.raises(StoreError, match="cannot write .*: No space left on device"):
            store.publish(CacheBundle({"entries": []}, np.zeros((1, 4), np.float32), b"m"))
        monkeypatch.undo()
        assert store.current_version() == first
        assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == [first]


def empty_bundle(*audio: str) -> CacheBundle:
    """A version whose entries' answers are the ``audio`` keys."""
    entries = [{"id": f"e{n}", "intent": f"e{n}", "action": "answer", "answer": "...",
                "questions": ["?"], "audio_key": key} for n, key in enumerate(audio)]
    return CacheBundle({"entries": entries}, np.zeros((1, 4), np.float32), b"m")


def test_a_local_publish_is_durable_before_the_pointer_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local store fsynced the files it wrote but never a directory, so a rename (the
    version's into versions/, an answer's audio into audio/, the pointer's) could be lost in
    a power cut, or reach the disk in another order: CURRENT naming a version, or audio,
    that is not there after the restart. Each rename that publishes must be followed by an
    fsync of its directory, and all of them must come before the pointer's rename."""
    root = (tmp_path / "store").resolve()
    store = LocalStore(root)
    calls: list[tuple[str, str]] = []  # ("fsync", path of the fd) or ("rename", target)
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def recording_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst, **kwargs) -> None:
        replace(src, dst, **kwargs)
        calls.append(("rename", str(dst)))

    def recording_rename(src, dst, **kwargs) -> None:
        rename(src, dst, **kwargs)
        calls.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "rename", recording_rename)
    key = audio_key("Hello.", "voice-a")
    store.put_audio(key, Audio(b"\x01\x00\x02\x00", 8000))
    version = store.publish(empty_bundle(key))
    monkeypatch.undo()

    def index(kind: str, path: Path, start: int = 0) -> int | None:
        return next((i for i, call in enumerate(calls)
                     if i >= start and call == (kind, str(path))), None)

    versions, staging = root / "versions", root / "versions" / f".staging-{version}"
    pointer = index("rename", root / "CURRENT")
    moved = index("rename", versions / version)
    audio_in = index("rename", root / "audio" / f"{key}.wav")
    assert None not in (pointer, moved, audio_in), calls
    missing = [name for name, found in (
        *((f"fsync {n} before the version's rename", index("fsync", staging / n))
          for n in ("manifest.json", "vectors.npy", "classifier.joblib")),
        ("fsync the staging directory (its files' names) before its rename",
         index("fsync", staging)),
        ("fsync store/ (new versions/ and audio/ directories) before the pointer moves",
         index("fsync", root)),
        ("fsync versions/ after the version's rename, before the pointer's",
         index("fsync", versions, moved)),
        ("fsync audio/ after the audio's rename, before the pointer's",
         index("fsync", root / "audio", audio_in)),
    ) if found is None or found > pointer]
    if index("fsync", root, pointer) is None:
        missing.append("fsync store/ after the pointer's rename")
    shown = [(kind, os.path.relpath(path, root)) for kind, path in calls]
    assert not missing, f"missing: {missing}; the calls: {shown}"


def test_the_local_store_keeps_the_newest_ten_versions(tmp_path: Path) -> None:
    """Every seed and admin edit publishes a version directory; nothing deleted them, so
    the store's disk filled up with every version ever published. After a publish only
    the newest ten (cache_versions_kept's default) are left."""
    store = LocalStore(tmp_path / "store")
    names = [store.publish(empty_bundle()) for _ in range(12)]
    assert store.versions() == sorted(names[2:])
    assert store.current_version() == names[-1] and store.read()[0] == names[-1]


def test_the_local_store_deletes_audio_no_kept_version_names_after_the_grace(
        tmp_path: Path) -> None:
    now = [1000.0]
    store = LocalStore(tmp_path / "store", keep_versions=1, audio_grace_s=100,
                       clock=lambda: now[0])
    clip = Audio(b"\x01\x00\x02\x00", 8000)
    a, b, c = (audio_key(text, "voice-a") for text in "ABC")
    for key in (a, b, c):
        store.put_audio(key, clip)

    def publish(*keys: str) -> str:
        now[0] += 1  # publish times are this clock's
        return store.publish(empty_bundle(*keys))

    first = publish(a)
    second = publish(b)
    assert store.versions() == [second] and first != second
    assert all(store.has_audio(k) for k in (a, b, c))  # within the grace
    now[0] += 200
    assert store.claim_audio(c)  # a seed is about to reuse c: no version names it yet
    third = publish(b)
    assert [k for k in (a, b, c) if store.has_audio(k)] == [b, c]
    assert store.versions() == [third]

    # A seed that outran the grace: its audio is gone by the time it publishes. Refused.
    (tmp_path / "store" / "audio" / f"{c}.wav").unlink()
    with pytest.raises(StoreError, match="names audio the store does not have"):
        publish(c)
    assert store.current_version() == third and store.versions() == [third]
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == [third]


def test_a_failed_local_clean_up_never_fails_the_publish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    counted: list[bool] = []
    store.on_cleanup_failed = lambda: counted.append(True)

    def unreadable() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "audio")

    monkeypatch.setattr(store, "_clean_up", unreadable)
    version = store.publish(empty_bundle())  # an OSError after the pointer moved
    assert store.current_version() == version and store.read()[0] == version
    assert store.cleanup_failures == 1 and counted == [True]


def test_audio_key_is_a_content_hash() -> None:
    assert audio_key("Hello.", "v1") == audio_key("Hello.", "v1")
    assert audio_key("Hello.", "v1") != audio_key("Hello!", "v1")
    assert audio_key("Hello.", "v1") != audio_key("Hello.", "v2")


def _interrupt_waiting_for_the_publish_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    flock = store_module.fcntl.flock

    def interrupted(fd, operation) -> None:
        if operation == store_module.fcntl.LOCK_EX:
            raise KeyboardInterrupt  # Ctrl-C while another process publishes
        flock(fd, operation)

    monkeypatch.setattr(store_module.fcntl, "flock", interrupted)


def _interrupt_before_the_pointer_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(path, data) -> None:
        raise KeyboardInterrupt  # the version is renamed into place, the pointer not yet

    monkeypatch.setattr(store_module, "_atomic_write", interrupted)


@pytest.mark.parametrize("stop", ["refused under the lock", "Ctrl-C waiting for the lock",
                                  "Ctrl-C before the pointer moves"])
def test_a_publish_stopped_at_any_point_leaves_no_debris(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str) -> None:
    """Its staging directory (or the version renamed from it) was left in versions/ by
    every failure after the write of its files, and nothing ever deleted it."""
    store = LocalStore(tmp_path / "store")
    first = store.publish(empty_bundle())
    bundle = empty_bundle()
    if stop == "refused under the lock":
        bundle = empty_bundle("not-an-audio-key")  # has_audio refuses it under the lock
    elif stop == "Ctrl-C waiting for the lock":
        _interrupt_waiting_for_the_publish_lock(monkeypatch)
    else:
        _interrupt_before_the_pointer_moves(monkeypatch)
    with pytest.raises((StoreError, KeyboardInterrupt)):
        store.publish(bundle)
    monkeypatch.undo()
    assert store.current_version() == first and store.read()[0] == first
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == [first]


def test_a_publish_interrupted_after_the_pointer_moved_keeps_its_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    store.publish(empty_bundle())

    def interrupted() -> None:
        raise KeyboardInterrupt  # during the clean-up: the version is already current

    monkeypatch.setattr(store, "_clean_up", interrupted)
    names_before = set((tmp_path / "store" / "versions").iterdir())
    with pytest.raises(KeyboardInterrupt):
        store.publish(empty_bundle())
    monkeypatch.undo()
    current = store.current_version()
    assert current is not None and store.read()[0] == current
    assert (tmp_path / "store" / "versions" / current) not in names_before


def test_a_publish_sweeps_the_staging_directories_of_a_publisher_that_died(
        tmp_path: Path) -> None:
    """A seed killed while writing its version (SIGKILL, a crash, a power cut) runs no
    clean-up: its `.staging-*` directory stayed in versions/ for ever. The next publish
    deletes it, but never one a running publish may still own: one that is recent, or
    whose lock a publish holds (it is held until the directory is renamed into place)."""
    now = 2_000_000_000.0
    store = LocalStore(tmp_path / "store", clock=lambda: now)
    first = store.publish(empty_bundle())
    versions = tmp_path / "store" / "versions"

    def staging(name: str, age_s: float) -> Path:
        path = versions / f".staging-{name}"
        path.mkdir()
        (path / "manifest.json").write_text("{}")
        os.utime(path, (now - age_s, now - age_s))  # set after its files: they date it
        return path

    dead = staging("dead", 2 * 3600)  # a crashed seed's, hours ago
    recent = staging("recent", 60)
    owned = staging("owned", 2 * 3600)
    held = os.open(owned, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_SH)  # as a publish in another process holds it
        second = store.publish(empty_bundle())
    finally:
        os.close(held)
    assert not dead.exists()
    assert recent.is_dir() and owned.is_dir() and (owned / "manifest.json").is_file()
    assert store.current_version() == second and store.read()[0] == second
    assert store.versions() == sorted([first, second])


def test_a_publish_deletes_the_stale_temporary_files_of_writes_that_died(
        tmp_path: Path) -> None:
    """Audio and the pointer are written to `.<name>.<hex>.tmp` and renamed into place; a
    process killed between the two left the temporary file for ever. The clean-up after a
    publish deletes one once it is older than the audio grace (by the store's clock), never
    a recent one (a seed in another process may be about to rename it) and never anything
    else, however old."""
    now = [2_000_000_000.0]
    store = LocalStore(tmp_path / "store", audio_grace_s=100, clock=lambda: now[0])
    root = tmp_path / "store"
    key, other = (audio_key(text, "voice-a") for text in "AB")
    store.put_audio(key, Audio(b"\x01\x00\x02\x00", 8000))
    first = store.publish(empty_bundle(key))

    def aged(path: Path, age_s: float, directory: bool = False) -> Path:
        if directory:
            path.mkdir()
        else:
            path.write_bytes(b"half written")
        os.utime(path, (now[0] - age_s, now[0] - age_s))
        return path

    stale = [aged(root / "audio" / f".{key}.wav.0123abcd.tmp", 200),
             aged(root / "audio" / f".{other}.wav.fedcba98.tmp", 200),
             aged(root / ".CURRENT.89abcdef.tmp", 200)]
    fresh = [aged(root / "audio" / f".{other}.wav.00ff00ff.tmp", 50),
             aged(root / ".CURRENT.ffffffff.tmp", 50)]
    # Old, but not a temporary file of this store's writes: kept.
    unrelated = [aged(root / "audio" / f".{other}.wav.tmp", 200),
                 aged(root / "audio" / f".{other}.wav.0123abcd.tmp.bak", 200),
                 aged(root / "audio" / f".{other}.wav.0123ABCD.tmp", 200),
                 aged(root / "audio" / ".notes.txt.0123abcd.tmp", 200),
                 aged(root / "audio" / f".{other}.wav.11111111.tmp", 200, directory=True),
                 aged(root / ".manifest.json.0123abcd.tmp", 200),
                 aged(root / "versions" / ".CURRENT.0123abcd.tmp", 200),
                 aged(root / "notes.tmp", 200)]
    real = [root / "CURRENT", root / ".publish.lock", root / "audio" / f"{key}.wav",
            *(p for p in (root / "versions" / first).iterdir())]
    os.utime(root / "audio" / f"{key}.wav", (now[0] - 200, now[0] - 200))  # old but named

    now[0] += 1
    second = store.publish(empty_bundle(key))
    assert [p for p in stale if p.exists()] == []
    assert all(p.is_file() for p in fresh)
    assert all(p.exists() for p in unrelated)
    assert store.versions() == sorted([first, second])
    assert all(p.is_file() for p in real)
    assert store.current_version() == second and store.get_audio(key).pcm == b"\x01\x00\x02\x00"


def _published_b(rendered: int = 0) -> SeedReport:
    """A seed's report: version B published."""
    return SeedReport(version="B", entries=1, answer_entries=1, questions=1,
                      rendered=rendered, reused=1 - rendered,
                      thresholds=None)  # type: ignore[arg-type]


class _ServesA:
    """The serving cache, stood in for: it serves A, and a refresh loads B (what the seed
    under test publishes)."""

    version: str | None = "A"
    loaded = None
    last_error: str | None = None
    failed_version: str | None = None
    failed_for_store = False
    store = SimpleNamespace(current_version=lambda: None)  # read for an upload's defaults

    def refresh(self) -> bool:
        self.version = "B"
        return True


def _publisher_seeding(monkeypatch: pytest.MonkeyPatch, seeding: Any, cache: Any) -> Any:
    """A Publisher on ``cache`` whose seeds run ``seeding`` in place of the real one."""
    import gateway.admin.publish as publish

    monkeypatch.setattr(publish, "seed_plan_with_voice", seeding)
    services = SimpleNamespace(cache=cache, runtime=SimpleNamespace(tts=None, embedder=None),
                               settings=Settings())
    return publish.Publisher(services)  # type: ignore[arg-type]


async def test_a_newer_version_that_fails_to_load_here_is_not_blamed_on_this_publish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another replica publishes C right after this upload's B, and C does not load here:
    B's publish succeeded (it was replaced), so it is not reported as B failing to load
    with C's error (nor is a store unreachable for the refresh)."""
    class Cache(_ServesA):
        def refresh(self) -> bool:  # the store's current is C, which cannot be loaded here
            self.last_error = "cannot load cache version C: StoreError: torn"
            self.failed_version = "C"
            return False

    report = _published_b()
    publisher = _publisher_seeding(monkeypatch, lambda *a, **k: report, Cache())
    published = await publisher._publish(plan=None, source="x", target_wrong_rate=0.01,
                                         negatives=())
    assert published is report


def test_a_torn_models_blob_retrained_at_load_is_said_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A version's classifier.joblib cut short (a disk that lost its tail, a copy that
    stopped) can read as "another scikit-learn's" blob, and the load then trains the router
    again, for as long as the seed's calibration took, without a word: the operator sees a
    slow load and no cause. It is to be said (the version, the reason)."""
    store = LocalStore(tmp_path / "store")
    plan_csv = tmp_path / "faq.csv"
    plan_csv.write_text(small_faq_csv(), encoding="utf-8")
    report = seed(plan_csv, store, tone_render, "tone", target_wrong_rate=0.05,
                  progress=False, embedder=shared_embedder())
    blob = tmp_path / "store" / "versions" / report.version / "classifier.joblib"
    whole = blob.read_bytes()
    blob.write_bytes(whole[:len(whole) // 2])  # torn inside an array: a ValueError
    with caplog.at_level("INFO", logger="voicegate.cache"):
        loaded = load_cache(store, shared_embedder())
    assert loaded.version == report.version  # served, retrained from the stored vectors
    said = [r.getMessage() for r in caplog.records if report.version in r.getMessage()]
    assert any("retrain" in m for m in said), caplog.text


@pytest.mark.parametrize("pointer", [b"\xff\xfe20261127T000000Z-abcdef", None],
                         ids=["not-ascii", "a-directory"])
def test_an_unreadable_pointer_is_a_clear_store_error(tmp_path: Path, pointer) -> None:
    # CURRENT edited by hand: a StoreError that names it, so the admin API
    # answers its JSON error and a replica keeps what it serves, never a bare 500.
    store = LocalStore(tmp_path / "store")
    current = tmp_path / "store" / "CURRENT"
    current.parent.mkdir(parents=True, exist_ok=True)
    if pointer is None:
        current.mkdir()
    else:
        current.write_bytes(pointer)
    with pytest.raises(StoreError, match="current-version pointer .*CURRENT.* cannot be read"):
        store.current_version()
    cache = FaqCache(store, embedder=SimpleNamespace(model_name="m", dim=4))
    assert cache.refresh() is False and cache.version is None
    assert cache.last_error is not None and "current-version pointer" in cache.last_error


def test_a_disk_fault_reading_the_pointer_is_an_outage_not_a_bad_pointer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 60): intents/store.py LocalStore.current_version: an EIO reading CURRENT
    (a failing disk, an NFS server gone) was a plain StoreError, which FaqCache takes for
    a pointer that names no version: a replica starting now turns ready with no cache and
    does not wait for the store. The Redis store says StoreUnavailable for a store that
    does not answer; a disk that does not answer is the same outage."""
    store = LocalStore(tmp_path / "store")
    store.publish(empty_bundle())
    pointer = tmp_path / "store" / "CURRENT"
    read_text = Path.read_text

    def failing_disk(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == pointer:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing_disk)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        store.current_version()
    cache = FaqCache(store, embedder=SimpleNamespace(model_name="m", dim=4))
    assert cache.refresh() is False and cache.store_unanswered, cache.last_error


def test_a_disk_fault_reading_a_version_is_an_outage_not_a_bad_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 60): intents/store.py LocalStore.read (and get_audio, which the load reads
    the version's answers with): any OSError reading the version's files was a plain
    StoreError, so an EIO (a failing disk, an NFS server gone) was taken for a bad version:
    FaqCache records it failed, waits its backoff, and a replica starting now turns ready
    with no cache. A disk that does not answer is an outage (StoreUnavailable), as for the
    pointer; a version or file that is not there stays a bad version."""
    store = LocalStore(tmp_path / "store")
    key = audio_key("Hello.", "tone")
    store.put_audio(key, Audio(b"\x00\x01" * 80, 8000))
    version = store.publish(empty_bundle(key))
    manifest = tmp_path / "store" / "versions" / version / "manifest.json"
    read_text = Path.read_text

    def failing_disk(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == manifest:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_text(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(Path, "read_text", failing_disk)
        with pytest.raises(StoreUnavailable, match="Input/output error"):
            store.read()
        cache = FaqCache(store, embedder=SimpleNamespace(model_name="m", dim=4))
        assert cache.refresh() is False and cache.store_unanswered, cache.last_error

    def no_permission(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(args[0]))

    with monkeypatch.context() as patched:
        patched.setattr(store_module.wave, "open", no_permission)
        with pytest.raises(StoreUnavailable, match="Permission denied"):
            store.get_audio(key)

    # Not there: a bad version (or audio), never an outage to wait out.
    for missing in (lambda: store.read("20260101T000000Z-000000"),
                    lambda: store.get_audio(audio_key("Gone.", "tone"))):
        with pytest.raises(StoreError) as raised:
            missing()
        assert not isinstance(raised.value, StoreUnavailable), raised.value
    (tmp_path / "store" / "versions" / version / "vectors.npy").unlink()
    with pytest.raises(StoreError, match="vectors.npy") as raised:
        store.read()
    assert not isinstance(raised.value, StoreUnavailable), raised.value


def test_a_version_with_an_empty_vectors_file_is_a_bad_version(tmp_path: Path) -> None:
    """Review (stop 60): an empty vectors.npy (a disk filled as it was written, a copy cut
    short) made np.load raise EOFError, which LocalStore.read let out bare: the CLI and the
    admin API, which catch StoreError, failed with a traceback instead of naming the version."""
    store = LocalStore(tmp_path / "store")
    key = audio_key("Hello.", "tone")
    store.put_audio(key, Audio(b"\x00\x01" * 80, 8000))
    version = store.publish(empty_bundle(key))
    (tmp_path / "store" / "versions" / version / "vectors.npy").write_bytes(b"")
    with pytest.raises(StoreError, match=f"cannot read cache version {version}") as raised:
        store.read()
    assert not isinstance(raised.value, StoreUnavailable), raised.value


def test_a_seed_replaces_an_unreadable_pointer_as_its_error_advises(tmp_path: Path) -> None:
    """CURRENT restored by hand in an editor that wrote a BOM (Notepad's "UTF-8"): the error
    says "set it back ... or seed again", so a whole seed (which replaces whatever is
    current) must publish. An edit built on a version still cannot tell what it replaces."""
    store = LocalStore(tmp_path / "store")
    first = store.publish(empty_bundle())
    (tmp_path / "store" / "CURRENT").write_bytes(b"\xef\xbb\xbf" + first.encode() + b"\r\n")
    with pytest.raises(StoreError, match="cannot be read as a version name"):
        store.publish(empty_bundle(), replaces=first)
    second = store.publish(empty_bundle())
    assert store.current_version() == second and store.read()[0] == second
    assert sorted(store.versions()) == sorted([first, second])


def _seeded_again_one_answer_changed(tmp_path: Path) -> tuple[
        LocalStore, FaqCache, SeedReport, SeedReport, str, Path]:
    """The small FAQ seeded and loaded, then seeded again with one answer changed: the
    store, the cache (still serving the first version), both seeds' reports, and the
    changed answer's new clip: its audio key and its WAV file."""
    store = LocalStore(tmp_path / "store")
    plan_csv = tmp_path / "faq.csv"
    plan_csv.write_text(small_faq_csv(), encoding="utf-8")
    first = seed(plan_csv, store, tone_render, "tone", target_wrong_rate=0.05,
                 progress=False, embedder=shared_embedder())
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh() and cache.version == first.version
    changed = next(e.answer for e in cache.loaded.entries.values()
                   if e.action is Action.ANSWER)
    plan_csv.write_text(small_faq_csv().replace(changed, changed + " Thank you."),
                        encoding="utf-8")
    second = seed(plan_csv, store, tone_render, "tone", target_wrong_rate=0.05,
                  progress=False, embedder=shared_embedder())
    (key,) = ({e["audio_key"] for e in store.read(second.version)[1].manifest["entries"]}
              - {e["audio_key"] for e in store.read(first.version)[1].manifest["entries"]})
    return store, cache, first, second, key, tmp_path / "store" / "audio" / f"{key}.wav"


def _lose_its_tail(wav: Path) -> bytes:
    """The file cut short by 200 whole samples (an even cut, as a disk that lost its tail
    leaves it); what it held before."""
    whole = wav.read_bytes()
    wav.write_bytes(whole[:len(whole) - 400])
    return whole


def test_a_version_whose_audio_cannot_be_held_leaves_the_serving_one_and_says_why(
        tmp_path: Path) -> None:
    """A new version loads (its manifest, models and audio read back) but one of its clips
    cannot be converted to the call formats: a WAV cut short inside a sample (a disk that
    lost its tail) read as an odd number of bytes of 16-bit PCM (since stop 67 the store
    refuses it first, as any WAV shorter than its header says). The replica must keep
    serving the old version whole, and say why as for any load that fails (/readyz
    cache_error, the poll tries again), not let the error escape the refresh unreported."""
    store, cache, first, second, key, wav = _seeded_again_one_answer_changed(tmp_path)
    clips = [e.id for e in cache.loaded.entries.values() if e.action is Action.ANSWER]
    before = {key: (cache.audio.clip(key), cache.audio.audio(key, 8000)) for key in clips}
    assert second.rendered == 1
    wav.write_bytes(wav.read_bytes()[:-1])  # torn inside its last sample

    try:
        loaded = cache.refresh()
    except Exception as exc:
        pytest.fail(f"loading {second.version} (a torn clip) raised {type(exc).__name__}: "
                    f"{exc} out of the refresh; cache_error={cache.last_error!r}")
    assert loaded is False and cache.version == first.version
    assert cache.failed_version == second.version
    assert cache.last_error and second.version in cache.last_error
    assert key in cache.last_error  # which clip's file
    assert {key: (cache.audio.clip(key), cache.audio.audio(key, 8000))
            for key in clips} == before


def test_a_version_whose_audio_file_lost_its_tail_is_refused_not_served_cut_short(
        tmp_path: Path) -> None:
    """Review (stop 67): a WAV cut short on a sample boundary (a disk that lost its tail, a
    copy that did not finish) read back as shorter audio, not an error: the replica served
    the answer cut off mid-word. Now the store refuses it (fewer frames than its header
    says) and the replica keeps serving the previous version and says which file."""
    store, cache, first, second, key, wav = _seeded_again_one_answer_changed(tmp_path)
    _lose_its_tail(wav)

    with pytest.raises(StoreError, match="cut short") as raised:
        store.get_audio(key)
    assert not isinstance(raised.value, StoreUnavailable), raised.value
    assert cache.refresh() is False and cache.version == first.version
    assert cache.failed_version == second.version
    assert cache.last_error and key in cache.last_error


def test_a_seed_renders_again_an_answer_whose_audio_file_lost_its_tail(
        tmp_path: Path) -> None:
    """Review (stop 67): a seed reused any audio file that existed, so an answer's WAV cut
    short on disk was published again by every seed: the version failed to load ("cut
    short") however often the operator seeded again, as the error advises. Now a seed
    renders such an answer again (the file is replaced whole) and the version loads."""
    store = LocalStore(tmp_path / "store")
    plan_csv = tmp_path / "faq.csv"
    plan_csv.write_text(small_faq_csv(), encoding="utf-8")
    first = seed(plan_csv, store, tone_render, "tone", target_wrong_rate=0.05,
                 progress=False, embedder=shared_embedder())
    key = next(e["audio_key"] for e in store.read(first.version)[1].manifest["entries"]
               if e["audio_key"])
    wav = tmp_path / "store" / "audio" / f"{key}.wav"
    whole = _lose_its_tail(wav)

    again = CountingRender()
    second = seed(plan_csv, store, again, "tone", target_wrong_rate=0.05,
                  progress=False, embedder=shared_embedder())
    assert (second.rendered, second.reused) == (1, first.rendered - 1)
    assert wav.read_bytes() == whole
    cache = FaqCache(store, shared_embedder())
    assert cache.refresh() and cache.version == second.version, cache.last_error


def test_a_version_that_fails_to_load_is_tried_again_later_not_at_every_poll(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Loading a version reads all its audio and models (retraining them when their blob
    # does not load): one that keeps failing must not be loaded again at every 2 s poll
    # beside live calls. It is tried after 10 s, doubling to 5 min; a store that did not
    # answer is asked again at the next poll; a newer version is loaded at once.
    import gateway.faq_cache as faq_cache
    from gateway.clock import ManualClock
    from intents.store import StoreUnavailable

    class Pointer:
        current = "v2"

        def current_version(self) -> str:
            return self.current

    attempts: list[str] = []
    failure: list[Exception] = [ValueError("torn clip")]

    def load(store, embedder, version):
        attempts.append(version)
        raise failure[0]

    monkeypatch.setattr(faq_cache, "load_cache", load)
    clock = ManualClock()
    cache = FaqCache(Pointer(), embedder=None, clock=clock)  # type: ignore[arg-type]
    polls = [0.0, 2.0, 8.0, 10.0, 12.0, 29.0, 30.0, 40.0, 70.0]  # seconds since the first
    tried_at = []
    for t in polls:
        clock._now = 1000.0 + t
        count = len(attempts)
        assert cache.refresh() is False
        if len(attempts) > count:
            tried_at.append(t)
        assert cache.failed_version == "v2" and "torn clip" in (cache.last_error or "")
    assert tried_at == [0.0, 10.0, 30.0, 70.0]  # 10 s, then 20, then 40
    failure[0] = StoreUnavailable("Redis at redis://cache is unreachable (read): timeout")
    clock._now += 80.0
    cache.refresh()
    cache.refresh()  # not answered: asked again at once, no wait grown
    assert attempts[-2:] == ["v2", "v2"]
    cache.store.current = "v3"  # a newer version: loaded at once
    cache.refresh()
    assert attempts[-1] == "v3"


@pytest.mark.parametrize("published", [False, True], ids=["stops-rendering", "was-publishing"])
async def test_a_cancelled_seed_request_holds_the_lock_until_its_thread_ends(
        monkeypatch: pytest.MonkeyPatch, published: bool) -> None:
    """An upload's request cancelled while its seed renders (the server shutting down past
    its grace, a client gone behind a proxy that cancels) released the seed lock at once,
    while the worker thread it cannot stop rendered on and could publish: a second seed
    started beside it. The thread is now asked to stop (as DELETE /admin/seed asks), the
    lock is held until it has ended, and the status says how it really ended."""
    import asyncio

    import gateway.admin.publish as publish
    from cache_seed.seed import SeedReport

    rendering, release = threading.Event(), threading.Event()
    report = _published_b(rendered=1)

    def rendering_seed(*args, **kwargs) -> SeedReport:  # seed_plan_with_voice's thread
        cancel: threading.Event = args[10]
        rendering.set()
        assert release.wait(timeout=30), "the test never let the seed go on"
        if not published and cancel.is_set():  # checked before its next answer
            raise SeedCancelled("seed cancelled after rendering 1 of 4 new answers; "
                                "nothing published")
        return report  # already publishing when asked: a publish under way completes

    publisher = _publisher_seeding(monkeypatch, rendering_seed, _ServesA())
    upload = asyncio.ensure_future(publisher.seed_csv(small_faq_csv().encode(), "faq.csv"))
    try:
        assert await asyncio.to_thread(rendering.wait, 30)
        upload.cancel()
        for _ in range(20):  # every step the cancelled request takes on its own
            await asyncio.sleep(0)
        assert not upload.done(), "the request ended while its seed's thread still renders"
        assert publisher.lock.locked()
        running = publisher.status.snapshot()
        assert (running["running"], running["cancelling"]) == (True, True), running
        with pytest.raises(publish.SeedBusy):
            await publisher.seed_csv(small_faq_csv().encode(), "second.csv")
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert not publisher.lock.locked()
    last = publisher.status.snapshot()["last"]
    if published:
        assert (last["outcome"], last["version"], last["error"]) == ("published", "B", None)
    else:
        assert (last["outcome"], last["version"]) == ("cancelled", None), last
        assert last["error"].startswith("seed cancelled after rendering 1 of 4"), last

async def test_a_store_blip_while_loading_the_new_version_is_not_published_not_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the upload published B; the refresh right after read the pointer (B), then Redis
    timed out while B's hash / audio were read (StoreUnavailable). Publisher._publish says
    itself that "the store unreachable for the refresh" is no failure of this publish ("the
    poll loads ours when it answers again"), and FaqCache retries an unavailable store at the
    next poll, not after 10 s. Yet FaqCache records B as failed_version, so the upload answers
    500 PublishedNotServed ("tries it again after 10 s ... fix the cause and seed again") and
    GET /admin/seed says the seed failed."""
    import gateway.admin.publish as publish
    import gateway.faq_cache as faq_cache

    class Store:
        current = "A"

        def current_version(self) -> str:
            return self.current

        def read(self, version: str | None = None) -> Any:
            # An upload's defaults: A cannot be read, so memory's copy (a store that does not
            # answer here refuses the upload since stop 60: not this test's blip).
            raise StoreError(f"version {version} is incomplete")

    store = Store()
    report = _published_b()

    def seeded(*args, **kwargs) -> SeedReport:  # the seed's thread: B is now current
        store.current = "B"
        return report

    def load(store_, embedder, version):
        raise StoreUnavailable("Redis at redis://cache is unreachable (read): Timeout")

    monkeypatch.setattr(faq_cache, "load_cache", load)
    cache = FaqCache(store, embedder=None, clock=ManualClock())  # type: ignore[arg-type]
    publisher = _publisher_seeding(monkeypatch, seeded, cache)
    try:
        published = await publisher.seed_csv(small_faq_csv().encode(), "faq.csv")
    except publish.PublishedNotServed as exc:
        pytest.fail(f"a transient store failure during the post-publish load was reported as "
                    f"the publish's own version failing to load: {exc}; status "
                    f"{publisher.status.snapshot()['last']}")
    assert published is report
    assert publisher.status.snapshot()["last"]["outcome"] == "published"


async def test_a_seed_whose_swap_went_unanswered_is_not_shown_as_failed_unpublished(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (stop 70): Redis stopped answering during the pointer swap (a stall, a lost
    connection), so whether version B was published is unknown; the upload's own answer (503)
    says so. GET /admin/seed then showed it ended "failed", version null (how a seed that
    published nothing ends), and the dashboard's panel read "failed while publishing: nothing
    published" above the error saying the opposite; B may well be serving everywhere. It
    ends "unconfirmed", and the error says how to tell."""
    from intents.redis_store import unconfirmed_message
    from intents.store import PublishUnconfirmed

    def seeded(*args, **kwargs) -> SeedReport:
        lost = StoreUnavailable("Redis at redis://cache is unreachable (publish: move "
                                "pointer): Timeout reading from socket")
        raise PublishUnconfirmed(unconfirmed_message("B", lost))

    publisher = _publisher_seeding(monkeypatch, seeded, _ServesA())
    with pytest.raises(PublishUnconfirmed):
        await publisher.seed_csv(small_faq_csv().encode(), "faq.csv")
    last = publisher.status.snapshot()["last"]
    assert (last["outcome"], last["version"]) == ("unconfirmed", None), last
    assert "whether version B was published is unknown" in last["error"], last


async def test_a_shutdown_during_a_swap_redis_never_answered_is_not_logged_as_unpublished(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Review (stop 70): the replica shut down while the seed wrote its version, and Redis
    never answered its pointer swap (whether B was published is unknown). The shutdown
    logged seed_cancelled_at_shutdown, "nothing was published, the previous version keeps
    serving; seed again", over an error saying the opposite. It is logged as
    seed_unconfirmed_at_shutdown, the error saying how to tell."""
    import logging

    from cache_seed import SeedProgress
    from intents.redis_store import unconfirmed_message
    from intents.store import PublishUnconfirmed

    caplog.set_level(logging.INFO, logger="voicegate")
    writing, release = threading.Event(), threading.Event()

    def seeded(*args, **kwargs) -> SeedReport:
        args[11](SeedProgress("publishing", 1, 1, 0))  # on_progress: Store.publish begins
        writing.set()
        assert release.wait(timeout=30)
        lost = StoreUnavailable("Redis at redis://cache is unreachable (publish: move "
                                "pointer): Timeout reading from socket")
        raise PublishUnconfirmed(unconfirmed_message("B", lost))

    publisher = _publisher_seeding(monkeypatch, seeded, _ServesA())
    upload = asyncio.ensure_future(publisher.seed_csv(small_faq_csv().encode(), "faq.csv"))
    try:
        assert await asyncio.to_thread(writing.wait, 30)
        stopping = asyncio.ensure_future(publisher.shut_down(30.0))
        await asyncio.sleep(0)
    finally:
        release.set()
    await stopping
    with pytest.raises(PublishUnconfirmed):
        await upload
    said = {r.getMessage(): r for r in caplog.records if "_at_shutdown" in r.getMessage()}
    assert list(said) == ["seed_unconfirmed_at_shutdown"], list(said)
    fields = said["seed_unconfirmed_at_shutdown"].fields  # type: ignore[attr-defined]
    assert "whether version B was published is unknown" in fields["error"], fields


async def test_a_cancel_just_after_the_publish_is_not_accepted_as_if_it_could_stop_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the seed has published B (the store's pointer names it) and this replica is
    loading B (cache.refresh: reading and converting all of B's audio, seconds to minutes for
    a large seed). DELETE /admin/seed meanwhile is accepted: Publisher.cancel() returns True, the
    route answers 202 "cancelling ... publishes nothing", and GET /admin/seed shows
    running, phase "publishing", cancelling: true, with no word that B is already current.
    Nothing can be stopped any more; the seed then ends "published". The cancel should be
    refused (or the status say it is published) once the pointer has moved."""
    report = _published_b()
    loading, release = threading.Event(), threading.Event()

    class Cache(_ServesA):
        def refresh(self) -> bool:  # loading B, which the store already serves
            loading.set()
            assert release.wait(timeout=30)
            return super().refresh()

    publisher = _publisher_seeding(monkeypatch, lambda *a, **k: report, Cache())
    upload = asyncio.ensure_future(publisher.seed_csv(small_faq_csv().encode(), "faq.csv"))
    try:
        assert await asyncio.to_thread(loading.wait, 30)
        accepted = publisher.cancel()
        during = publisher.status.snapshot()
    finally:
        release.set()
    assert await upload is report
    last = publisher.status.snapshot()["last"]
    assert (last["outcome"], last["version"]) == ("published", "B")
    assert not accepted, (
        f"B was already published, yet DELETE /admin/seed was accepted (202 'cancelling', "
        f"'publishes nothing'); GET /admin/seed meanwhile: {during}")


async def test_a_seed_that_holds_the_lock_can_be_cancelled_and_is_shown_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: Publisher._seed took the lock and only scheduled the seed's task; the task set
    ``_cancel`` and starts the status on its first step. In between (one loop iteration, in
    which other requests' handlers run), a second upload gets 409 "another seed is running"
    while DELETE /admin/seed answers 409 "no seed is running: nothing to cancel" and GET
    /admin/seed says running: false; the operator's cancel is lost and the seed publishes."""
    import gateway.admin.publish as publish

    report = _published_b()
    seen_cancel: list[bool] = []

    def seeded(*args, **kwargs) -> SeedReport:
        cancel: threading.Event = args[10]
        seen_cancel.append(cancel.is_set())
        return report

    publisher = _publisher_seeding(monkeypatch, seeded, _ServesA())
    upload = asyncio.ensure_future(publisher.seed_csv(small_faq_csv().encode(), "faq.csv"))
    await asyncio.sleep(0)  # the upload's handler ran up to its wait for the seed's task
    with pytest.raises(publish.SeedBusy):
        await publisher.seed_csv(small_faq_csv().encode(), "second.csv")
    running = publisher.status.snapshot()["running"]
    accepted = publisher.cancel()
    await upload
    assert (accepted, running) == (True, True), (
        f"a second upload was refused as busy, yet DELETE /admin/seed found no seed "
        f"(cancel() -> {accepted}) and GET /admin/seed said running={running}; the seed then "
        f"published {publisher.status.snapshot()['last']['version']}")


def test_voicegate_seed_reads_a_csv_given_as_a_pipe_once(tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    """Review (stop 68): `voicegate seed <(curl -s "$SHEET_CSV_URL")` (or /dev/stdin) gave a
    pipe: the command read it to validate the rows before loading the voice, then the seed
    read the path again, found it drained and refused it, "line 1: missing columns question,
    answer: the file is empty", once the voice and the embedder had loaded. The CSV is read
    once; the rows validated are the rows published."""
    import gateway.providers.registry
    import gateway.runtime
    from gateway import cli

    voice = SimpleNamespace(name="tone", audio_id="tone", sample_rate=8000,
                            synthesize_all=lambda text: tone_render(text)[0])
    monkeypatch.setattr(gateway.providers.registry, "create_tts", lambda s, ex: voice)
    monkeypatch.setattr(gateway.runtime, "build_embedder", lambda s, **_: shared_embedder())
    for name in ("VOICEGATE_CONFIG", "VOICEGATE_STORE_DIR", "VOICEGATE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    read, write = os.pipe()
    os.write(write, b"question,answer\nWhen are you open?,Nine to five.\n"
                    b"Where are you?,On Main Street.\n")
    os.close(write)
    store = tmp_path / "store"
    try:
        status = cli.main(["seed", f"/proc/self/fd/{read}", "--store", str(store), "--quiet"])
    finally:
        os.close(read)
    err = capsys.readouterr().err
    assert status == 0, err
    manifest = LocalStore(store).read()[1].manifest
    assert [q["text"] for q in manifest["questions"]] == ["When are you open?",
                                                          "Where are you?"]


def test_voicegate_seed_does_not_undo_a_version_published_while_it_ran(
        tmp_path: Path, monkeypatch, capsys) -> None:
    """Review (stop 69): `voicegate seed` published over whatever was current when its
    calibration ended (Store.publish with any version): an answer corrected through the admin
    API while the command rendered and calibrated (minutes for a large seed), answered 200,
    was silently undone, where an upload through the admin API refuses that (409). The
    command publishes only over the version current when it began: the other version keeps
    serving, and it says so and exits 1."""
    import gateway.providers.registry
    import gateway.runtime
    from gateway import cli

    store = tmp_path / "store"
    empty = lambda: CacheBundle({"entries": [], "questions": []},  # noqa: E731
                                np.zeros((0, 4), np.float32), b"")
    before = LocalStore(store).publish(empty())
    edited: list[str] = []

    def synthesize_all(text: str) -> bytes:  # meanwhile, an edit through the admin API
        if not edited:
            edited.append(LocalStore(store).publish(empty()))
        return tone_render(text)[0]

    voice = SimpleNamespace(name="tone", audio_id="tone", sample_rate=8000,
                            synthesize_all=synthesize_all)
    monkeypatch.setattr(gateway.providers.registry, "create_tts", lambda s, ex: voice)
    monkeypatch.setattr(gateway.runtime, "build_embedder", lambda s, **_: shared_embedder())
    for name in ("VOICEGATE_CONFIG", "VOICEGATE_STORE_DIR", "VOICEGATE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    csv_path = tmp_path / "faq.csv"
    csv_path.write_text("question,answer\nWhen are you open?,Nine to five.\n"
                        "Where are you?,On Main Street.\n", encoding="utf-8")
    status = cli.main(["seed", str(csv_path), "--store", str(store), "--quiet"])
    err = capsys.readouterr().err
    assert edited and edited[0] != before
    assert LocalStore(store).current_version() == edited[0], (
        f"the version published while the seed ran was replaced (status {status}): {err}")
    assert status == 1
    assert f"built on version {before}, and {edited[0]} is now current" in err
    assert "nothing was published" in err and "seed again" in err
