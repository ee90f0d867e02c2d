"""Moonshine (the embedded recogniser) and Smart Turn (the end-of-turn model), on Piper speech."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gateway.audio import resample_pcm16
from gateway.providers.base import ProviderError
from gateway.providers.moonshine_stt import MoonshineRecognizer, Tokenizer, converted_model
from gateway.providers.moonshine_stt import default_model_dir as moonshine_dir
from gateway.turn_model import SmartTurn, TurnModelError

pytestmark = pytest.mark.slow


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@pytest.fixture(scope="module")
def moonshine(tmp_path_factory):
    return MoonshineRecognizer(cache_dir=tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="module")
def smart_turn():
    return SmartTurn()


def phone_band(pcm16: bytes) -> bytes:
    return resample_pcm16(resample_pcm16(pcm16, 16000, 8000), 8000, 16000)


@pytest.mark.parametrize("band", ["wide", "phone"])
def test_moonshine_transcribes_a_spoken_question(moonshine, speak, band):
    audio = speak("how do I reset my online banking password")
    text = moonshine.transcribe(phone_band(audio) if band == "phone" else audio)
    assert words(text) == ["how", "do", "i", "reset", "my", "online", "banking", "password"]


def test_a_draft_makes_moonshine_decode_cheaper_never_different(moonshine, speak):
    audio = speak("I didn't get the money I transferred to my brother")
    text, ids = moonshine.transcribe_ids(audio)
    _, partial_ids = moonshine.transcribe_ids(audio[:len(audio) * 3 // 5 // 2 * 2])
    assert partial_ids and partial_ids != ids
    for draft in (partial_ids, ids, ids + [7, 8, 9], [500, 600, 700], [2, 2]):
        assert moonshine.transcribe_ids(audio, draft) == (text, ids)


def test_moonshine_weights_are_folded_and_the_conversion_is_cached(moonshine, tmp_path):
    assert moonshine.folded
    source = moonshine_dir() / "encoder_model.ort"
    first = converted_model(source, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert converted_model(source, tmp_path) == first and first.stat().st_mtime_ns == stamp
    first.write_bytes(b"half a file")  # a crash mid-write of an older converter
    rebuilt = converted_model(source, tmp_path)
    assert rebuilt == first and rebuilt.stat().st_size > 1_000_000


def test_moonshine_hears_nothing_in_silence_and_stops_on_noise(moonshine):
    assert moonshine.transcribe(bytes(32000)) == "" or len(moonshine.transcribe(bytes(32000))) < 10
    assert moonshine.transcribe(b"\x01\x00" * 800) == ""  # 50 ms: too short to decode
    noise = (np.random.default_rng(1).standard_normal(16000) * 3000).astype("<i2")
    ids = moonshine.token_ids(noise.astype(np.float32) / 32768)
    assert len(ids) <= 7  # bounded by the audio's length (6.5 tokens a second)


def test_the_tokenizer_decodes_spaces_and_byte_fallback():
    tokenizer = Tokenizer((moonshine_dir() / "tokenizer.bin").read_bytes())
    space_a = next(i for i, t in enumerate(tokenizer.tokens) if t == "\u2581a".encode())
    byte_x = next(i for i in range(3, 259) if tokenizer.tokens[i] == b"x")
    assert tokenizer.decode([space_a, byte_x]) == "ax"
    assert tokenizer.decode([1, space_a, 2]) == "a"  # start and end tokens say nothing
    with pytest.raises(ProviderError, match="truncated"):
        Tokenizer(b"\x05ab")


def test_a_missing_moonshine_model_is_a_clear_error(tmp_path):
    with pytest.raises(ProviderError, match="missing encoder_model.ort"):
        MoonshineRecognizer(model_dir=tmp_path)


@pytest.fixture(scope="module")
def steady_speak():
    """Piper without its sampling noise: the same audio every run. With the noise, the
    model's verdict on one fragment ("um so") ranged 0.15-0.80 over eight syntheses."""
    from piper import PiperVoice, SynthesisConfig

    from gateway.providers.piper_tts import default_voice_path

    voice = PiperVoice.load(str(default_voice_path()))
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def render(text: str) -> bytes:
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text, syn_config=config))
        return resample_pcm16(pcm, voice.config.sample_rate, 16000)
    return render


@pytest.mark.parametrize("complete, fragment", [
    ("what is my account balance?", "so I was um"),
    ("how do I reset my online banking password?", "I want to um"),
])
def test_smart_turn_hears_a_finished_question_and_an_unfinished_one(smart_turn, steady_speak,
                                                                     complete, fragment):
    silence = bytes(2048)  # the 64 ms pause the detector has heard when it asks
    done = smart_turn.probability(steady_speak(complete) + silence)
    not_done = smart_turn.probability(steady_speak(fragment) + silence)
    assert done > 0.8 and not_done < 0.5


def test_smart_turn_misses_a_fragment_spoken_as_a_sentence_which_the_words_catch(smart_turn,
                                                                                 speak):
    """Piper reads "my card number is" with a falling, finished tune: the model calls it
    complete (~0.9 here). That is why the policy never lets the model alone end a turn
    and why the words ("... is") judge it incomplete."""
    from gateway.call.end_of_turn import EndOfTurnPolicy, EndOfTurnSettings, Judgement

    probability = smart_turn.probability(speak("my card number is") + bytes(2048))
    policy = EndOfTurnPolicy(EndOfTurnSettings())
    policy.turn_probability, policy.transcript = probability, "my card number is"
    policy.cache_hit = False
    assert policy.judge() is Judgement.INCOMPLETE
    assert policy.required_silence_ms() == EndOfTurnSettings().incomplete_silence_ms


def test_smart_turn_judges_only_the_end_of_a_long_turn(smart_turn, speak):
    earlier = speak("my card number is") * 6  # over 8 s of unfinished speech before
    assert smart_turn.probability(earlier + speak("what is my account balance?")
                                  + bytes(6400)) > 0.8


def test_smart_turn_on_phone_band_audio_and_on_nothing(smart_turn, speak):
    assert smart_turn.probability(phone_band(speak("what is my account balance?"))
                                  + bytes(6400)) > 0.8
    assert smart_turn.probability(b"") == 0.0


def test_a_missing_turn_model_is_a_clear_error(tmp_path):
    with pytest.raises(TurnModelError, match="no Smart Turn model"):
        SmartTurn(model_path=tmp_path / "nothing.onnx")


def test_smart_turn_features_are_whisper_log_mel(smart_turn, speak):
    """Our numpy features equal transformers' WhisperFeatureExtractor (which imports torch,
    so the serving process does not use it)."""
    from transformers import WhisperFeatureExtractor

    from gateway.turn_model import SAMPLE_RATE, WINDOW_S

    pcm = speak("what is my account balance?")
    samples = np.frombuffer(pcm, dtype="<i2")
    audio = np.zeros(WINDOW_S * SAMPLE_RATE, dtype=np.float32)
    audio[-len(samples):] = samples / 32768.0
    reference = WhisperFeatureExtractor(chunk_length=WINDOW_S)(
        audio, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length",
        max_length=len(audio), truncation=True, do_normalize=True).input_features
    ours = smart_turn.features(pcm)
    assert ours.shape == reference.shape == (1, 80, 800)
    assert np.abs(ours - reference).max() < 1e-4
