"""Moonshine (the embedded recogniser) and Smart Turn (the end-of-turn model), on Piper speech."""

from __future__ import annotations

import logging
import re
import threading

import numpy as np
import pytest

from gateway.audio import resample_pcm16
from gateway.providers.base import ProviderError
from gateway.providers import moonshine_stt
from gateway.providers.moonshine_int8 import op_counts
from gateway.providers.redecode import DecodeStopped
from gateway.providers.moonshine_stt import (MoonshineRecognizer, Tokenizer, converted_model,
                                             int8_model)
from gateway.providers.moonshine_stt import default_model_dir as moonshine_dir
from gateway.turn_model import SmartTurn, TurnModelError

pytestmark = pytest.mark.slow


def words(text: str) -> list[str]:
    """Lowercase words; quotes are no part of one (a decode once began "'I didn't")."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)*", text.lower())


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def moonshine(model_cache):
    """The default: the decoder's weights in int8 blocks."""
    return MoonshineRecognizer(cache_dir=model_cache)


@pytest.fixture(scope="module")
def moonshine_float(model_cache):
    return MoonshineRecognizer(cache_dir=model_cache, decoder_weights="float")


@pytest.fixture(scope="module")
def smart_turn():
    return SmartTurn()


def phone_band(pcm16: bytes) -> bytes:
    return resample_pcm16(resample_pcm16(pcm16, 16000, 8000), 8000, 16000)


@pytest.fixture(scope="module")
def steady_speak():
    """Piper without its sampling noise: the same audio every run. With the noise, the
    model's verdict on one fragment ("um so") ranged 0.15-0.80 over eight syntheses, and
    float Moonshine once heard "the money that I transferred" in a full run."""
    from piper import PiperVoice, SynthesisConfig

    from gateway.providers.piper_tts import default_voice_path

    voice = PiperVoice.load(str(default_voice_path()))
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def render(text: str) -> bytes:
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text, syn_config=config))
        return resample_pcm16(pcm, voice.config.sample_rate, 16000)
    return render


@pytest.mark.parametrize("band", ["wide", "phone"])
def test_moonshine_transcribes_a_spoken_question(moonshine, steady_speak, band):
    audio = steady_speak("how do I reset my online banking password")
    text = moonshine.transcribe(phone_band(audio) if band == "phone" else audio)
    assert words(text) == ["how", "do", "i", "reset", "my", "online", "banking", "password"]


def test_a_draft_makes_moonshine_decode_cheaper_never_different(moonshine_float, steady_speak):
    """With float weights the draft's one pass and the steps agree to float rounding."""
    audio = steady_speak("I didn't get the money I transferred to my brother")
    text, ids = moonshine_float.transcribe_ids(audio)
    _, partial_ids = moonshine_float.transcribe_ids(audio[:len(audio) * 3 // 5 // 2 * 2])
    assert partial_ids and partial_ids != ids
    for draft in (partial_ids, ids, ids + [7, 8, 9], [500, 600, 700], [2, 2]):
        assert moonshine_float.transcribe_ids(audio, draft) == (text, ids)


def test_the_int8_decoder_hears_the_words_of_the_float_one_with_or_without_a_draft(
        moonshine, moonshine_float, steady_speak):
    """int8 activations can move a near-tie between the draft's pass and the steps
    (moonshine_int8), so only the words are compared, not the token ids."""
    expected = ["i", "didn't", "get", "the", "money", "i", "transferred", "to", "my", "brother"]
    for band in (lambda pcm: pcm, phone_band):
        audio = band(steady_speak("I didn't get the money I transferred to my brother"))
        assert words(moonshine_float.transcribe(audio)) == expected
        text, ids = moonshine.transcribe_ids(audio)
        _, partial_ids = moonshine.transcribe_ids(audio[:len(audio) * 3 // 5 // 2 * 2])
        assert words(text) == expected
        assert words(moonshine.transcribe_ids(audio, partial_ids)[0]) == expected


def test_a_decode_asked_to_stop_stops_at_its_next_decoder_step(moonshine, steady_speak):
    class StopAtCheck(threading.Event):
        """Reads as set from its ``at``-th check on: how far the decode got."""

        def __init__(self, at: int) -> None:
            super().__init__()
            self.at, self.checks = at, 0

        def is_set(self) -> bool:
            self.checks += 1
            return self.checks >= self.at

    audio = steady_speak("What is the exchange rate for euros?")
    stop = StopAtCheck(at=4)  # before the encoder, after it, first step, second step
    with pytest.raises(DecodeStopped):
        moonshine.transcribe_ids(audio, stop=stop)
    assert stop.checks == 4
    text, _ = moonshine.transcribe_ids(audio, stop=threading.Event())  # never set: decodes
    assert "exchange" in text.lower()


def test_the_int8_decoder_quantizes_every_weight_in_both_branches(moonshine, model_cache):
    """Both branches of the merged decoder's If (no cache: 16 more MatMuls, the cross
    attention's keys and values), the tied output projection included."""
    import onnx

    assert moonshine.decoder_weights == "int8"
    model = onnx.load(str(int8_model(moonshine_dir() / "decoder_model_merged.ort", model_cache)))
    quantized = op_counts(model, "MatMulNBits")
    assert quantized == {"main": 0, "else_branch": 81, "then_branch": 65}
    branches = [a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute]
    for branch in branches:
        (projection,) = [n for n in branch.node if "logits" in n.output]
        assert projection.op_type == "MatMulNBits"
        assert {a.name: a.i for a in projection.attribute}["N"] == 32768
    big_floats = [t.name for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and not t.name.endswith("_scales")
                  and np.prod(t.dims) > 10_000]
    assert not big_floats  # no float weight is kept (the embedding is gathered as int8)


def test_the_weights_folded_with_numpy_are_those_ort_folds_at_load(moonshine_float):
    """Step 1 of the int8 recipe changes nothing: the same logits and caches, bit for bit."""
    import onnxruntime as ort

    from gateway.providers.moonshine_int8 import fold_weights
    from gateway.providers.ort_format import ort_to_onnx

    model = ort_to_onnx(moonshine_dir() / "decoder_model_merged.ort")
    assert fold_weights(model) == 81
    folded = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    empty = np.zeros((1, 8, 0, 52), dtype=np.float32)
    feeds = {"input_ids": np.array([[1, 500, 600]]), "use_cache_branch": np.array([False]),
             "encoder_hidden_states": rng.standard_normal((1, 50, 416)).astype(np.float32),
             **{i.name: empty for i in folded.get_inputs() if i.name.startswith("past")}}
    ours, ort_folded = folded.run(None, feeds), moonshine_float._decoder.run(None, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(ours, ort_folded))


def test_a_failed_int8_build_falls_back_to_the_float_decoder(model_cache, monkeypatch, caplog):
    def broken(path, cache):
        raise RuntimeError("no quantizer here")

    monkeypatch.setattr(moonshine_stt, "int8_model", broken)
    with caplog.at_level(logging.WARNING, logger="voicegate.stt"):
        recognizer = MoonshineRecognizer(cache_dir=model_cache)
    assert recognizer.decoder_weights == "float" and recognizer.folded
    assert "moonshine_int8_failed" in caplog.text
    with pytest.raises(ValueError, match="int8 or float"):
        MoonshineRecognizer(cache_dir=model_cache, decoder_weights="int4")  # type: ignore[arg-type]


def test_moonshine_weights_are_folded_and_the_conversion_is_cached(moonshine, model_cache,
                                                                   tmp_path):
    assert moonshine.folded
    decoder = moonshine_dir() / "decoder_model_merged.ort"
    quantized = int8_model(decoder, model_cache)  # built by the fixture: reused as it is
    stamp = quantized.stat().st_mtime_ns
    assert int8_model(decoder, model_cache).stat().st_mtime_ns == stamp
    assert quantized.name.startswith("moonshine-decoder_model_merged-int8-")
    source = moonshine_dir() / "encoder_model.ort"
    first = converted_model(source, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert converted_model(source, tmp_path) == first and first.stat().st_mtime_ns == stamp
    first.write_bytes(b"half a file")  # a crash mid-write of an older converter
    rebuilt = converted_model(source, tmp_path)
    assert rebuilt == first and rebuilt.stat().st_size > 1_000_000


class EndTokenLeads:
    """The real decoder, except that at the first step the end token's score is the
    best word's plus ``lead``: the near-tie Moonshine meets on some spoken utterances
    (bench/empty_transcripts.py), made to happen on any audio."""

    def __init__(self, session, lead: float) -> None:
        self.session, self.lead = session, lead

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        outputs = self.session.run(names, feeds)
        if not feeds["use_cache_branch"][0]:  # the first pass
            first = outputs[0][0, 0]
            others = np.delete(first, moonshine_stt.END_TOKEN)
            first[moonshine_stt.END_TOKEN] = others.max() + self.lead
        return outputs


@pytest.mark.parametrize("lead, heard", [(0.5, True), (4.0, False)])
def test_an_end_token_that_merely_leads_does_not_drop_the_words(moonshine, steady_speak,
                                                                 monkeypatch, lead, heard):
    audio = steady_speak("What is the exchange rate for euros?")
    monkeypatch.setattr(moonshine, "_decoder", EndTokenLeads(moonshine._decoder, lead))
    text = moonshine.transcribe(audio)
    # Leading by 0.5 (p ~0.6): the words; by 4 (p ~0.98): the model is sure, nothing.
    assert ("exchange" in words(text)) is heard
    assert bool(text) is heard
    monkeypatch.setattr(moonshine, "no_speech_threshold", 1.0)  # plain greedy: nothing
    assert moonshine.transcribe(audio) == ""


def test_a_no_speech_threshold_outside_0_1_is_refused(model_cache):
    with pytest.raises(ValueError, match="no_speech_threshold"):
        MoonshineRecognizer(cache_dir=model_cache, no_speech_threshold=0.0)


@pytest.mark.parametrize("kind", ["silence", "white", "hum", "burst"])
def test_moonshine_hears_nothing_in_silence_or_noise(moonshine, kind):
    rng = np.random.default_rng(1)
    t = np.arange(16000) / 16000
    audio = {"silence": np.zeros(16000),
             "white": rng.standard_normal(16000) * 0.1,
             "hum": np.sin(2 * np.pi * 50 * t) * 0.3,
             "burst": rng.standard_normal(16000) * np.exp(-t / 0.08) * 0.3}[kind]
    pcm = np.concatenate([np.zeros(4800), audio, np.zeros(4800)])
    assert moonshine.transcribe((pcm * 32767).astype("<i2").tobytes()) == ""


def test_moonshine_stops_on_noise(moonshine):
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


# The model's verdicts are asserted on Piper without its sampling noise: with the noise, a
# full suite once heard "what is my account balance?" through the phone band at 0.15.
def test_smart_turn_judges_only_the_end_of_a_long_turn(smart_turn, steady_speak):
    earlier = steady_speak("my card number is") * 6  # over 8 s of unfinished speech before
    assert smart_turn.probability(earlier + steady_speak("what is my account balance?")
                                  + bytes(6400)) > 0.8


def test_smart_turn_on_phone_band_audio_and_on_nothing(smart_turn, steady_speak):
    assert smart_turn.probability(phone_band(steady_speak("what is my account balance?"))
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
