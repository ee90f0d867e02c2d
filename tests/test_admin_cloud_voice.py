"""The admin API publishing with a cloud voice: the real elevenlabs SDK against the local fake.

The voice's HTTP client belongs to the serving event loop; seeding runs on a worker thread
and must hand each synthesis to that loop (a private loop fails: "bound to a different
event loop")."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.audio_bank import AudioBank
from gateway.providers.elevenlabs_tts import ElevenLabsTTS
from tests.admin_support import admin, seed_small, small_faq_csv, start_admin_server
from tests.fakes.elevenlabs_server import MS_PER_CHAR, FakeElevenLabs
from tests.fakes.server import ServerThread

pytestmark = pytest.mark.slow


@pytest.fixture
def cloud_server(tmp_path, settings, runtime):
    fake = FakeElevenLabs()
    with ServerThread(fake.app) as voice_api:
        root = tmp_path / "store"
        seed_small(root, runtime)  # the first version, with the local voice
        tts = ElevenLabsTTS("test-key", voice_id="cloud-voice", base_url=voice_api.url)
        cloud = dataclasses.replace(runtime, tts=tts, prompts=AudioBank())
        server = start_admin_server(settings, cloud, root)
        try:
            yield fake, server
        finally:
            server.stop()


def test_entries_and_seeds_render_with_a_cloud_voice(cloud_server):
    fake, server = cloud_server
    answer = "We are open on public holidays from ten to two."
    with admin(server) as client:
        created = client.post("/admin/entries", json={
            "intent": "holiday_hours", "answer": answer, "action": "answer",
            "questions": ["are you open on public holidays", "holiday opening hours",
                          "do branches open on bank holidays"]})
        assert created.status_code == 201, created.text
        entry = created.json()["entry"]
        assert entry["audio_s"] == pytest.approx(len(answer) * MS_PER_CHAR / 1000, abs=0.01)
        assert any(r["text"] == answer and r["voice_id"] == "cloud-voice"
                   for r in fake.requests)
        seeded = client.post("/admin/seed", content=small_faq_csv().encode(),
                             headers={"Content-Type": "text/csv"},
                             params={"target_wrong_rate": "0.05"})
        assert seeded.status_code == 200, seeded.text
        assert seeded.json()["report"]["entries"] >= 5
