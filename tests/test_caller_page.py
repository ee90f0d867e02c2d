"""The caller page (``GET /``) in a real headless Chromium whose microphone plays a WAV file.

Chromium's fake capture device loops the file, so each file is the question followed by a long
silence: one turn per call. The page keeps what happened as data-* attributes on <body>
(state, playback, frame counters), which is what these tests read.

Waits are generous: Chromium and the speech stack share a small, busy machine. They are not
speed checks (bench/ measures speed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from gateway.agent import Agent
from gateway.audio import resample_pcm16, write_wav
from gateway.client import Caller
from gateway.hedge import HedgedChat
from gateway.providers.openai_llm import OpenAIChat
from gateway.server import BackgroundServer
from tests.admin_support import seed_small
from tests.browser_support import chromium, fake_microphone_flags
from tests.fakes.openai_server import STALL, Reply

# Each test opens its own Chromium (the fake microphone is a command-line flag) and waits
# generously: more than the suite's default 300 s timeout on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LONG_S = 240  # a spoken turn through Chromium on a loaded machine
SHORT_S = 60
WAV_RATE = 48000  # what Chromium's capture runs at; the page's worklet resamples to 16 kHz
SPEECH_RATE = 16000
FRAME_BYTES = 640  # 20 ms at 16 kHz
SCREENSHOT = Path(tempfile.gettempdir()) / "voicegate-caller-page.png"
CALL_TOKEN = "page-token-5d1e"
AGENT_REPLY = "Your checking account holds one hundred and twelve dollars."


@pytest.fixture(scope="module")
def page_store(tmp_path_factory, runtime) -> Path:
    root = tmp_path_factory.mktemp("caller-page-store") / "store"
    seed_small(root, runtime)
    return root


@pytest.fixture(scope="module")
def page_server(settings, runtime, page_store):
    server = BackgroundServer(settings.replace(store_dir=str(page_store), cache_poll_s=600.0),
                              runtime).start()
    yield server
    server.stop()


def microphone_wav(path: Path, speech: bytes, silence_after_s: float = 60.0) -> Path:
    """Half a second of silence, the speech (16 kHz), then silence, as a 48 kHz WAV."""
    silence = lambda s: bytes(2 * int(SPEECH_RATE * s))  # noqa: E731
    pcm = silence(0.5) + speech + silence(silence_after_s)
    write_wav(path, resample_pcm16(pcm, SPEECH_RATE, WAV_RATE), WAV_RATE)
    return path


def page_state(driver) -> dict[str, str]:
    return driver.execute_script("return Object.assign({}, document.body.dataset)")


def wait_state(driver, predicate: Callable[[dict[str, str]], bool], what: str,
               timeout: float = LONG_S) -> dict[str, str]:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        state = page_state(d)
        return state if predicate(state) else False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; it shows {page_state(driver)}, "
                             f"error {text(driver, 'error')!r}") from None


def by_testid(driver, testid: str):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def text(driver, testid: str) -> str:
    return by_testid(driver, testid).text


def attrs(driver, testid: str) -> dict[str, Any]:
    return driver.execute_script("return Object.assign({}, arguments[0].dataset)",
                                 by_testid(driver, testid))


def num(state: dict[str, str], key: str) -> int:
    return int(state.get(key) or 0)


def open_page(driver, server: BackgroundServer) -> None:
    driver.get(server.base_url + "/")
    wait_state(driver, lambda s: s.get("loaded") == "true", "its settings loaded", SHORT_S)


def call(driver) -> dict[str, str]:
    by_testid(driver, "call").click()
    state = wait_state(driver, lambda s: s["state"] in ("in-call", "failed"), "the call started")
    assert state["state"] == "in-call", (state, text(driver, "error"))
    return state


def type_line(driver, line: str) -> None:
    from selenium.webdriver.common.keys import Keys
    box = by_testid(driver, "text")
    box.send_keys(line)
    box.send_keys(Keys.ENTER)


def hang_up(driver) -> None:
    by_testid(driver, "hangup").click()
    wait_state(driver, lambda s: s["state"] == "ended", "the call ended", SHORT_S)


def timeline_bars(driver) -> list[tuple[str, str, str]]:
    from selenium.webdriver.common.by import By
    return [(bar.get_attribute("data-stage"), bar.find_element(By.XPATH, "..").get_attribute(
                "data-turn"), bar.get_attribute("data-ms"))
            for bar in by_testid(driver, "timeline").find_elements(By.CSS_SELECTOR, "rect")]


# ---------------------------------------------------------------------- tests


def test_page_and_its_files_are_served(page_server):
    page = httpx.get(page_server.base_url + "/", timeout=10)
    assert page.status_code == 200 and 'data-testid="call"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("caller.js", "javascript"), ("mic-worklet.js", "javascript"),
                       ("caller.css", "css")):
        response = httpx.get(f"{page_server.base_url}/caller/{name}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    config = httpx.get(page_server.base_url + "/caller/config.json", timeout=10).json()
    assert config == {"token_required": False, "sample_rate": 16000, "frame_ms": 20,
                      "call_path": "/v1/call"}
    assert httpx.get(page_server.base_url + "/caller/nothing.js", timeout=10).status_code == 404


def test_the_page_keeps_its_headers_at_its_static_address_too(settings):
    """Review (stop 67): the page is also a static file (`/caller/caller.html`), served
    there without the page's headers: framed by any site (no `frame-ancestors 'none'`), its
    microphone not kept to it. Every address of the page now sends the same headers."""
    from starlette.testclient import TestClient

    from gateway.app import create_app

    client = TestClient(create_app(settings))  # no lifespan: the page needs no models
    page = client.get("/")
    static = client.get("/caller/caller.html")
    assert static.status_code == 200 and static.text == page.text
    for name in ("content-security-policy", "permissions-policy", "cache-control"):
        assert static.headers.get(name) == page.headers[name], name
    assert "frame-ancestors 'none'" in static.headers["content-security-policy"]
    # The page's scripts and styles are files as before (no page headers needed there).
    assert client.get("/caller/caller.js").status_code == 200


def test_spoken_faq_question_gets_the_cached_answer(page_server, speak, tmp_path):
    wav = microphone_wav(tmp_path / "question.wav",
                         speak("Hi, what time do your branches open on Saturday?"))
    clip = page_server.app.state.services.cache.audio.audio("opening_hours", SPEECH_RATE)
    answer = page_server.app.state.services.cache.loaded.entries["opening_hours"].answer
    with chromium(fake_microphone_flags(wav)) as browser:
        open_page(browser, page_server)
        call(browser)
        state = wait_state(browser, lambda s: num(s, "turns") >= 1, "a turn's metrics")

        route = attrs(browser, "route")
        assert (route["hit"], route["intent"], route["source"]) == ("true", "opening_hours",
                                                                    "cache"), route
        assert "cache hit" in text(browser, "route") and "opening_hours" in text(browser, "route")
        assert attrs(browser, "transcript")["final"] == "true"
        assert "branches" in text(browser, "transcript").lower()
        assert text(browser, "reply") == answer
        # the entry's audio, every frame of it (the last one padded to 20 ms)
        assert num(state, "bytesReceived") == math.ceil(len(clip) / FRAME_BYTES) * FRAME_BYTES
        # ... and all of it played through Web Audio
        state = wait_state(browser, lambda s: num(s, "framesPlayed") == num(s, "framesReceived")
                           and s["playback"] == "idle", "the reply played out", SHORT_S)
        assert num(state, "framesSent") > 100  # the microphone streamed (≥ 2 s of 20 ms frames)
        assert num(state, "interrupts") == 0 and num(state, "framesDropped") == 0
        bars = timeline_bars(browser)
        assert sorted(stage for stage, _, _ in bars) == ["audio", "eot", "route"]
        assert {turn for _, turn, _ in bars} == {route["turn"]}
        assert "error" not in state
        browser.save_screenshot(str(SCREENSHOT))
        hang_up(browser)
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.fixture
def agent_page_server(settings, runtime, page_store, llm_server):
    """The seeded gateway with an agent on the fake OpenAI-compatible LLM."""
    fake, llm = llm_server
    fake.replies["primary"] = Reply(text=AGENT_REPLY)
    fake.replies["secondary"] = Reply(text="The secondary answered.", ttft_s=STALL)
    chats = [OpenAIChat(m, base_url=llm.url + "/v1", name=m) for m in ("primary", "secondary")]
    agent = Agent(HedgedChat(chats[0], chats[1], hedge_delay_s=0.0), [], filler_after_s=None)
    server = BackgroundServer(settings.replace(store_dir=str(page_store), cache_poll_s=600.0),
                              dataclasses.replace(runtime, agent=agent)).start()
    yield server
    server.stop()


def test_spoken_question_for_the_agent_gets_the_agents_reply(agent_page_server, speak, tmp_path):
    wav = microphone_wav(tmp_path / "balance.wav",
                         speak("How much money is in my checking account?"))
    with chromium(fake_microphone_flags(wav)) as browser:
        open_page(browser, agent_page_server)
        call(browser)
        state = wait_state(browser, lambda s: num(s, "turns") >= 1, "a turn's metrics")
        route = attrs(browser, "route")
        assert (route["hit"], route["action"], route["source"]) == ("false", "llm", "llm"), route
        assert route["intent"] == "account_balance"
        assert text(browser, "reply") == AGENT_REPLY
        # the agent's sentence, synthesized: over a second of audio
        assert num(state, "bytesReceived") > 2 * SPEECH_RATE
        assert "source llm" in text(browser, "route")
        hang_up(browser)


def test_speaking_over_a_reply_stops_its_playback(page_server, speak, tmp_path):
    # The caller talks without pause; the page starts muted (it sends silence), asks by text,
    # and unmutes while the answer plays.
    talk = speak("Wait, no, stop, I need to ask you about something else entirely, "
                 "my card was declined at the grocery store this morning.")
    wav = microphone_wav(tmp_path / "talking.wav", talk, silence_after_s=0.0)
    clip = page_server.app.state.services.cache.audio.audio("opening_hours", SPEECH_RATE)
    clip_ms = len(clip) / 2 / SPEECH_RATE * 1000
    with chromium(fake_microphone_flags(wav)) as browser:
        open_page(browser, page_server)
        by_testid(browser, "mute").click()
        assert page_state(browser)["muted"] == "true"
        call(browser)
        type_line(browser, "what are your opening hours")
        wait_state(browser, lambda s: s["playback"] == "playing", "the reply playing")
        route = attrs(browser, "route")
        assert route["hit"] == "true" and route["source"] == "cache"
        by_testid(browser, "mute").click()  # the caller speaks over the reply
        state = wait_state(browser, lambda s: num(s, "interrupts") >= 1, "an interrupt")
        by_testid(browser, "mute").click()  # and stops
        assert state["interruptCause"] == "speech"
        # the frames the page had scheduled were stopped, not played out
        assert num(state, "interruptDropped") >= 1
        assert state["playback"] == "stopped" or num(state, "framesReceived") > num(
            state, "framesPlayed") + num(state, "framesDropped") - num(state, "interruptDropped")
        # the reply was cut well before its end
        assert num(state, "bytesReceived") / 2 / SPEECH_RATE * 1000 < clip_ms - 1000
        hang_up(browser)


@pytest.fixture
def guarded_server(settings, runtime, page_store):
    """A gateway that wants a call token and carries one call at a time."""
    server = BackgroundServer(settings.replace(store_dir=str(page_store), cache_poll_s=600.0,
                                               call_token=CALL_TOKEN, max_calls=1),
                              runtime).start()
    yield server
    server.stop()


async def test_token_typing_and_errors_in_plain_words(guarded_server):
    server = guarded_server
    with chromium(["--use-fake-ui-for-media-stream",  # allowed, but there is no microphone
                   "--autoplay-policy=no-user-gesture-required"]) as browser:
        open_page(browser, server)
        assert page_state(browser)["tokenRequired"] == "true"
        assert by_testid(browser, "token").is_displayed()

        by_testid(browser, "token").send_keys("not-the-token")
        by_testid(browser, "token").submit()
        wait_state(browser, lambda s: s["state"] == "failed", "a refused call", SHORT_S)
        assert "token is wrong" in browser.find_element("id", "token-error").text
        assert by_testid(browser, "token").is_displayed()

        by_testid(browser, "token").send_keys(CALL_TOKEN)
        by_testid(browser, "token").submit()
        state = wait_state(browser, lambda s: s["state"] in ("in-call", "failed"),
                           "the call started")
        assert state["state"] == "in-call", "the right token was refused"
        # no microphone here: said in plain words, and typing still works
        wait_state(browser, lambda s: "microphone" in s.get("error", "").lower(),
                   "the missing microphone", SHORT_S)
        type_line(browser, "what are your opening hours")
        wait_state(browser, lambda s: num(s, "turns") >= 1, "a typed turn's metrics")
        assert attrs(browser, "route")["hit"] == "true"
        assert attrs(browser, "transcript")["final"] == "true"
        hang_up(browser)

        # asked once: a reload in the same tab calls with the remembered token
        open_page(browser, server)
        assert not by_testid(browser, "token").is_displayed()
        call(browser)
        hang_up(browser)

        # the one call this gateway carries is taken
        async with Caller(server.call_url, token=CALL_TOKEN):
            by_testid(browser, "call").click()
            state = wait_state(browser, lambda s: s["state"] == "failed", "a refused call")
        assert state["errorCode"] == "too_many_calls"
        assert "busy" in text(browser, "error")

        call(browser)
        server.stop()  # the gateway goes away mid-call
        state = wait_state(browser, lambda s: s["state"] == "failed", "the lost connection")
        assert "connection to the gateway was lost" in text(browser, "error")


@contextlib.contextmanager
def draining(services):
    services.admission.draining = True
    try:
        yield
    finally:
        services.admission.draining = False


@contextlib.contextmanager
def overloaded(services):
    # Held overloaded: a threshold of 0 stops the loop's watch from opening the gate.
    services.overload.threshold_s, services.overload.overloaded = 0.0, True
    try:
        yield
    finally:
        services.overload.threshold_s = services.settings.overload_loop_lag_ms / 1000.0
        services.overload.overloaded = False


@pytest.mark.parametrize("refusing, code, said", [(draining, "draining", "shutting down"),
                                                  (overloaded, "overloaded", "busy")])
def test_a_gateway_taking_no_calls_for_now_keeps_the_token(guarded_server, refusing, code,
                                                           said):
    """A draining (or still loading) gateway refuses the upgrade with HTTP 503, which the
    browser hides like any refused upgrade: the page took it for a wrong token, forgot the
    token the operator had typed and asked for it again, so the next call, once the gateway
    took calls again, failed for want of a token.

    Review (stop 68): an overloaded replica refuses the upgrade with HTTP 503 `overloaded`
    while its /readyz stays 200 (gateway/overload.py). The page, asking /readyz why and told
    "ready", took that refusal for a wrong token too, and said "the token is wrong". It now
    reads /readyz's `overloaded` and says the gateway is busy, the token kept."""
    server = guarded_server
    services = server.app.state.services
    with chromium(["--use-fake-ui-for-media-stream",  # no microphone: the call is the point
                   "--autoplay-policy=no-user-gesture-required"]) as browser:
        open_page(browser, server)
        with refusing(services):
            by_testid(browser, "token").send_keys(CALL_TOKEN)
            by_testid(browser, "token").submit()
            state = wait_state(browser, lambda s: s["state"] == "failed", "a refused call",
                               SHORT_S)
        assert browser.execute_script(
            "return sessionStorage.getItem('voicegate.callToken')") == CALL_TOKEN
        assert not by_testid(browser, "token").is_displayed()
        assert state.get("errorCode") == code, state
        assert said in text(browser, "error")
        call(browser)  # with the kept token, nothing asked
        hang_up(browser)


def test_a_lost_message_is_not_shown_as_the_call_ending(page_server, monkeypatch):
    # A bug in handling one input (a typed message here) loses that input and is sent as
    # an `internal_error` without a turn, while the call goes on (docs/protocol.md). The
    # page said "ended this call. Call again." and, when the caller later hung up or the
    # gateway closed the call normally, showed it as failed.
    from gateway.call.engine import Call

    original = Call._on_text
    raised: list[str] = []

    async def failing(self, text, final):
        if not raised:
            raised.append(text)
            raise RuntimeError("bug in _on_text")
        return await original(self, text, final)

    monkeypatch.setattr(Call, "_on_text", failing)
    with chromium(["--use-fake-ui-for-media-stream",  # no microphone: typing only
                   "--autoplay-policy=no-user-gesture-required"]) as browser:
        open_page(browser, page_server)
        call(browser)
        type_line(browser, "hello")
        state = wait_state(browser, lambda s: "internal_error" in text(browser, "status")
                           or s.get("errorCode") == "internal_error", "the lost message")
        assert raised == ["hello"]
        type_line(browser, "what are your opening hours")
        state = wait_state(browser, lambda s: num(s, "turns") >= 1, "a typed turn's metrics")
        assert state["state"] == "in-call"
        assert "ended this call" not in text(browser, "error")
        hang_up(browser)

        # a call that fails inside the gateway still says so, and ends as failed
        async def broken(self):
            raise RuntimeError("bug in Call.run")

        monkeypatch.setattr(Call, "run", broken)
        by_testid(browser, "call").click()
        state = wait_state(browser, lambda s: s["state"] == "failed", "the failed call")
        assert state["errorCode"] == "internal_error"
        assert "ended this call" in text(browser, "error")


async def test_the_pages_call_token_stays_out_of_the_servers_log(guarded_server):
    # A browser WebSocket cannot send headers, so the page presents the call token as
    # `?token=` (docs/protocol.md). uvicorn logs every upgrade's path and query at `info`
    # (the CLI's default level): the token must not reach that log, accepted or refused.
    import json
    import logging

    import websockets

    server = guarded_server
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    uvicorn_log.addHandler(handler)
    uvicorn_log.setLevel(logging.INFO)  # as `voicegate serve` runs it
    try:
        async with websockets.connect(f"{server.call_url}?token={CALL_TOKEN}") as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "stop"}))
            await ws.wait_closed()
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(f"{server.call_url}?token=a-wrong-guess-7"):
                pass
    finally:
        uvicorn_log.removeHandler(handler)
        uvicorn_log.setLevel(level)
    lines = [r.getMessage() for r in records]
    assert any("WebSocket /v1/call" in line and "[accepted]" in line for line in lines), lines
    assert any("WebSocket /v1/call" in line and "403" in line for line in lines), lines
    assert not [line for line in lines if CALL_TOKEN in line or "a-wrong-guess-7" in line]


@pytest.fixture
def idle_server(settings, runtime, page_store):
    """A gateway that prompts a silent caller after 1 s, and hangs up 1 s later."""
    server = BackgroundServer(settings.replace(store_dir=str(page_store), cache_poll_s=600.0,
                                               idle_prompt_s=1.0), runtime).start()
    yield server
    server.stop()


def test_a_stage_failing_on_the_callers_audio_does_not_fail_the_call(idle_server, monkeypatch,
                                                                      tmp_path):
    # A stage that fails on the caller's audio (vad_failed here; stt_failed and
    # turn_model_failed alike) is sent without a turn, and the call goes on
    # (docs/protocol.md, "Errors"). The page took every error without a turn for the
    # call's end: it showed it as the call's error, and when the gateway later ended the
    # call normally (the idle hang-up, 1000), it showed the call as failed.
    from gateway.vad import VADBatcher

    original = VADBatcher.score
    failed: list[int] = []

    async def failing_once(self, state, windows):
        if not failed:
            failed.append(len(windows))
            raise RuntimeError("the VAD model crashed")
        return await original(self, state, windows)

    monkeypatch.setattr(VADBatcher, "score", failing_once)
    wav = microphone_wav(tmp_path / "silence.wav", b"", silence_after_s=5.0)
    with chromium(fake_microphone_flags(wav)) as browser:
        open_page(browser, idle_server)
        call(browser)
        during = wait_state(browser, lambda s: s.get("errorCode") == "vad_failed",
                            "the failed stage")
        said = text(browser, "status"), text(browser, "error")
        # silent: the gateway prompts, says goodbye and ends the call (1000)
        state = wait_state(browser, lambda s: s["state"] in ("ended", "failed"),
                           "the gateway's hang-up")
        ended = state["state"], text(browser, "status"), text(browser, "error")
        assert failed
        assert ended == ("ended", "the gateway ended the call (no one spoke)", ""), (ended, said)
        # said while the call went on, in the status line, not as the call's error
        assert "voice activity detection failed" in said[0] and "goes on" in said[0], said
        assert "error" not in during and said[1] == "", said


# Counts the page's WebSockets (the page reads the global WebSocket when it calls).
COUNT_SOCKETS = """
window.__sockets = 0;
const PageSocket = window.WebSocket;
window.WebSocket = class extends PageSocket {
  constructor(...args) { super(...args); window.__sockets += 1; }
};
"""


def test_a_double_click_on_call_makes_one_call(page_server):
    # startCall awaited the AudioContext's resume before it took the call as begun (and
    # disabled the button): a second click meanwhile started a second call. The page
    # showed one; the other stayed open on the gateway, holding one of its calls (a busy
    # refusal for the shown one on a gateway near max_calls), out of the page's reach:
    # hanging up did not end it; only the gateway's idle hang-up did, its prompts unanswered.
    with chromium(["--use-fake-ui-for-media-stream",  # no microphone: the call is the point
                   "--autoplay-policy=no-user-gesture-required"]) as browser:
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                {"source": COUNT_SOCKETS})
        open_page(browser, page_server)
        browser.execute_script("const button = document.querySelector('[data-testid=call]');"
                               "button.click(); button.click();")
        state = wait_state(browser, lambda s: s["state"] in ("in-call", "failed"),
                           "the call started")
        assert state["state"] == "in-call", (state, text(browser, "error"))
        assert browser.execute_script("return window.__sockets") == 1
        hang_up(browser)
