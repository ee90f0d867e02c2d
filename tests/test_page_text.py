"""How the dashboard and the caller page show text they do not control: a caller's long
unbroken question or an operator's long intent name, a link in a reply, and the bot's
unasked lines (which must not rewrite the caller's turn shown).

The dashboard tests load the page from its file in a headless Chromium with its network held
(no server, no models, no wall-clock wait), as tests/test_admin_dashboard.py's held pages do;
the caller page is served by its own routes, fed events through a fake WebSocket.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.browser_support import chromium
from tests.test_admin_dashboard import held_page

pytestmark = pytest.mark.slow

TOKEN = "review-token"

STATS = {"active_calls": 0, "calls": 3, "turns": 4, "hits": 1, "misses": 3, "hit_rate": 0.25,
         "hit_rate_5m": 0.25, "turns_5m": 4, "interrupted_turns": 0, "latency_ms": {},
         "series": {"minute_s": 60, "points": []}, "cache_version": "v1", "degraded": False,
         "degraded_reason": None, "replicas": 1}


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def show(browser, stats: dict, misses: dict) -> None:
    """One refresh of the held dashboard (``held_page``: its network and timers held) with
    these API answers."""
    browser.execute_script("window.__stats = arguments[0]; window.__misses = arguments[1];",
                           stats, misses)
    browser.execute_async_script("""
        const done = arguments[0];
        window.__fetches.splice(0).forEach((f) => f.answer());
        window.__settle(done);""")
    assert browser.execute_script("return document.body.dataset.loaded") == "1"


def miss_group(question: str, intent: str | None) -> dict:
    return {"question": question, "count": 3, "examples": [{"text": question, "count": 3}],
            "distinct": 1, "intents": [{"intent": intent, "count": 3}], "last_at": 1.7e9,
            "calls": 2, "draft_answer": None, "questions": [question]}


# A missed question is the caller's own words: a `text` message (docs/protocol.md) holds any
# string up to 64 KiB, a URL or a pasted token without a space among them; an intent is any
# printable name of up to 200 characters (cache_seed/validate.py, MAX_INTENT_CHARS).
@pytest.mark.parametrize("question, intent", [
    ("https://example.com/" + "a" * 400, "account_balance"),
    ("what is my balance", "x" * 200),
], ids=["long-caller-question", "long-intent-name"])
def test_a_long_unbroken_miss_or_intent_stays_inside_the_dashboard(browser, question, intent):
    with held_page(browser, TOKEN):
        show(browser, STATS, {"groups": [miss_group(question, intent)]})
        layout = browser.execute_script("""
            const box = (id) => document.getElementById(id).getBoundingClientRect();
            const main = box("dashboard");
            return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
                    mainRight: main.right,
                    missesRight: document.getElementById("top-misses").closest(".card")
                                 .getBoundingClientRect().right,
                    latencyWidth: box("latency").width};""")
    # The Top misses card stays in the page; the page gets no horizontal scroll, and the
    # latency table keeps its half of the row.
    assert layout["missesRight"] <= layout["mainRight"] + 1, layout
    assert layout["scroll"] <= layout["inner"], layout


# ---------------------------------------------------------------------- the caller page

# The page's WebSocket, held by the test: `window.__ws` is the page's socket; the test opens
# it and hands it the gateway's events (no gateway, no models, no microphone needed).
FAKE_SOCKET = """
class HeldSocket {
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; window.__ws = this; }
  send(data) { this.sent.push(data); }
  close() { this.readyState = 3; }
  open() { this.readyState = 1; this.onopen && this.onopen({}); }
  event(obj) { this.onmessage && this.onmessage({data: JSON.stringify(obj)}); }
}
HeldSocket.CONNECTING = 0; HeldSocket.OPEN = 1; HeldSocket.CLOSING = 2; HeldSocket.CLOSED = 3;
window.WebSocket = HeldSocket;
"""


@pytest.fixture(scope="module")
def caller_page_url():
    """The caller page's own routes (gateway/caller_page.py) on a free port, no models."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    import uvicorn
    from starlette.applications import Starlette

    from gateway.caller_page import caller_routes

    app = Starlette(routes=caller_routes())
    app.state.services = SimpleNamespace(settings=SimpleNamespace(call_token=None, frame_ms=20))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)
    sock.close()


@contextlib.contextmanager
def held_caller_page(browser, url):
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": FAKE_SOCKET})["identifier"]
    try:
        browser.get(url)
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(browser, 30).until(
            lambda d: d.execute_script("return document.body.dataset.loaded") == "true")
        browser.execute_script("document.getElementById('call').click(); window.__ws.open();")
        yield lambda event: browser.execute_script("window.__ws.event(arguments[0])", event)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                                {"identifier": script})


def test_an_unasked_prompt_does_not_rewrite_the_shown_turns_source(browser, caller_page_url):
    # docs/protocol.md: what the bot says unasked (the greeting, the idle prompt, the
    # goodbye) is a `response` with a turn number of its own and no `route`. The page put
    # its source on the route panel of the caller's last turn: a cache hit of turn 1 then
    # read "source prompt" once the bot asked "Are you still there?".
    with held_caller_page(browser, caller_page_url) as event:
        event({"type": "ready", "call_id": "c1", "sample_rate": 16000, "encoding": "pcm16",
               "frame_ms": 20})
        event({"type": "transcript", "text": "when do you open", "final": True, "turn": 1})
        event({"type": "route", "turn": 1, "text": "when do you open", "intent": "hours",
               "action": "answer", "hit": True, "entry_id": "hours", "score": 0.93, "ms": 2.0,
               "reused": False})
        event({"type": "response", "turn": 1, "source": "cache", "text": "From nine to five.",
               "entry_id": "hours"})
        event({"type": "response", "turn": 2, "source": "prompt",
               "text": "Are you still there?", "entry_id": None})
        route = browser.execute_script(
            "const r = document.getElementById('route');"
            "return {turn: r.dataset.turn, hit: r.dataset.hit, source: r.dataset.source,"
            "        shown: document.getElementById('route-source').textContent};")
    assert route == {"turn": "1", "hit": "true", "source": "cache", "shown": "source cache"}, \
        route


def test_a_reply_with_a_long_link_stays_inside_the_caller_page(browser, caller_page_url):
    # An answer may hold a link (a cached FAQ answer, the agent's reply): the page's reply
    # row and the conversation must wrap it, not widen the page past the window.
    link = "https://bank.example.com/help/cards/replacement?ref=" + "a1b2c3d4" * 12
    with held_caller_page(browser, caller_page_url) as event:
        event({"type": "ready", "call_id": "c1", "sample_rate": 16000, "encoding": "pcm16",
               "frame_ms": 20})
        event({"type": "transcript", "text": "how do I replace my card", "final": True,
               "turn": 1})
        event({"type": "response", "turn": 1, "source": "cache",
               "text": "You can order a new card at " + link, "entry_id": "card"})
        layout = browser.execute_script(
            "return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth,"
            "        reply: document.getElementById('reply').getBoundingClientRect().right,"
            "        main: document.querySelector('main').getBoundingClientRect().right};")
    assert layout["reply"] <= layout["main"] + 1, layout
    assert layout["scroll"] <= layout["inner"], layout
