"""A real headless Chromium for the page tests (the admin dashboard, the caller page).

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/ensure-browser.sh`` installs them)
and selenium. Tests skip themselves when they are absent, except under CI (the ``CI``
environment variable), where a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import pytest

CHROMIUM = os.environ.get("VOICEGATE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VOICEGATE_CHROMEDRIVER", "/usr/bin/chromedriver")

BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              "--disable-dev-shm-usage", "--window-size=1280,1100")


def browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() or shutil.which(p))]
    if missing:
        return f"{' and '.join(missing)} not installed (run scripts/ensure-browser.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def require_browser() -> None:
    reason = browser_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the browser test cannot run: {reason}")
        pytest.skip(f"headless Chromium test skipped: {reason}")


def fake_microphone_flags(wav: Path) -> list[str]:
    """A microphone that plays ``wav`` (Chromium loops it) and grants the page access."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]


@contextlib.contextmanager
def chromium(extra_flags: Sequence[str] = ()) -> Iterator["object"]:
    """A headless Chromium driven by chromedriver, with a profile of its own."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="voicegate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*BASE_FLAGS, *extra_flags, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
