"""The dashboard in a real headless Chromium: it loads, asks for the token, refuses a wrong one,
and shows the figures ``/admin/stats`` returns.

The browser comes from tests/browser_support.py (skipped without Chromium, except under CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import httpx
import pytest

from gateway.client import Caller
from tests.admin_support import (AUTH, TOKEN, GatedVoice, admin, copy_store, seed_small,
                                 small_faq_csv, start_admin_server)
from tests.browser_support import chromium

pytestmark = pytest.mark.slow

SCREENSHOT = Path(tempfile.gettempdir()) / "voicegate-dashboard.png"


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def dashboard_store(tmp_path_factory, runtime):
    root = tmp_path_factory.mktemp("dashboard-store") / "store"
    seed_small(root, runtime)
    return root


@pytest.fixture(scope="module")
def dashboard_server(tmp_path_factory, settings, runtime, dashboard_store):
    served = tmp_path_factory.mktemp("dashboard-served") / "store"
    server = start_admin_server(settings, runtime, copy_store(dashboard_store, served))
    yield server
    server.stop()


def js_fixed(value: float, digits: int) -> str:
    """``Number.prototype.toFixed`` for non-negative numbers (ties round up, on the exact binary
    value), so the expected text is exactly what the page prints."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def pct(value: float | None) -> str:
    return "–" if value is None else js_fixed(value * 100, 1) + "%"


def ms(value: float | None) -> str:
    return "–" if value is None else js_fixed(value, 1)


def wait_loaded(driver, after: int = 0, timeout: float = 30) -> int:
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(d):
        count = int(d.execute_script("return Number(document.body.dataset.loaded || 0)"))
        return count if count > after else False

    return WebDriverWait(driver, timeout).until(loaded)


async def test_dashboard_shows_what_the_api_returns(browser, dashboard_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import WebDriverWait

    server = dashboard_server
    async with Caller(server.call_url) as caller:
        hit = await caller.say_text("what time do your branches open")
        miss = await caller.say_text("do you have a branch in Boston")
    assert hit.first("route")["hit"] is True and miss.first("route")["hit"] is False

    browser.get(server.base_url + "/admin/")
    wait = WebDriverWait(browser, 30)
    wait.until(visible.visibility_of_element_located((By.ID, "token-input")))
    assert not browser.find_element(By.ID, "dashboard").is_displayed()

    # a wrong token: the page says the token was refused (401) and asks again
    browser.find_element(By.ID, "token-input").send_keys("not-the-token")
    browser.find_element(By.ID, "token-submit").click()
    wait.until(visible.visibility_of_element_located((By.ID, "auth-error")))
    assert "401" in browser.find_element(By.ID, "auth-error").text
    assert browser.find_element(By.ID, "token-input").is_displayed()

    browser.find_element(By.ID, "token-input").send_keys(TOKEN)
    browser.find_element(By.ID, "token-submit").click()
    wait.until(visible.visibility_of_element_located((By.ID, "dashboard")))
    shown = wait_loaded(browser)
    assert browser.execute_script(
        "return sessionStorage.getItem('voicegate.adminToken')") == TOKEN

    # A refresh between two reads of the API that agree: a turn of an earlier test's call
    # (the runtime's stats are the session's) may still be counted while this one runs.
    stats = httpx.get(server.base_url + "/admin/stats", headers=AUTH).json()
    for _ in range(10):
        shown = wait_loaded(browser, after=shown)  # a refresh that started after the API read
        again = httpx.get(server.base_url + "/admin/stats", headers=AUTH).json()
        if all(again[k] == stats[k] for k in ("turns", "hits", "misses", "calls",
                                               "active_calls", "turns_5m")):
            break
        stats = again

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    assert text("hit-rate") == pct(stats["hit_rate"])
    assert text("hit-rate-5m") == pct(stats["hit_rate_5m"])
    assert text("active-calls") == str(stats["active_calls"])
    assert text("turns") == str(stats["turns"])
    assert text("hits") == str(stats["hits"]) and text("misses") == str(stats["misses"])
    assert text("calls") == str(stats["calls"])
    assert text("turns-5m") == str(stats["turns_5m"])
    assert text("cache-version") == stats["cache_version"]
    assert stats["hits"] >= 1 and stats["misses"] >= 1 and text("hit-rate") != "–"

    for outcome in ("hit", "miss"):
        for stage in ("end_of_turn", "route_decided", "first_token", "first_audio"):
            for p in ("p50", "p99"):
                figure = stats["latency_ms"].get(outcome, {}).get(stage, {}).get(p)
                assert text(f"lat-{outcome}-{stage}-{p}") == ms(figure), (outcome, stage, p)
    assert text("lat-hit-first_audio-p50") != "–"

    # the chart: one bar per minute with turns, a hit-rate line over them
    minutes = [p for p in stats["series"]["points"] if p["hits"] + p["misses"]]
    bars = browser.find_elements(By.CSS_SELECTOR,
                                 "#chart-svg rect.bar-hit, #chart-svg rect.bar-miss")
    assert len(bars) == sum((p["hits"] > 0) + (p["misses"] > 0) for p in minutes)
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-svg polyline.rate-line")

    misses = httpx.get(server.base_url + "/admin/misses", params={"limit": 10},
                       headers=AUTH).json()
    questions = [e.text for e in browser.find_elements(By.CSS_SELECTOR,
                                                          "#top-misses .miss-group .question")]
    assert questions == [g["question"] for g in misses["groups"]]
    assert "do you have a branch in Boston" in questions

    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def dashboard_with_a_missed_question(browser, server, runtime, question: str, draft: str,
                                     call_ids: tuple[str, ...]):
    """The dashboard, signed in, after the agent answered ``question`` in each of
    ``call_ids``; returns (a 60 s WebDriverWait, a condition finding the question's group)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for call_id in call_ids:
        runtime.stats.turn_finished({"turn": 1, "source": "llm", "action": "llm"}, question,
                                    route_score=0.1, answer=draft, call_id=call_id)
    browser.get(server.base_url + "/admin/")
    browser.execute_script(f"sessionStorage.setItem('voicegate.adminToken', '{TOKEN}')")
    browser.get(server.base_url + "/admin/")

    def group_item(d):
        for li in d.find_elements(By.CSS_SELECTOR, "#top-misses .miss-group"):
            if li.find_element(By.CSS_SELECTOR, ".question").text == question:
                return li
        return False

    return WebDriverWait(browser, 60), group_item


def test_one_click_makes_a_missed_group_an_entry(browser, dashboard_server, runtime):
    from selenium.webdriver.common.by import By

    server = dashboard_server
    question = "can I pay in with a cheque at the post office"
    draft = "Yes, you can pay cheques in at any post office counter."
    wait, group_item = dashboard_with_a_missed_question(browser, server, runtime, question,
                                                        draft, ("dash-1", "dash-2"))
    item = wait.until(group_item)
    assert item.find_element(By.CSS_SELECTOR, ".calls").text == \
        "would have answered 2 calls instantly"
    item.find_element(By.CSS_SELECTOR, "button.promote").click()
    entry_prompt = wait.until(lambda d: d.switch_to.alert)
    entry_prompt.send_keys("post_office_cheques")
    entry_prompt.accept()
    answer_prompt = wait.until(lambda d: d.switch_to.alert)
    assert answer_prompt.text.startswith("Answer")
    answer_prompt.accept()  # the agent's draft, unchanged
    wait.until(lambda d: "published as post_office_cheques" in
               d.find_element(By.ID, "promote-result").text)
    entry = httpx.get(server.base_url + "/admin/entries/post_office_cheques", headers=AUTH,
                      timeout=30).json()["entry"]
    assert entry["answer"] == draft and entry["paraphrases"] == [question]


def test_a_promote_the_network_lost_or_the_token_refused_can_be_retried(
        browser, dashboard_server, runtime, monkeypatch):
    # fetch() rejects (no HTTP answer at all: the network or the gateway is gone). The page
    # awaited it unguarded, so the status said "publishing …" for good.
    # Then the token is refused (401: rotated, expired) for the promote alone: the page must
    # bring back the token form, as for any other admin call, not leave the operator on a
    # dashboard whose every action fails.
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible

    from gateway.admin import auth

    server = dashboard_server
    question = "can I order foreign currency for collection at a branch"
    draft = "Yes, order it online and collect it at any branch two days later."
    wait, group_item = dashboard_with_a_missed_question(browser, server, runtime, question,
                                                        draft, ("net-1", "net-2"))

    def promote(entry_id: str) -> None:
        wait.until(group_item).find_element(By.CSS_SELECTOR, "button.promote").click()
        entry_prompt = wait.until(lambda d: d.switch_to.alert)
        entry_prompt.send_keys(entry_id)
        entry_prompt.accept()
        wait.until(lambda d: d.switch_to.alert).accept()  # the draft answer

    def status():
        return browser.find_element(By.ID, "promote-result")

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/admin/misses/promote"]})
    try:
        promote("foreign_currency")
        try:
            wait.until(lambda d: "publishing" not in status().text)
        except TimeoutException:
            raise AssertionError(f"the status stayed {status().text!r}") from None
        assert "could not publish foreign_currency: the gateway did not answer" in \
            status().text, status().text
        assert status().get_attribute("class") == "error"
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})

    check = auth.check  # the promote alone is refused: the page's refreshes still pass

    def token_rotated_for_promote(request):
        if request.url.path == "/admin/misses/promote":
            return auth.JSONResponse({"error": auth.UNAUTHORIZED}, status_code=401)
        return check(request)

    monkeypatch.setattr(auth, "check", token_rotated_for_promote)
    promote("foreign_currency")
    try:
        wait.until(visible.visibility_of_element_located((By.ID, "token-input")))
    except TimeoutException:
        raise AssertionError(f"no token form after a 401; status {status().text!r}") from None
    assert "401" in browser.find_element(By.ID, "auth-error").text
    assert not browser.find_element(By.ID, "dashboard").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('voicegate.adminToken')") \
        is None
    monkeypatch.undo()
    browser.find_element(By.ID, "token-input").send_keys(TOKEN)  # signed in again
    browser.find_element(By.ID, "token-submit").click()
    wait.until(visible.visibility_of_element_located((By.ID, "dashboard")))
    assert "token was refused (401), nothing was published" in status().text
    promote("foreign_currency")  # the retry the failures ask for
    wait.until(lambda d: "published as foreign_currency" in status().text)
    assert status().get_attribute("class") == ""
    entry = httpx.get(server.base_url + "/admin/entries/foreign_currency", headers=AUTH,
                      timeout=30).json()["entry"]
    assert entry["answer"] == draft


def test_an_api_that_is_not_ready_is_shown_not_hidden(browser, dashboard_server, monkeypatch):
    # A stored (right) token while the admin API answers 503 (models still loading): the page
    # must say so and keep trying, not sit on the token form with the error in a hidden panel.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    from gateway.services import Services

    server = dashboard_server
    monkeypatch.setattr(Services, "ready", property(lambda self: False))
    assert httpx.get(server.base_url + "/admin/stats", headers=AUTH).status_code == 503
    browser.get(server.base_url + "/admin/")
    browser.execute_script(f"sessionStorage.setItem('voicegate.adminToken', '{TOKEN}')")
    browser.get(server.base_url + "/admin/")
    wait = WebDriverWait(browser, 30)
    try:
        wait.until(visible.visibility_of_element_located((By.ID, "load-error")))
    except TimeoutException:
        pass
    shown = browser.find_element(By.ID, "load-error").text  # "" while it is hidden
    assert "503" in shown and "models are loading" in shown, shown
    assert not browser.find_element(By.ID, "token-input").is_displayed()

    monkeypatch.undo()  # the models are loaded: the next refresh shows the figures
    wait_loaded(browser)
    wait.until(visible.invisibility_of_element_located((By.ID, "load-error")))
    assert browser.find_element(By.ID, "dashboard").is_displayed()


# The page's network and timers, held by the test: each fetch answers when the test says so
# (/admin/stats with window.__stats; "METHOD path" with window.__replies' {status, body} when
# it has one), and each setTimeout runs when the test ticks (no server, no wall-clock wait).
HELD_PAGE = """
window.__fetches = [];
window.__timers = new Map();
window.__stats = {};
window.__misses = {groups: []};
window.__replies = {};
let nextTimer = 1;
window.fetch = (path, options) => new Promise((resolve, reject) => {
  new Headers((options && options.headers) || {});  // throws as fetch does: a header it cannot send
  const signal = options && options.signal;  // an abort rejects it, as fetch's does
  if (signal) signal.addEventListener("abort", () => reject(signal.reason));
  const method = (options && options.method) || "GET";
  window.__fetches.push({path, method, body: options && options.body, answer: () => {
    const given = window.__replies[method + " " + path];
    const status = given ? given.status : 200;
    resolve({status, ok: status >= 200 && status < 300, json: async () => (
      given ? given.body
      : String(path).includes("misses") ? window.__misses
      : String(path).includes("stats") ? window.__stats : {})});
  }});
});
const realSetTimeout = window.setTimeout;  // a task after every answer's promises ran
window.__settle = (done) => realSetTimeout(done, 0);
window.setTimeout = (fn) => { window.__timers.set(nextTimer, fn); return nextTimer++; };
window.clearTimeout = (id) => { window.__timers.delete(id); };
"""


PAGE = Path(__file__).parents[1] / "gateway" / "admin" / "static" / "dashboard.html"


@contextlib.contextmanager
def held_page(browser, token: str | None = None):
    """The dashboard from its file, its network and timers held (HELD_PAGE), the token
    stored or not before its script runs."""
    stored = f"sessionStorage.setItem('voicegate.adminToken', {json.dumps(token)});" if token \
        else "sessionStorage.clear();"
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": HELD_PAGE + stored})["identifier"]
    try:
        browser.get(PAGE.as_uri())
        yield
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                                {"identifier": script})


def answer_all_then_tick(browser) -> list[str]:
    """Answer every request of a held page, let the page go on, run its timers: the paths
    asked next."""
    browser.execute_async_script("""
        const done = arguments[0];
        window.__fetches.splice(0).forEach((f) => f.answer());
        window.__settle(done);""")
    return browser.execute_script("""
        const due = [...window.__timers.values()];
        window.__timers.clear();
        due.forEach((fn) => fn());
        return window.__fetches.map((f) => f.path);""")


def test_entering_the_token_again_keeps_one_refresh_loop(browser):
    # The token form (shown after a 401, e.g. a promote's) started a refresh loop per submit:
    # one entered while a refresh was still waiting for its answer ran beside it, and the
    # page polled twice as often, and once more per submit. It restarts the one loop.
    from selenium.webdriver.common.by import By

    with held_page(browser):
        for _ in range(2):  # the first refresh still waits for its answer
            browser.find_element(By.ID, "token-input").send_keys(TOKEN)
            browser.find_element(By.ID, "token-submit").click()
        polled = ["/admin/misses?limit=10", "/admin/seed", "/admin/stats"]
        assert sorted(answer_all_then_tick(browser)) == polled
        assert browser.find_element(By.ID, "dashboard").is_displayed()
        assert sorted(answer_all_then_tick(browser)) == polled


# What the chart drew: its grid lines, its labels and its bars, by their SVG attributes.
CHART = """
const svg = document.getElementById("chart-svg");
const num = (e, name) => Number(e.getAttribute(name));
return {lines: [...svg.querySelectorAll("line")].map((e) => ({y: num(e, "y1"), x1: num(e, "x1"),
                                                            x2: num(e, "x2")})),
        texts: [...svg.querySelectorAll("text")].map((e) => ({x: num(e, "x"), y: num(e, "y"),
                                                            text: e.textContent})),
        bars: [...svg.querySelectorAll("rect")].map((e) => num(e, "height"))};
"""


@pytest.mark.parametrize("busiest", [0, 1, 2, 3, 7, 10, 1000, 1001])
def test_each_axis_labels_its_grid_lines_with_distinct_true_values(browser, busiest):
    # The turns axis labelled its three grid lines round(f × busiest minute): "0, 1, 1" with
    # one turn (or none), and a middle line at 1.5 turns said "2" with three. Each axis's
    # labels must be distinct, whole, and say where its line is: a bar of n turns reaches
    # the height the labels give n.
    minute = 1_700_000_040
    points = [{"t": minute + 60 * i, "hits": 0, "misses": 0} for i in range(60)]
    points[40].update(hits=(busiest + 1) // 2, misses=busiest // 2)
    with held_page(browser, TOKEN):
        browser.execute_script("window.__stats = {series: {minute_s: 60, points: arguments[0]}}",
                               points)
        answer_all_then_tick(browser)
        chart = browser.execute_script(CHART)
    grid = sorted({line["y"] for line in chart["lines"]}, reverse=True)  # the bottom first
    base, height = grid[0], grid[0] - grid[-1]
    left = min(line["x1"] for line in chart["lines"])
    right = max(line["x2"] for line in chart["lines"])

    def axis(side) -> list[str]:  # an axis's labels, the bottom first
        labels = sorted((t for t in chart["texts"] if side(t["x"])), key=lambda t: -t["y"])
        return [t["text"] for t in labels]

    for labels, unit, top in ((axis(lambda x: x < left), "", None),
                              (axis(lambda x: x > right), "%", 100)):
        assert len(labels) == len(grid), labels
        assert all(re.fullmatch(r"\d+" + unit, label) for label in labels), labels
        values = [int(label.removesuffix(unit)) for label in labels]
        assert values[0] == 0 and values == sorted(set(values)), labels  # distinct, rising
        assert top in (None, values[-1]), labels
        for value, y in zip(values, grid):
            assert value / values[-1] == pytest.approx((base - y) / height), \
                f"the line labelled {value}{unit} is at {(base - y) / height:.3f} of {labels}"
    turns_top = int(axis(lambda x: x < left)[-1])
    assert turns_top >= busiest
    assert sum(chart["bars"]) / height == pytest.approx(busiest / turns_top)


def test_the_turns_axis_steps_by_the_smallest_round_whole_number(browser):
    # chartAxes (the page's pure axis function): the turns axis's lines are 0, step and
    # 2 × step, step the smallest whole 1, 2, 2.5 or 5 × 10^k with 2 × step >= the busiest
    # minute (at least 1: an idle hour reads 0, 1, 2); the hit rate's are 0, 50 and 100%.
    round_steps = sorted([m * 10**k for k in range(12) for m in (1, 2, 5)] +
                         [25 * 10**k for k in range(11)])
    maxima = [*range(0, 2001), *(10**k + d for k in range(3, 11) for d in (-1, 0, 1))]
    with held_page(browser):
        axes = browser.execute_script("return arguments[0].map((n) => chartAxes(n))", maxima)
        odd = browser.execute_script("return [NaN, undefined, -3].map((n) => chartAxes(n))")
    for busiest, got in zip(maxima, axes):
        step = next(s for s in round_steps if 2 * s >= busiest)
        assert got["top"] == 2 * step, (busiest, got)
        assert [(line["f"], line["turns"], line["rate"]) for line in got["lines"]] == \
            [(0, 0, 0), (0.5, step, 50), (1, 2 * step, 100)], (busiest, got)
    shown = {n: [line["turns"] for line in got["lines"]] for n, got in zip(maxima, axes)}
    assert shown[0] == shown[1] == shown[2] == [0, 1, 2]
    assert shown[3] == [0, 2, 4] and shown[7] == [0, 5, 10] and shown[41] == [0, 25, 50]
    assert shown[1000] == [0, 500, 1000] and shown[1001] == [0, 1000, 2000]
    assert all(got == axes[0] for got in odd), odd  # a series without counts: as idle


def test_figures_of_one_replica_are_said_to_be_so_while_redis_is_unreachable(
        browser, dashboard_server, monkeypatch):
    # With Redis the figures are the cluster's; while Redis is unreachable /admin/stats
    # answers this replica's own, marked degraded with replicas null (docs/operations.md,
    # "Cluster stats"). The page showed them as before: every figure dropped to one
    # replica's, and nothing said why.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import WebDriverWait

    from gateway.services import Services

    reason = "cannot read shared counters: ConnectionError: Redis is down"
    snapshot = Services.stats_snapshot

    async def unreachable(self):  # what SharedStats.cluster_snapshot answers then
        return dict(await snapshot(self), scope="replica", replicas=None, degraded=True,
                    degraded_reason=reason)

    monkeypatch.setattr(Services, "stats_snapshot", unreachable)
    server = dashboard_server
    browser.get(server.base_url + "/admin/")
    browser.execute_script(f"sessionStorage.setItem('voicegate.adminToken', '{TOKEN}')")
    browser.get(server.base_url + "/admin/")
    wait_loaded(browser)
    note = browser.find_element(By.ID, "scope-note")
    assert note.is_displayed(), "nothing says the figures are one replica's"
    assert "this replica's only" in note.text and reason in note.text, note.text

    monkeypatch.undo()  # Redis is back: the warning goes
    WebDriverWait(browser, 30).until(visible.invisibility_of_element_located((By.ID,
                                                                              "scope-note")))


def test_the_seed_under_way_is_shown_and_its_cancel_button_cancels_it(
        browser, settings, runtime, dashboard_store, tmp_path, dashboard_server):
    # An operator with a long upload running had no way to see it on the dashboard, nor to
    # stop it there: the page shows its phase and "rendered n of m" while it runs, and its
    # Cancel button sends DELETE /admin/seed; once the seed has ended the panel says how.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import WebDriverWait

    voice = GatedVoice(free=1)  # the first answer renders, the second is held
    # dashboard_server's start rendered the prompts with the real voice (GatedVoice: why)
    server = start_admin_server(settings, dataclasses.replace(runtime, tts=voice),
                                copy_store(dashboard_store, tmp_path / "store"))

    def upload():
        with admin(server) as uploader:
            return uploader.post("/admin/seed", content=small_faq_csv().encode(),
                                 headers={"Content-Type": "text/csv"},
                                 params={"target_wrong_rate": "0.05", "name": "faq.csv"})

    def seed_state() -> dict:
        return httpx.get(server.base_url + "/admin/seed", headers=AUTH, timeout=30).json()

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    try:
        browser.get(server.base_url + "/admin/")
        browser.execute_script(f"sessionStorage.setItem('voicegate.adminToken', '{TOKEN}')")
        browser.get(server.base_url + "/admin/")
        wait_loaded(browser)
        panel = browser.find_element(By.ID, "seed-status")
        assert not panel.is_displayed()
        wait = WebDriverWait(browser, 60)
        with ThreadPoolExecutor(max_workers=1) as pool:
            seeding = pool.submit(upload)
            assert voice.rendering.wait(timeout=120), seeding.result()
            wait.until(visible.visibility_of_element_located((By.ID, "seed-status")))
            wait.until(lambda d: panel.get_attribute("data-phase") == "rendering")
            assert text("seed-phase") == "rendering answers"
            assert text("seed-progress") == "rendered 1 of 4"
            assert "faq.csv" in text("seed-source") and "upload" in text("seed-source")
            assert panel.get_attribute("data-cancelling") == "false"

            browser.find_element(By.ID, "seed-cancel").click()
            confirm = wait.until(lambda d: d.switch_to.alert)
            assert "publishes nothing" in confirm.text
            confirm.accept()
            wait.until(lambda d: seed_state().get("cancelling") is True)
            wait.until(lambda d: panel.get_attribute("data-cancelling") == "true")
            assert "cancelling" in text("seed-cancel-result")
            button = browser.find_element(By.ID, "seed-cancel")
            assert not button.is_enabled() and button.text == "Cancelling…"

            voice.release.set()  # the answer under way finishes; the next one never starts
            cancelled = seeding.result(timeout=120)
            assert cancelled.status_code == 409 and cancelled.json()["cancelled"] is True
            # Ended: the panel says how, and offers nothing to cancel.
            wait.until(lambda d: panel.get_attribute("data-outcome") == "cancelled")
            assert not browser.find_element(By.ID, "seed-cancel").is_displayed()
            assert "cancelled while rendering answers: nothing published" in panel.text
        assert seed_state()["last"]["outcome"] == "cancelled"
    finally:
        voice.release.set()
        server.stop()


# GET /admin/seed while an upload renders (docs/operations.md, "GET /admin/seed").
SEED_RUNNING = {"running": True, "kind": "upload", "source": "faq.csv", "phase": "rendering",
                "rendered": 3, "to_render": 40, "reused": 2, "started_at": 1_795_302_132.418,
                "elapsed_s": 95.2, "cancelling": False}


def show_seed(browser, seed: dict) -> None:
    """One refresh of a held page (``held_page``) whose GET /admin/seed answers ``seed``."""
    browser.execute_script("window.__replies['GET /admin/seed'] = {status: 200, body: arguments[0]}",
                           seed)
    answer_all_then_tick(browser)


@pytest.mark.parametrize("step, offered", [
    ({"phase": "calibrating", "rendered": 38, "to_render": 38}, True),
    ({"phase": "publishing", "rendered": 38, "to_render": 38}, False),
    ({"phase": "publishing", "rendered": 38, "to_render": 38, "version": "v-2f9c"}, False),
], ids=["calibrating", "writing-its-version", "published-loading"])
def test_a_seed_past_the_point_of_cancelling_is_offered_no_cancel(browser, step, offered):
    """Review (stop 69): a seed writing its version (phase ``publishing``: cache_seed checks
    the cancel before it, never during) completes whatever is asked, and one that has
    published it (``version``: this replica loading it) is refused by DELETE /admin/seed with
    409 "already published". The panel still offered "Cancel the seed", whose confirmation
    promised "publishes nothing", for both: the new version then served all the same."""
    from selenium.webdriver.common.by import By

    with held_page(browser, TOKEN):
        show_seed(browser, dict(SEED_RUNNING, **step))
        assert browser.find_element(By.ID, "seed-status").is_displayed()
        assert browser.find_element(By.ID, "seed-cancel").is_displayed() is offered, step
        phase = browser.find_element(By.ID, "seed-phase").text
        if "version" in step:  # what it is doing now: its version serves once loaded
            assert "published v-2f9c" in phase, phase
        if not offered:
            # Cancelling as it began writing: a cancel taken just before (DELETE /admin/seed
            # refuses one from then on, stop 70) stops it unpublished, one a shutdown asked
            # after does not; published, it is too late. Said so, never "stops".
            show_seed(browser, dict(SEED_RUNNING, cancelling=True, **step))
            assert not browser.find_element(By.ID, "seed-cancel").is_displayed()
            said = browser.find_element(By.ID, "seed-cancel-result").text
            expected = "too late" if "version" in step else "says whether it published"
            assert expected in said, said


@pytest.mark.parametrize("last, said", [
    ({"kind": "upload", "source": "faq.csv", "outcome": "published", "version": "v-7f3a",
      "error": None, "phase": "publishing", "rendered": 4, "to_render": 4, "reused": 32},
     ["published", "v-7f3a", "faq.csv"]),
    ({"kind": "upload", "source": "faq.csv", "outcome": "failed", "version": None,
      "error": "faq.csv: 2 bad row(s), nothing published:\n  line 3: empty answer\n"
               "  line 9: <b>markup</b> in the answer",
      "phase": "validating", "rendered": 0, "to_render": 0, "reused": 0},
     ["failed", "nothing published", "line 3: empty answer", "<b>markup</b>"]),
    ({"kind": "promote", "source": "admin: entry boston_branch", "outcome": "cancelled",
      "version": None, "error": "seed cancelled after rendering 813 of 2,000 new answers; "
                                "nothing published",
      "phase": "rendering", "rendered": 813, "to_render": 2000, "reused": 36},
     ["cancelled", "813 of 2,000", "boston_branch"]),
    # Review (stop 70): it read "failed while publishing: nothing published" over an error
    # saying whether it published is unknown.
    ({"kind": "upload", "source": "faq.csv", "outcome": "unconfirmed", "version": None,
      "error": "Redis at redis://cache is unreachable (publish: move pointer): Timeout; "
               "whether version v-7f3a was published is unknown: ...",
      "phase": "publishing", "rendered": 4, "to_render": 4, "reused": 32},
     ["unconfirmed while publishing: whether it published is unknown", "v-7f3a"]),
], ids=["published", "failed", "cancelled", "unconfirmed"])
def test_how_the_last_seed_ended_is_shown(browser, last, said):
    """Review (stop 69): the seed panel went as soon as a seed ended, and nothing on the page
    said whether it had published (which version), failed (and why: bad rows, the new-answer
    limit, the store) or been cancelled: GET /admin/seed's ``last`` was never read, so an
    operator back at an upload they started saw no trace of it, and a failed one looked
    like one that had not run. The panel now says how the last seed ended, offering no
    Cancel; the error, a caller's or an operator's text among it, is shown as text."""
    from selenium.webdriver.common.by import By

    times = {"started_at": 1_795_302_132.418, "ended_at": 1_795_303_040.951,
             "elapsed_s": 908.2}
    with held_page(browser, TOKEN):
        show_seed(browser, {"running": False, "last": None})  # none since the start: no panel
        panel = browser.find_element(By.ID, "seed-status")
        assert not panel.is_displayed()
        show_seed(browser, {"running": False, "last": dict(last, **times)})
        assert panel.is_displayed()
        assert panel.get_attribute("data-outcome") == last["outcome"]
        assert not browser.find_element(By.ID, "seed-cancel").is_displayed()
        assert not browser.find_elements(By.CSS_SELECTOR, "#seed-status b")  # text, not markup
        shown = panel.text
        for words in said:
            assert words in shown, (words, shown)
        assert "15 min 08 s" in shown, shown  # how long it ran


def promote_group(question: str, draft: str | None = None) -> dict:
    """A group of GET /admin/misses, as the page lists it."""
    return {"question": question, "count": 3, "examples": [{"text": question, "count": 3}],
            "distinct": 1, "intents": [{"intent": None, "count": 3}], "last_at": 1.7e9,
            "calls": 2, "draft_answer": draft, "questions": [question]}


# window.prompt answered by the test: each answer in turn (null, or none left: OK on the
# text it offered), what it asked kept.
STUB_PROMPTS = """
window.__prompts = [];
window.__promptAnswers = arguments[0];
window.prompt = (message, value) => {
  window.__prompts.push([message, value]);
  const given = window.__promptAnswers.shift();
  return given === undefined || given === null ? value : given;
};"""


def test_the_promote_prompt_tells_the_naming_rule_and_the_id_it_got(browser):
    """Review (stop 69): the promote prompt asked for an id of "letters, digits, _", but the
    server takes any printable name on one line as the new entry's intent (``Boston
    branch?``, ``Öffnungszeiten``) and derives its URL-safe id from it
    (``intents.types.entry_id_for``): the operator was held to a rule that is not the
    server's, and after publishing told "published as <name>" while the admin API
    (``/admin/entries/{id}``) addresses the entry by an id the page never showed."""
    from selenium.webdriver.common.by import By

    from intents.types import entry_id_for

    name = "Boston branch?"
    question = "do you have a branch in Boston"
    with held_page(browser, TOKEN):
        browser.execute_script("window.__misses = arguments[0]",
                               {"groups": [promote_group(question, "Yes, on Main Street.")]})
        answer_all_then_tick(browser)
        browser.execute_script(STUB_PROMPTS, [name])
        browser.find_element(By.CSS_SELECTOR, "#top-misses button.promote").click()
        sent = browser.execute_script(
            "return window.__fetches.filter((f) => f.method === 'POST').map((f) => f.body)")
        assert [json.loads(b)["intent"] for b in sent] == [name]
        browser.execute_script(
            "window.__replies['POST /admin/misses/promote'] = {status: 201, body: arguments[0]}",
            {"version": "v-9", "created": True,
             "entry": {"id": entry_id_for(name), "intent": name, "action": "answer"}})
        answer_all_then_tick(browser)
        asked = browser.execute_script("return window.__prompts[0][0]")
        status = browser.find_element(By.ID, "promote-result").text
    assert "letters, digits, _)" not in asked and "any text" in asked, asked
    assert entry_id_for(name) != name and entry_id_for(name) in status, status
    assert name in status and "v-9" in status, status


def test_a_promotion_under_way_cannot_be_sent_again_nor_beside_another(browser):
    """Review (stop 69): the "Make it an FAQ entry" buttons stayed live while a promotion
    was under way (a seed: seconds to minutes), in the list as every refresh redrew it. A
    second click, on another group or the same, sent a second promotion, which the server
    refuses (409: one seed at a time); its refusal was then overwritten in the one status
    line by the first's "published as ...", and the operator took both groups for
    promoted. Every button is off until the answer comes (a refusal's too), then on again."""
    from selenium.webdriver.common.by import By

    groups = [promote_group("do you have a branch in Boston", "Yes, on Main Street."),
              promote_group("can I pay in coins", "Yes, up to 20 pounds a day.")]

    def buttons():
        return browser.find_elements(By.CSS_SELECTOR, "#top-misses button.promote")

    def posts() -> int:
        return browser.execute_script(
            "return window.__fetches.filter((f) => f.method === 'POST').length")

    with held_page(browser, TOKEN):
        browser.execute_script("window.__misses = arguments[0]", {"groups": groups})
        answer_all_then_tick(browser)
        browser.execute_script(STUB_PROMPTS, ["boston_branch", None, "coins", None])
        buttons()[0].click()
        assert posts() == 1
        # A refresh while it runs redraws the list: its buttons are off too.
        browser.execute_async_script("""
            const done = arguments[0];
            const gets = window.__fetches.filter((f) => f.method === "GET");
            window.__fetches = window.__fetches.filter((f) => f.method !== "GET");
            gets.forEach((f) => f.answer());
            window.__settle(done);""")
        assert len(buttons()) == 2 and not any(b.is_enabled() for b in buttons())
        for button in buttons():
            button.click()
        assert posts() == 1, "a second promotion was sent while the first ran"
        browser.execute_script(
            "window.__replies['POST /admin/misses/promote'] = {status: 409, body: "
            "{error: 'another seed is running; try again when it has finished'}}")
        answer_all_then_tick(browser)  # the first is refused: the operator may try again
        assert buttons() and all(b.is_enabled() for b in buttons())
        assert "409" in browser.find_element(By.ID, "promote-result").text


@pytest.mark.parametrize("typed", ["ключ-0f3c", "admin\u2011token"], ids=["cyrillic", "nb-hyphen"])
def test_a_token_a_browser_cannot_send_is_refused_at_the_form(browser, typed):
    """Review (stop 69): a header holds Latin-1 only, so fetch throws on a token with any
    other character (``ключ``, a non-breaking hyphen pasted from a document) before sending
    anything. The page took that for an unreachable gateway: it showed an empty dashboard
    with "Failed to execute 'fetch' on 'Window': ... non ISO-8859-1 code point", kept the
    token and retried it every 3 s for good, never asking for it again. The form refuses
    it, saying why (docs/operations.md, Authentication), and keeps nothing."""
    from selenium.webdriver.common.by import By

    with held_page(browser):
        browser.find_element(By.ID, "token-input").send_keys(typed)
        browser.find_element(By.ID, "token-submit").click()
        answer_all_then_tick(browser)
        assert browser.find_element(By.ID, "token-input").is_displayed()
        assert not browser.find_element(By.ID, "dashboard").is_displayed()
        said = browser.find_element(By.ID, "auth-error").text
        assert "cannot send" in said and "Latin-1" in said, said
        assert browser.execute_script(
            "return sessionStorage.getItem('voicegate.adminToken')") is None
        assert browser.execute_script("return window.__fetches.length") == 0
        # A Latin-1 one is sent (the server reads it: docs/operations.md, Authentication).
        browser.find_element(By.ID, "token-input").send_keys("Schlüssel-0f3c")
        browser.find_element(By.ID, "token-submit").click()
        assert browser.execute_script("return window.__fetches.length") == 3
        assert browser.execute_script(
            "return sessionStorage.getItem('voicegate.adminToken')") == "Schlüssel-0f3c"


def test_a_refresh_the_gateway_never_answers_is_said_and_retried(browser):
    """Review (stop 69): a refresh waited for its three answers without a limit (fetch has
    none). A gateway that took the request and never answered (its host gone without a
    reset, a stuck proxy, a replica whose loop is blocked) left the refresh waiting for good:
    no error, no next refresh, the figures of minutes or hours ago shown as if current
    ("updated" the only trace). A refresh not answered within 30 s (ANSWER_WITHIN_MS) is given up,
    said on the dashboard, and the next one goes out as after any failure."""
    from selenium.webdriver.common.by import By

    polled = ["/admin/misses?limit=10", "/admin/seed", "/admin/stats"]
    tick = """
        const done = arguments[0];
        const due = [...window.__timers.values()];
        window.__timers.clear();
        due.forEach((fn) => fn());
        window.__settle(() => done(window.__fetches.map((f) => f.path)));"""
    with held_page(browser, TOKEN):
        assert sorted(answer_all_then_tick(browser)) == polled  # a first answer: figures
        browser.execute_async_script(tick)  # the second refresh is never answered ...
        box = browser.find_element(By.ID, "load-error")
        assert box.is_displayed(), "a refresh never answered is not said"
        assert "no answer within" in box.text, box.text
        assert sorted(browser.execute_async_script(tick)) == sorted(polled * 2)  # it goes on


# The page's script in node with a minimal fake DOM (as tests/test_caller_page_logic.py runs
# caller.js): deterministic, no browser needed. fetch answers /admin/stats with STATS and
# the misses with MISSES; timers never run. Prints what the test asks for, as JSON.
DASHBOARD_HARNESS = r"""
const fs = require("fs");
const vm = require("vm");
function makeEl(tag, id) {
  const el = {
    tag, id, children: [], dataset: {}, attrs: {}, _text: "", listeners: {},
    classList: {set: new Set(), add(c) { this.set.add(c); }, remove(c) { this.set.delete(c); },
                toggle(c, on) { if (on === undefined) on = !this.set.has(c);
                                on ? this.set.add(c) : this.set.delete(c); },
                contains(c) { return this.set.has(c); }},
    get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); },
    set textContent(v) { this._text = String(v); this.children = []; },
    append(...xs) { for (const x of xs) this.children.push(x); },
    appendChild(x) { this.children.push(x); return x; },
    setAttribute(k, v) { this.attrs[k] = String(v); },
    getAttribute(k) { return this.attrs[k]; },
    addEventListener(t, f) { this.listeners[t] = f; },
    insertRow() { const r = makeEl("tr"); this.children.push(r); return r; },
    insertCell() { const c = makeEl("td"); this.children.push(c); return c; },
  };
  let body = null;
  Object.defineProperty(el, "tBodies", {get: () => [body || (body = makeEl("tbody"))]});
  return el;
}
const els = {};
const document = {
  body: makeEl("body"),
  getElementById(id) { return els[id] || (els[id] = makeEl("div", id)); },
  createElement(t) { return makeEl(t); },
  createElementNS(ns, t) { return makeEl(t); },
};
const store = {"voicegate.adminToken": "t"};
const answers = {stats: JSON.parse(process.env.STATS), misses: JSON.parse(process.env.MISSES)};
const ctx = vm.createContext({
  document, console, JSON, Math, Number, String, Object, Array, Boolean, Date, Promise, Map,
  Set, Error, AbortController,
  sessionStorage: {getItem: (k) => store[k] || null, setItem: (k, v) => { store[k] = v; },
                   removeItem: (k) => { delete store[k]; }},
  fetch: async (path) => ({status: 200, ok: true, json: async () => (
    path.includes("stats") ? answers.stats : path.includes("misses") ? answers.misses
    : {running: false})}),
  setTimeout: () => 1, clearTimeout: () => {},
  window: {confirm: () => false, prompt: () => null},
});
const html = fs.readFileSync(process.env.PAGE, "utf8");
for (const [, code] of html.matchAll(/<script>([\s\S]*?)<\/script>/g)) vm.runInContext(code, ctx);
const find = (el, pred, out = []) => {
  if (el && typeof el === "object") {
    if (pred(el)) out.push(el);
    for (const c of el.children || []) find(c, pred, out);
  }
  return out;
};
setImmediate(() => setImmediate(() => {
  const svg = document.getElementById("chart-svg");
  console.log(JSON.stringify({
    loaded: document.body.dataset.loaded,
    latencyScope: document.getElementById("latency-scope").textContent,
    missesScope: document.getElementById("misses-scope").textContent,
    lines: find(svg, (e) => e.tag === "polyline").map((e) => e.attrs.points),
    bars: find(svg, (e) => e.tag === "rect").map((e) => Number(e.attrs.height)),
  }));
}));
"""


def run_dashboard(tmp_path: Path, stats: dict, misses: dict | None = None) -> dict:
    import shutil
    import subprocess

    from tests.test_redis import IN_CI

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:  # under CI a failure, never a silent skip (scripts/ensure-node.sh)
        (pytest.fail if IN_CI else pytest.skip)("node is not installed: scripts/ensure-node.sh")
    script = tmp_path / "dashboard.js"
    script.write_text(DASHBOARD_HARNESS)
    done = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60,
                          env={"PAGE": str(PAGE), "STATS": json.dumps(stats),
                               "MISSES": json.dumps(misses or {"groups": []}),
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == "1", out  # the page rendered the answers
    return out


def cluster_stats(points: list[dict], **extra) -> dict:
    return {"scope": "cluster", "replicas": 3, "replica_id": "gw-2-41-a1b2c3",
            "latency_scope": "replica", "hits": 0, "misses": 0, "turns": 0, "calls": 0,
            "active_calls": 0, "interrupted_turns": 0, "hit_rate": None, "hit_rate_5m": None,
            "turns_5m": 0, "cache_version": "v1", "degraded": False, "degraded_reason": None,
            "latency_ms": {"hit": {"first_audio": {"p50": 1.0, "p99": 2.0, "n": 5}}},
            "series": {"minute_s": 60, "points": points}, **extra}


def idle_hour(start: int = 1_700_000_040) -> list[dict]:
    return [{"t": start + 60 * i, "hits": 0, "misses": 0} for i in range(60)]


def test_the_replicas_own_latency_and_misses_are_named_beside_the_clusters_figures(tmp_path):
    """Review (stop 60): with Redis the figures are the cluster's, but ``latency_ms`` is
    the replica's that answered (``latency_scope: "replica"``) and /admin/misses its own
    process's. Behind a balancer each refresh may come from another replica: the latency
    table and the top misses changed from one to the next under the cluster's figures, and
    nothing said they were one replica's, nor whose."""
    out = run_dashboard(tmp_path, cluster_stats(idle_hour()))
    for shown in (out["latencyScope"], out["missesScope"]):
        assert "this replica" in shown and "gw-2-41-a1b2c3" in shown, out


def test_the_hit_rate_line_is_not_drawn_across_minutes_without_turns(tmp_path):
    """Review (stop 60): a minute without turns has no hit rate, yet the chart's one
    polyline joined the minutes either side of it: 100% at one minute and 0% forty idle
    minutes later read as a hit rate falling steadily over the forty minutes between. The
    line is drawn only between adjacent minutes with turns."""
    points = idle_hour()
    points[10].update(hits=4)
    points[11].update(hits=3, misses=1)
    points[50].update(misses=2)
    out = run_dashboard(tmp_path, cluster_stats(points))
    slot = (1000 - 40 - 44) / 60
    for line in out["lines"]:
        xs = [float(p.split(",")[0]) for p in line.split()]
        gaps = [b - a for a, b in zip(xs, xs[1:])]
        assert all(g == pytest.approx(slot) for g in gaps), (
            f"the hit-rate line spans {max(gaps) / slot:.0f} minutes: {line}")
    assert sum(len(line.split()) for line in out["lines"]) <= 3
    assert out["bars"] and min(out["bars"]) > 0  # no zero-height bar for an idle minute
