"""Shared pieces of the admin API and dashboard tests: a small seed and a gateway with a token."""

from __future__ import annotations

import csv
import io
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx

from gateway.seeding import seed_with_voice
from gateway.server import BackgroundServer
from intents.store import LocalStore

BANK_FAQ = Path(__file__).resolve().parents[1] / "cache_seed" / "examples" / "bank_faq.csv"
TOKEN = "admin-test-token-0f3c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Small on purpose: rendering uses the real voice (about half a second per answer). A seed this
# small only calibrates to cache hits with a looser wrong-answer target than the CLI's 1 %.
SMALL_INTENTS = ("opening_hours", "routing_number", "swift_code", "reset_online_password",
                 "account_balance", "speak_to_person")
SMALL_TARGET_WRONG_RATE = 0.05


def small_faq_csv(intents: tuple[str, ...] = SMALL_INTENTS) -> str:
    """The example bank FAQ's rows for a few intents, as CSV text."""
    with open(BANK_FAQ, encoding="utf-8", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["intent"] in intents]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["question", "answer", "intent", "action"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class GatedVoice:
    """A voice whose syntheses wait to be let go (``release``): a seed stays under way,
    rendering its answer number ``free + 1`` (``rendering`` is set), until the test says;
    the ``free`` first answers render at once. It cannot render the start-up prompts: a
    gateway on it needs them rendered into the shared runtime by a gateway on the real voice
    started before (a test asks for that server's fixture)."""

    name = "gated"
    audio_id = "gated-test-voice"  # no audio of the seeded store: every answer is new
    sample_rate = 16000

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.rendering = threading.Event()
        self.release = threading.Event()
        self.texts: list[str] = []

    def synthesize_all(self, text: str) -> bytes:
        self.texts.append(text)
        if len(self.texts) <= self.free:
            return b"\x01\x00" * 1600
        self.rendering.set()
        if not self.release.wait(timeout=120):
            raise AssertionError("the test never released the voice")
        return b"\x01\x00" * 1600


def seed_small(root: Path, runtime) -> str:
    csv_path = root.parent / f"{root.name}-seed.csv"
    csv_path.write_text(small_faq_csv(), encoding="utf-8")
    report = seed_with_voice(csv_path, LocalStore(root), runtime.tts, runtime.embedder,
                             target_wrong_rate=SMALL_TARGET_WRONG_RATE, progress=False)
    return report.version


def start_admin_server(settings, runtime, store_dir: Path, token: str = TOKEN) -> BackgroundServer:
    # A long poll: a change made through the admin API must serve without waiting for it.
    return BackgroundServer(settings.replace(store_dir=str(store_dir),
                                                admin_token=token, cache_poll_s=600.0),
                            runtime).start()


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def admin(server: BackgroundServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120)


def serving_version(server: BackgroundServer) -> str | None:
    return httpx.get(server.base_url + "/readyz", timeout=10).json()["cache_version"]


def warm_app(store_dir: Path, clock: Any) -> Any:
    """A gateway app with the admin API on that counts as warm (no lifespan, no models) on
    ``clock``: for requests refused before anything is rendered."""
    from types import SimpleNamespace

    from gateway.app import create_app
    from gateway.faq_cache import FaqCache
    from gateway.services import Services
    from gateway.settings import Settings

    settings = Settings.load({"host": "127.0.0.1", "port": 0, "store_dir": str(store_dir),
                              "admin_token": TOKEN}, environ={})
    services = Services(settings, clock=clock)
    services._runtime = SimpleNamespace(stats=services.stats, load_times_s={})
    services.responder = object()
    services.cache = FaqCache(LocalStore(store_dir), embedder=None)
    return create_app(settings, services=services)
