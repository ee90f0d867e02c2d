"""The caller page's logic (gateway/static/caller.js) run in node with a minimal fake DOM,
Web Audio clock and WebSocket, so each scenario is deterministic (a fake AudioContext clock, no
wall-clock timing) and needs no browser; tests/test_caller_page.py drives the real page in
Chromium. Each test failed before its fix (a review, stop 59)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_redis import IN_CI

CALLER_JS = Path(__file__).resolve().parent.parent / "gateway" / "static" / "caller.js"
NODE = shutil.which("node") or shutil.which("nodejs")

HARNESS = r"""
// Minimal fake DOM/WebAudio/WebSocket to run gateway/static/caller.js in node.
const fs = require("fs");
const vm = require("vm");
function makeEl(id) {
  const el = {
    id, children: [], dataset: {}, _text: "", disabled: false, value: "", listeners: {},
    classList: { set: new Set(), add(c) { this.set.add(c); }, remove(c) { this.set.delete(c); },
                 toggle(c, on) { if (on === undefined) on = !this.set.has(c); on ? this.set.add(c) : this.set.delete(c); },
                 contains(c) { return this.set.has(c); } },
    get textContent() { return this._text + this.children.map((c) => typeof c === "string" ? c : c.textContent).join(""); },
    set textContent(v) { this._text = String(v); this.children = []; },
    append(...xs) { for (const x of xs) this.children.push(typeof x === "string" ? x : (x && x.nodeType ? x : String(x))); },
    appendChild(x) { this.children.push(x); return x; },
    setAttribute(k, v) { this["attr:" + k] = v; },
    addEventListener(t, f) { this.listeners[t] = f; },
    focus() {}, nodeType: 1,
    get lastChild() { return this.children[this.children.length - 1]; },
  };
  return el;
}
const els = {};
const document = {
  body: makeEl("body"),
  getElementById(id) { return els[id] || (els[id] = makeEl(id)); },
  createElement(t) { return makeEl(t); },
  createElementNS(ns, t) { return makeEl(t); },
};
const audio = { now: 0, sources: [], closed: false };
class AudioContext {
  constructor() { this.sampleRate = 48000; this.destination = {}; this.audioWorklet = { addModule: async () => {} }; }
  get currentTime() { return audio.now; }
  resume() { return Promise.resolve(); }
  close() { audio.closed = true; for (const s of audio.sources) if (s.started && !s.stopped && !s.ended) s.cut = true; return Promise.resolve(); }
  createBuffer(ch, n, rate) { if (!(rate >= 3000)) throw new Error("bad rate " + rate); return { duration: n / rate, copyToChannel() {} }; }
  createBufferSource() {
    const s = { started: false, stopped: false, connect() {}, disconnect() {},
                start(at) { this.started = true; this.at = at; }, stop() { this.stopped = true; } };
    audio.sources.push(s); return s;
  }
  createMediaStreamSource() { return { connect() {}, disconnect() {} }; }
}
const sockets = [];
class WebSocket {
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; sockets.push(this); }
  send(x) { this.sent.push(x); }
  close() { this.readyState = 3; }
}
WebSocket.CONNECTING = 0; WebSocket.OPEN = 1; WebSocket.CLOSING = 2; WebSocket.CLOSED = 3;
const store = {};
const fetchAnswers = {};
async function fetch(path) {
  const a = fetchAnswers[path];
  if (!a) throw new Error("unreachable");
  return { ok: a.status < 400, status: a.status, json: async () => a.body };
}
const ctx = {
  document, AudioContext, WebSocket, fetch, console, setTimeout: () => 0, URL,
  location: { href: "http://gw.test/", protocol: "http:", origin: "http://gw.test" },
  navigator: { mediaDevices: { getUserMedia: async () => { throw Object.assign(new Error("no"), { name: "NotFoundError" }); } } },
  sessionStorage: { getItem: (k) => store[k] || null, setItem: (k, v) => { store[k] = v; }, removeItem: (k) => { delete store[k]; } },
  AudioWorkletNode: class {},
};
ctx.window = ctx;
vm.createContext(ctx);
const tick = () => new Promise((r) => setImmediate(r));
module.exports = { ctx, els, document, audio, sockets, fetchAnswers, store, tick,
  load(configBody) {
    fetchAnswers["/caller/config.json"] = { status: 200, body: configBody || { token_required: false, sample_rate: 16000, frame_ms: 20, call_path: "/v1/call" } };
    vm.runInContext(fs.readFileSync(process.env.CALLER_JS, "utf8"), ctx);
  },
  click(id) { document.getElementById(id).listeners.click(); },
  open(ws) { ws.readyState = 1; ws.onopen(); },
  msg(ws, obj) { ws.onmessage({ data: JSON.stringify(obj) }); },
  frame(ws, samples) { ws.onmessage({ data: vm.runInContext("new ArrayBuffer(" + samples * 2 + ")", ctx) }); },
  advance(t) {
    audio.now = t;
    for (const s of audio.sources) {
      if (s.started && !s.stopped && !s.cut && !s.ended && s.at + s.buffer.duration <= t + 1e-9) {
        s.ended = true; if (s.onended) s.onended();
      }
    }
  },
  close(ws, code, reason) { ws.readyState = 3; ws.onclose({ code, reason: reason || "" }); },
};
"""


def run_page(tmp_path: Path, scenario: str) -> dict:
    if NODE is None:  # under CI a failure, never a silent skip (scripts/ensure-node.sh)
        (pytest.fail if IN_CI else pytest.skip)("node is not installed: scripts/ensure-node.sh")
    (tmp_path / "harness.js").write_text(HARNESS)
    script = tmp_path / "scenario.js"
    script.write_text('const h = require("./harness.js");\n(async () => {\n' + scenario +
                      '\n})().catch((e) => { console.error(e); process.exit(1); });\n')
    done = subprocess.run([NODE, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={"CALLER_JS": str(CALLER_JS), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


START = """
  h.load(); await h.tick(); await h.tick();
  h.click("call"); const ws = h.sockets[0]; h.open(ws); await h.tick(); await h.tick();
  h.msg(ws, {type: "ready", call_id: "c1", sample_rate: 16000, encoding: "pcm16", frame_ms: 20});
"""


def test_the_gateways_idle_hangup_does_not_cut_the_goodbye_the_page_still_plays(tmp_path):
    # The gateway sends `hangup` once the goodbye has played plus its playout lead (60 ms),
    # then closes with 1000. The page schedules a reply 100 ms (PLAYBACK_LEAD_S) after its
    # first frame arrives, so it is still playing the goodbye's last frame when the close
    # comes: endCall() stops every scheduled buffer and closes the AudioContext.
    out = run_page(tmp_path, START + """
  h.msg(ws, {type: "response", turn: 0, source: "goodbye", text: "Goodbye."});
  // 1 s of goodbye in 200 ms messages, paced in real time with the server's 60 ms lead
  for (let i = 0; i < 5; i++) { h.advance(5 + Math.max(0, i * 0.2 - 0.06)); h.frame(ws, 3200); }
  h.advance(5 + 1.0 + 0.06);
  h.msg(ws, {type: "hangup", reason: "idle"});
  h.close(ws, 1000);
  const b = h.document.body.dataset;
  console.log(JSON.stringify({state: b.state, dropped: Number(b.framesDropped || 0),
                              cut: h.audio.sources.filter((s) => s.stopped || s.cut).length}));
""")
    assert out["state"] == "ended"
    assert out["dropped"] == 0 and out["cut"] == 0, f"goodbye audio cut at the hang-up: {out}"


def test_a_reply_stopped_for_the_time_limit_is_not_called_the_callers_barge_in(tmp_path):
    # docs/protocol.md: `interrupt` cause `time_limit` is the bot stopping its own reply for
    # the call's time limit; the page tells the caller "you interrupted the reply".
    out = run_page(tmp_path, START + """
  h.advance(5);
  h.msg(ws, {type: "response", turn: 3, source: "llm", text: "A long answer."});
  for (let i = 0; i < 3; i++) h.frame(ws, 3200);
  h.msg(ws, {type: "interrupt", turn: 3, cause: "time_limit", heard_ms: 100, sent_ms: 600});
  console.log(JSON.stringify({status: h.els.status.textContent,
                              cause: h.document.body.dataset.interruptCause}));
""")
    assert out["cause"] == "time_limit"
    assert "you interrupted" not in out["status"], out


def test_a_gateway_that_now_requires_a_token_gets_one_asked_for(tmp_path):
    # The page read /caller/config.json once, while the gateway was down (or before it was
    # restarted with VOICEGATE_CALL_TOKEN set): it believes no token is needed. A call is then
    # refused before open by a gateway that is ready (/readyz 200): the refusal can only be
    # the token, yet the page says "refused the call" and never asks for one, nor re-reads
    # its config: every later call fails the same way until the page is reloaded.
    out = run_page(tmp_path, """
  h.document.getElementById("token-box").classList.add("hidden");
  h.load(); delete h.fetchAnswers["/caller/config.json"];  // the gateway is down at load
  await h.tick(); await h.tick(); await h.tick();
  // it comes back, now with a call token
  h.fetchAnswers["/caller/config.json"] = {status: 200, body: {token_required: true,
      sample_rate: 16000, frame_ms: 20, call_path: "/v1/call"}};
  h.fetchAnswers["/readyz"] = {status: 200, body: {ready: true, draining: false}};
  h.click("call"); const ws = h.sockets[0];
  h.close(ws, 1006);  // a refused upgrade: closed before open
  for (let i = 0; i < 6; i++) await h.tick();
  console.log(JSON.stringify({
    asked: !h.document.getElementById("token-box").classList.contains("hidden"),
    error: h.document.body.dataset.error || ""}));
""")
    assert out["asked"], f"the page never asks for the token: {out}"
