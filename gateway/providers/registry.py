"""Configured provider name -> adapter. Adding a vendor: one file and one line here."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar

from ..settings import Settings, SettingsError
from .base import SpeechToText, TextToSpeech

if TYPE_CHECKING:
    from .redecode import BatchRecognizer

T = TypeVar("T")


def _whisper(settings: Settings, executor: Executor) -> SpeechToText:
    from .whisper_stt import WhisperRecognizer

    recognizer = WhisperRecognizer(model_dir=settings.whisper_model_dir or None,
                                   threads=settings.whisper_threads, workers=settings.cpu_workers)
    return _redecoding(recognizer, settings, executor)


def _moonshine(settings: Settings, executor: Executor) -> SpeechToText:
    from .moonshine_stt import MoonshineRecognizer

    recognizer = MoonshineRecognizer(threads=settings.moonshine_threads,
                                     cache_dir=settings.model_cache_dir or None,
                                     decoder_weights=settings.moonshine_decoder_weights,
                                     no_speech_threshold=settings.moonshine_no_speech_threshold)
    return _redecoding(recognizer, settings, executor)


def _redecoding(recognizer: "BatchRecognizer", settings: Settings,
                executor: Executor) -> SpeechToText:
    """An embedded batch model served as streaming STT, one decode per CPU worker."""
    from .redecode import RedecodingSTT

    return RedecodingSTT(recognizer, executor, slots=settings.cpu_workers,
                         partial_interval_ms=settings.partial_interval_ms,
                         max_utterance_s=settings.max_utterance_s,
                         split_pause_ms=settings.split_pause_ms,
                         min_segment_ms=settings.split_min_segment_ms,
                         early_pad_ms=settings.early_final_pad_ms)


def _piper(settings: Settings, executor: Executor) -> TextToSpeech:
    from .piper_tts import PiperTTS

    return PiperTTS(executor, voice_path=settings.piper_voice or None)


def _deepgram(settings: Settings, executor: Executor) -> SpeechToText:
    from .deepgram_stt import DeepgramSTT

    return DeepgramSTT.from_settings(settings)


def _elevenlabs(settings: Settings, executor: Executor) -> TextToSpeech:
    from .elevenlabs_tts import ElevenLabsTTS

    return ElevenLabsTTS.from_settings(settings)


STT_PROVIDERS: dict[str, Callable[[Settings, Executor], SpeechToText]] = {
    "moonshine": _moonshine,
    "whisper": _whisper,
    "deepgram": _deepgram,
}
TTS_PROVIDERS: dict[str, Callable[[Settings, Executor], TextToSpeech]] = {
    "piper": _piper,
    "elevenlabs": _elevenlabs,
}


def create_stt(settings: Settings, executor: Executor) -> SpeechToText:
    return _factory(STT_PROVIDERS, "stt_provider", settings.stt_provider)(settings, executor)


def create_tts(settings: Settings, executor: Executor) -> TextToSpeech:
    return _factory(TTS_PROVIDERS, "tts_provider", settings.tts_provider)(settings, executor)


def _factory(providers: Mapping[str, T], setting: str, name: str) -> T:
    try:
        return providers[name]
    except KeyError:
        raise SettingsError(f"unknown {setting} {name!r}; known: {', '.join(providers)}") \
            from None
