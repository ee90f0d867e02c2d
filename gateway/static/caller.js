// The caller page: one call to this gateway over the native protocol (docs/protocol.md).
//
// Microphone → AudioWorklet (mic-worklet.js: 20 ms PCM16 frames at the negotiated rate) →
// binary WebSocket frames. Reply frames → AudioBuffers scheduled back to back on the
// AudioContext's clock (gapless), all stopped at once on `interrupt`. Events fill the
// panels. What happened is also kept as data-* attributes on <body> (state, playback,
// frame counters), so a test in a real browser can observe the call.
"use strict";

(() => {
  const TOKEN_KEY = "voicegate.callToken";
  const PLAYBACK_LEAD_S = 0.1;  // scheduling slack when a reply starts (or after an underrun)
  const TIMELINE_TURNS = 8;      // rows kept in the timeline chart
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const els = {
    call: $("call"), hangup: $("hangup"), mute: $("mute"), micState: $("mic-state"),
    textForm: $("text-form"), textInput: $("text-input"), textSend: $("text-send"),
    transcript: $("transcript"), route: $("route"), reply: $("reply"), playback: $("playback"),
    timeline: $("timeline"), history: $("history"), status: $("status"), error: $("error"),
    tokenBox: $("token-box"), tokenForm: $("token-form"), tokenInput: $("token-input"),
    tokenError: $("token-error"),
  };

  let config = { token_required: false, sample_rate: 16000, frame_ms: 20, call_path: "/v1/call" };
  let call = null;           // the call in progress (see startCall)
  const turnsShown = [];     // turn_metrics of the last turns, for the chart

  // ------------------------------------------------------------------ small helpers

  function bump(name, by = 1) { body.dataset[name] = String(Number(body.dataset[name] || 0) + by); }

  function setState(state, words) {
    body.dataset.state = state;
    els.status.textContent = words;
  }

  function showError(words) {
    els.error.textContent = words;
    els.error.classList.remove("hidden");
    body.dataset.error = words;
  }

  function clearError() {
    els.error.classList.add("hidden");
    els.error.textContent = "";
    delete body.dataset.error;
  }

  function setText(el, text) {
    el.textContent = text;
    el.classList.toggle("empty", text === "–");
  }

  function tag(text, cls) {
    const span = document.createElement("span");
    span.className = "tag" + (cls ? " " + cls : "");
    span.textContent = text;
    return span;
  }

  function storedToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function askToken(problem) {
    els.tokenBox.classList.remove("hidden");
    els.tokenError.classList.toggle("hidden", !problem);
    els.tokenError.textContent = problem || "";
    els.tokenInput.value = "";
    els.tokenInput.focus();
  }

  // ------------------------------------------------------------------ reply playback

  class Player {
    constructor(ctx, rate) {
      this.ctx = ctx;
      this.rate = rate;
      this.sources = new Set();
      this.nextAt = 0;  // AudioContext time where the next frame starts
    }

    setPlayback(state) {
      body.dataset.playback = state;
      setText(els.playback, state);
    }

    play(arrayBuffer) {
      const pcm = new Int16Array(arrayBuffer);
      if (pcm.length === 0) return;
      const samples = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
      const buffer = this.ctx.createBuffer(1, pcm.length, this.rate);
      buffer.copyToChannel(samples, 0);
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.ctx.destination);
      const now = this.ctx.currentTime;
      if (this.nextAt < now) {  // a new reply, or the network fell behind: start with slack
        if (this.sources.size > 0) bump("underruns");
        this.nextAt = now + PLAYBACK_LEAD_S;
      }
      source.start(this.nextAt);
      this.nextAt += buffer.duration;
      source.onended = () => {
        if (!this.sources.delete(source)) return;  // stopped by an interrupt: counted there
        bump("framesPlayed");
        if (this.sources.size === 0 && body.dataset.playback === "playing") this.setPlayback("idle");
      };
      this.sources.add(source);
      if (body.dataset.playback !== "playing") this.setPlayback("playing");
    }

    // Everything buffered goes silent now (barge-in, hang-up).
    stop(state) {
      const dropped = this.sources.size;
      const pending = [...this.sources];
      this.sources.clear();
      for (const source of pending) {
        try { source.stop(); } catch (e) { /* never started */ }
        source.disconnect();
      }
      this.nextAt = 0;
      bump("framesDropped", dropped);
      this.setPlayback(state);
    }
  }

  // ------------------------------------------------------------------ microphone

  async function startMicrophone(current) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("This browser gives pages a microphone only over https or on localhost " +
                      "(this page is " + location.origin + "). You can still type below.");
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true,
                 autoGainControl: true },
      });
    } catch (err) {
      throw new Error(microphoneProblem(err));
    }
    if (current !== call) { stream.getTracks().forEach((t) => t.stop()); return; }
    current.stream = stream;
    const ctx = current.ctx;
    await ctx.audioWorklet.addModule("/caller/mic-worklet.js");
    if (current !== call) return;
    const node = new AudioWorkletNode(ctx, "voicegate-mic-frames", {
      numberOfInputs: 1, numberOfOutputs: 0,
      processorOptions: { targetRate: current.rate, frameMs: config.frame_ms },
    });
    node.port.onmessage = (event) => {
      const ws = current.ws;
      if (ws.readyState !== WebSocket.OPEN) return;
      ws.send(event.data);
      bump("framesSent");
    };
    node.port.postMessage({ muted: current.muted });
    const source = ctx.createMediaStreamSource(stream);
    source.connect(node);
    current.mic = { node, source };
    const track = stream.getAudioTracks()[0];
    track.onended = () => {
      if (current === call) showError("The microphone stopped (unplugged, or access was withdrawn). " +
                                      "You can still type below.");
    };
    els.micState.textContent = (current.muted ? "microphone muted (sending silence) · "
                                              : "microphone on · ") +
                               ctx.sampleRate + " Hz → " + current.rate + " Hz";
  }

  function microphoneProblem(err) {
    switch (err && err.name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Microphone access was refused. Allow the microphone for this site (in the " +
               "address bar's site settings) and call again. You can still type below.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No microphone was found. Connect one and call again, or type below.";
      case "NotReadableError":
        return "The microphone could not be started: another application may be using it. " +
               "You can still type below.";
      default:
        return "The microphone could not be started (" + (err && err.name) + ": " +
               (err && err.message) + "). You can still type below.";
    }
  }

  // Mute works before a call too (join muted); muted, the page sends silence.
  function setMuted(muted) {
    els.mute.setAttribute("aria-pressed", String(muted));
    els.mute.textContent = muted ? "Unmute" : "Mute";
    body.dataset.muted = String(muted);
    if (!call) return;
    call.muted = muted;
    if (call.mic) {
      call.mic.node.port.postMessage({ muted });
      els.micState.textContent = muted ? "microphone muted (sending silence)" : "microphone on";
    }
  }

  // ------------------------------------------------------------------ the call

  function callUrl(token) {
    const url = new URL(config.call_path, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (token) url.searchParams.set("token", token);
    return url.toString();
  }

  function startCall() {
    if (call) return;
    clearError();
    const token = storedToken();
    if (config.token_required && !token) { askToken(); return; }
    const ctx = new AudioContext();
    // Not awaited: the call is begun (`call` set) before anything else runs, so a second
    // click meanwhile starts no second call.
    ctx.resume().catch(() => { /* resumes on the next gesture */ });
    const rate = config.sample_rate;
    const current = {
      ctx, rate, token, muted: body.dataset.muted === "true", opened: false, hungUp: false,
      lastError: null, player: new Player(ctx, rate), mic: null, stream: null, ws: null,
    };
    call = current;
    els.call.disabled = true;
    els.hangup.disabled = false;
    setState("connecting", "connecting…");
    const ws = new WebSocket(callUrl(token));
    ws.binaryType = "arraybuffer";
    current.ws = ws;
    ws.onopen = () => {
      current.opened = true;
      ws.send(JSON.stringify({ type: "start", sample_rate: rate, encoding: "pcm16",
                               metadata: { client: "caller-page" } }));
      // The microphone starts once the line is open, so the first words are not lost.
      startMicrophone(current).catch((err) => {
        // The gateway's own refusal (busy, not ready) may arrive first; it says more.
        if (current === call && !current.lastError) showError(err.message);
        els.micState.textContent = "no microphone";
      });
    };
    ws.onmessage = (event) => { if (current === call) onMessage(current, event.data); };
    ws.onclose = (event) => onClose(current, event);
  }

  function hangUp() {
    if (!call) return;
    const current = call;
    current.hungUp = true;
    if (current.ws.readyState === WebSocket.OPEN) {
      current.ws.send(JSON.stringify({ type: "stop" }));
      // The gateway closes the socket; if it does not within a few seconds, we do.
      setTimeout(() => { if (current.ws.readyState !== WebSocket.CLOSED) current.ws.close(); }, 3000);
    } else {
      current.ws.close();
    }
    setState("ending", "hanging up…");
  }

  function endCall(current) {
    if (current !== call) return;
    call = null;
    if (current.mic) { current.mic.source.disconnect(); current.mic.node.port.onmessage = null; }
    if (current.stream) current.stream.getTracks().forEach((t) => t.stop());
    if (current.serverHangup) {
      // The gateway hung up after its goodbye: it sends `hangup` once the goodbye left,
      // and the page plays each reply PLAYBACK_LEAD_S behind: let its last words play out.
      const left = Math.max(0, current.player.nextAt - current.ctx.currentTime);
      setTimeout(() => current.ctx.close().catch(() => {}), left * 1000 + 50);
    } else {
      if (current.player.sources.size) current.player.stop("idle");
      current.ctx.close().catch(() => {});
    }
    els.call.disabled = false;
    els.hangup.disabled = true;
    els.textInput.disabled = true;
    els.textSend.disabled = true;
    els.micState.textContent = "microphone off";
  }

  function onClose(current, event) {
    if (current !== call) return;
    if (current.hungUp) {
      setState("ended", "call ended");
    } else if (!current.opened) {
      endCall(current);
      explainRefusal(current);
      return;
    } else if (event.code === 1011) {  // the call failed inside the gateway (onError)
      showError(ERROR_WORDS.internal_error);
      setState("failed", "call ended by the gateway");
    } else if (current.lastError) {
      setState("failed", "call ended by the gateway");  // the error is already on screen
    } else if (event.code === 1000) {
      setState("ended", "the gateway ended the call" +
               (current.serverHangup ? " (" + (HANGUP_WORDS[current.serverHangup] ||
                                               current.serverHangup) + ")" : ""));
    } else if (event.code === 1006 || event.code === 1001 || event.code === 1012) {
      showError("The connection to the gateway was lost: it stopped, restarted or the network " +
                "dropped. Call again when it is back.");
      setState("failed", "connection lost");
    } else {
      showError("The gateway closed the call (code " + event.code +
                (event.reason ? ": " + event.reason : "") + ").");
      setState("failed", "call ended by the gateway");
    }
    endCall(current);
  }

  // A close before open: the browser hides the HTTP status of a refused upgrade. /readyz
  // tells a gateway that takes no call for now (503: models loading, draining) and one that
  // cannot be reached from one that refused this call (with a token, a wrong one: 403).
  // Only that last case forgets the token; the others keep it for the next try.
  async function explainRefusal(current) {
    let answer = null;
    try {
      const response = await fetch("/readyz", { cache: "no-store" });
      let ready = {};
      try { ready = await response.json(); } catch (e) { /* not JSON: the status says it */ }
      answer = { status: response.status, draining: !!ready.draining,
                 overloaded: !!ready.overloaded };
    } catch (e) { /* no answer at all: unreachable */ }
    if (call !== null) return;  // the operator called again meanwhile: that call speaks
    if (answer && answer.status === 503) {
      const code = answer.draining ? "draining" : "not_ready";
      body.dataset.errorCode = code;
      showError(ERROR_WORDS[code]);
      setState("failed", "gateway not taking calls");
    } else if (answer && answer.overloaded) {
      // Refused with 503 `overloaded` while /readyz stays 200 (gateway/overload.py): no
      // token problem, so the token is kept.
      body.dataset.errorCode = "overloaded";
      showError(ERROR_WORDS.overloaded);
      setState("failed", "gateway busy");
    } else if (answer && current.token) {
      try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* private mode */ }
      askToken("The gateway refused the call: the token is wrong. Enter it again.");
      setState("failed", "call refused");
    } else if (answer) {
      // A ready gateway refusing a call without a token: it may have been restarted with
      // one since the page read its settings (or was down then). Read them again.
      await loadConfig();
      if (call !== null) return;
      if (config.token_required) {
        askToken("This gateway now requires a call token.");
      } else {
        showError("The gateway at " + callUrl("") + " refused the call.");
      }
      setState("failed", "call refused");
    } else {
      showError("Could not reach the gateway at " + callUrl("") + ". Is it running?");
      setState("failed", "not connected");
    }
  }

  // ------------------------------------------------------------------ events

  function onMessage(current, data) {
    if (data instanceof ArrayBuffer) {
      bump("framesReceived");
      bump("bytesReceived", data.byteLength);
      current.player.play(data);
      return;
    }
    let event;
    try { event = JSON.parse(data); } catch (e) { return; }
    switch (event.type) {
      case "ready":
        setState("in-call", "in a call · " + event.sample_rate + " Hz");
        els.textInput.disabled = false;
        els.textSend.disabled = false;
        break;
      case "transcript": onTranscript(current, event); break;
      case "route": onRoute(current, event); break;
      case "response": onResponse(current, event); break;
      case "handoff":
        current.handoff = event.reason || "handoff";
        body.dataset.handoff = "true";
        appendReply(current, event.turn, null, "→ the call should go to a person (" +
                    (event.reason || "handoff") + ")");
        break;
      case "hangup":  // the gateway hangs up (its goodbye has left): the close follows
        current.serverHangup = event.reason || "hangup";
        break;
      case "interrupt": {
        if (event.cause === "time_limit") {  // the bot stops its own reply: no barge-in
          current.player.stop("stopped");
          body.dataset.interruptCause = event.cause;
          els.status.textContent = "the call reached its time limit";
          break;
        }
        bump("interrupts");
        const before = Number(body.dataset.framesDropped || 0);
        current.player.stop("stopped");
        // What this interrupt silenced: frames already scheduled that will never play.
        body.dataset.interruptDropped = String(Number(body.dataset.framesDropped) - before);
        body.dataset.interruptCause = event.cause || "";
        els.status.textContent = "you interrupted the reply";
        break;
      }
      case "resume":
        bump("resumes");
        current.player.setPlayback("resumed");
        els.status.textContent = "in a call · the reply goes on (that was not speech)";
        break;
      case "turn_metrics": onMetrics(event); break;
      case "error": onError(current, event); break;
      default: break;
    }
  }

  // A new turn starts with its first transcript after the previous turn's final one.
  function newTurnPanel(current) {
    current.turnDone = false;
    current.replyTurn = null;
    setText(els.route, "–");
    setText(els.reply, "–");
    for (const key of ["hit", "intent", "action", "source", "entryId", "turn"]) {
      delete els.route.dataset[key];
    }
  }

  function onTranscript(current, event) {
    if (current.turnDone !== false) newTurnPanel(current);
    setText(els.transcript, event.text || "…");
    els.transcript.dataset.final = String(!!event.final);
    if (event.final) {
      current.turnDone = true;
      addHistory("you", event.text);
    }
  }

  function onRoute(current, event) {
    const el = els.route;
    el.textContent = "";
    el.dataset.turn = String(event.turn);
    el.dataset.hit = String(!!event.hit);
    el.dataset.intent = event.intent || "";
    el.dataset.action = event.action || "";
    el.dataset.entryId = event.entry_id || "";
    el.classList.remove("empty");
    el.append(tag(event.hit ? "cache hit" : "cache miss", event.hit ? "hit" : "miss"));
    el.append(tag("intent " + (event.intent || "out of scope")));
    el.append(tag("action " + event.action));
    const source = tag("source …");
    source.id = "route-source";
    el.append(source);
    const detail = document.createElement("span");
    detail.className = "muted-text";
    const score = typeof event.score === "number" ? " · score " + event.score.toFixed(2) : "";
    detail.textContent = "routed in " + Number(event.ms || 0).toFixed(1) + " ms" + score +
                         (event.reused ? " · decided on a partial transcript" : "");
    el.append(detail);
  }

  function onResponse(current, event) {
    // The turn's source is what answered it; a filler only bridged the wait. A line the
    // bot says unasked (greeting, idle prompt, goodbye) has a turn of its own, no route:
    // it does not rewrite the source of the caller's turn shown.
    if (String(event.turn) === els.route.dataset.turn &&
        (event.source !== "filler" || !els.route.dataset.source)) {
      els.route.dataset.source = event.source;
      const source = document.getElementById("route-source");
      if (source) source.textContent = "source " + event.source;
    }
    appendReply(current, event.turn, event.source, event.text);
  }

  function appendReply(current, turn, source, text) {
    if (current.replyTurn !== turn) {
      current.replyTurn = turn;
      els.reply.textContent = "";
      els.reply.classList.remove("empty");
    }
    if (!text) return;
    if (els.reply.textContent) els.reply.append(" ");
    els.reply.append(text);
    if (source) addHistory("gateway (" + source + ")", text);
  }

  function addHistory(who, text) {
    const li = document.createElement("li");
    const whoEl = document.createElement("span");
    whoEl.className = "who";
    whoEl.textContent = who + ": ";
    li.append(whoEl, text);
    els.history.append(li);
  }

  const HANGUP_WORDS = {  // a `hangup` event's reason, as the status says it
    idle: "no one spoke",
    time_limit: "the call reached its time limit",
  };

  const ERROR_WORDS = {
    too_many_calls: "The gateway is busy: it is already carrying as many calls as it allows. " +
                    "Try again in a moment.",
    not_ready: "The gateway is still loading its speech models. Try again in a few seconds.",
    draining: "The gateway is shutting down and takes no new calls. Try again in a moment.",
    overloaded: "The gateway is busy: it is behind on the calls it has and takes no new one " +
                "until it catches up. Try again in a moment.",
    audio_too_fast: "The gateway ended the call: audio arrived faster than real time.",
    client_not_reading: "The gateway ended the call: this page stopped reading its messages.",
    start_timeout: "The gateway ended the call: the call did not start in time.",
    internal_error: "The gateway hit an internal error and ended this call. Call again.",
  };

  // The errors after which the gateway closes the call (docs/protocol.md, "Errors"; and
  // internal_error, below). Any other leaves it open: a stage that failed, of one turn or on
  // the caller's audio (vad_failed, stt_failed, turn_model_failed: no turn), or one message
  // dropped (too_many_messages; odd_pcm_length and frame_too_large in a running call: the
  // page sends `start` first, and only before it does frame_too_large close).
  const CALL_ENDING = new Set([
    "too_many_calls", "draining", "start_timeout", "audio_too_fast", "client_not_reading",
    "too_many_bad_messages", "messages_too_fast", "unsupported_sample_rate",
    "unsupported_encoding", "unsupported_channels",
  ]);

  function onError(current, event) {
    const ending = CALL_ENDING.has(event.code) || event.code === "internal_error";
    if (event.turn !== undefined || !ending) {
      // The call goes on: said where the call's progress is, not as the call's error.
      els.status.textContent = (event.turn !== undefined ? "turn " + event.turn + ": " : "") +
                               event.message + " (" + event.code + "); the call goes on";
      body.dataset.errorCode = event.code;
      return;
    }
    if (event.code === "internal_error") {
      // Either one input was lost and the call goes on, or the call failed: then the
      // gateway closes it with 1011 next (onClose says so).
      els.status.textContent = event.message + " (" + event.code + "): what you last said, " +
                               "typed or keyed may be lost";
      body.dataset.errorCode = event.code;
      return;
    }
    current.lastError = event.code;
    body.dataset.errorCode = event.code;
    showError(ERROR_WORDS[event.code] || (event.message + " (" + event.code + ")"));
  }

  // ------------------------------------------------------------------ timeline chart

  const STAGES = [
    ["eot", "end of turn", "end_of_turn_ms"],
    ["route", "route", "route_decided_ms"],
    ["audio", "first audio", "reply_latency_ms"],
  ];

  function onMetrics(metrics) {
    bump("turns");
    turnsShown.push(metrics);
    if (turnsShown.length > TIMELINE_TURNS) turnsShown.shift();
    drawTimeline();
  }

  function drawTimeline() {
    const NS = "http://www.w3.org/2000/svg";
    const width = 760, labelW = 120, valueW = 70, barH = 9, gap = 3, rowGap = 12;
    const rowH = STAGES.length * (barH + gap) + rowGap;
    let max = 100;
    for (const m of turnsShown) for (const [, , key] of STAGES) {
      if (typeof m[key] === "number") max = Math.max(max, m[key]);
    }
    const scale = (width - labelW - valueW) / max;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + (turnsShown.length * rowH));
    svg.setAttribute("height", String(turnsShown.length * rowH));
    const el = (name, attrs, text) => {
      const node = document.createElementNS(NS, name);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      if (text !== undefined) node.textContent = text;
      return node;
    };
    turnsShown.forEach((m, row) => {
      const group = el("g", { class: "turn", "data-turn": m.turn, "data-input": m.input,
                              "data-source": m.source || "" });
      const y0 = row * rowH;
      const what = m.hit ? "cache hit" : (m.source || "no reply");
      group.append(el("text", { x: 0, y: y0 + barH + 2 }, "turn " + m.turn));
      group.append(el("text", { x: 0, y: y0 + 2 * (barH + gap) + barH - 2 }, what));
      STAGES.forEach(([cls, label, key], i) => {
        const value = m[key];
        const y = y0 + i * (barH + gap);
        if (typeof value === "number") {
          group.append(el("rect", { class: cls, x: labelW, y, height: barH,
                                    width: Math.max(1, value * scale), "data-stage": cls,
                                    "data-ms": value.toFixed(1) }, undefined));
          group.lastChild.append(el("title", {}, label + ": " + value.toFixed(1) + " ms"));
        }
        const x = labelW + (typeof value === "number" ? Math.max(1, value * scale) : 0) + 4;
        group.append(el("text", { class: "value", x, y: y + barH - 1 },
                        typeof value === "number" ? value.toFixed(0) + " ms" : "–"));
      });
      svg.append(group);
    });
    els.timeline.textContent = "";
    els.timeline.append(svg);
    els.timeline.dataset.count = String(turnsShown.length);
  }

  // ------------------------------------------------------------------ wiring

  els.call.addEventListener("click", () => { startCall(); });
  els.hangup.addEventListener("click", hangUp);
  els.mute.addEventListener("click", () => setMuted(body.dataset.muted !== "true"));
  els.textForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.textInput.value.trim();
    if (!text || !call || call.ws.readyState !== WebSocket.OPEN) return;
    call.ws.send(JSON.stringify({ type: "text", text, final: true }));
    els.textInput.value = "";
  });
  els.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = els.tokenInput.value.trim();
    if (!token) return;
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* private mode */ }
    els.tokenBox.classList.add("hidden");
    els.tokenError.classList.add("hidden");
    startCall();
  });

  async function loadConfig() {
    try {
      const response = await fetch("/caller/config.json", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      config = Object.assign(config, await response.json());
    } catch (err) {
      showError("Could not read the gateway's settings (" + err.message + "). Is it running?");
    }
    body.dataset.tokenRequired = String(!!config.token_required);
    if (config.token_required && !storedToken()) askToken();
    body.dataset.loaded = "true";
  }

  loadConfig();
})();
