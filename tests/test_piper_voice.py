"""Piper's audio key: the seed names a Piper voice by what is in its files, not their name."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from cache_seed import parse_seed_rows, render_answers
from gateway.providers.piper_tts import PiperTTS, default_voice_path
from gateway.seeding import blocking_renderer, voice_id
from intents.store import LocalStore


def write_voice(directory: Path, model: bytes, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "en_US-ours-medium.onnx"
    path.write_bytes(model)
    Path(f"{path}.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def test_the_voice_digest_is_of_the_files_contents_not_their_name(tmp_path):
    from gateway.providers.piper_tts import voice_digest

    config = {"audio": {"sample_rate": 22050}, "inference": {"noise_scale": 0.667}}
    model = bytes(range(256)) * 5000  # over a MiB: hashed in more than one chunk
    a = write_voice(tmp_path / "a", model, config)
    same = write_voice(tmp_path / "same", model, config)
    other_model = write_voice(tmp_path / "model", model[:-1] + b"\x00", config)
    other_config = write_voice(tmp_path / "config",
                               model, {**config, "inference": {"noise_scale": 0.5}})

    def digest(path: Path) -> str:
        return voice_digest(path, f"{path}.json")

    assert a.name == same.name == other_model.name == other_config.name
    assert digest(a) == digest(same)  # the same voice wherever it lies
    assert len({digest(a), digest(other_model), digest(other_config)}) == 3
    # The bytes of the two files are not simply run together: moving a byte from the end
    # of the model to the start of the config is another voice.
    moved = tmp_path / "moved" / a.name
    moved.parent.mkdir()
    moved.write_bytes(b"ab")
    Path(f"{moved}.json").write_bytes(b"c")
    moved2 = tmp_path / "moved2" / a.name
    moved2.parent.mkdir()
    moved2.write_bytes(b"a")
    Path(f"{moved2}.json").write_bytes(b"bc")
    assert digest(moved) != digest(moved2)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown()


def test_a_voice_replaced_under_the_same_name_renders_the_answers_again(tmp_path, executor):
    """The audio key named the voice by its file name (`piper:<stem>:<speed>`): an operator
    who put another voice (its .onnx and .json) under the same name and seeded again found
    every answer already rendered, and callers kept hearing the old voice."""
    shipped = default_voice_path()
    voice = tmp_path / "voices" / shipped.name
    voice.parent.mkdir()
    voice.symlink_to(shipped)  # the model's 60 MB are not copied: only the config changes
    config = json.loads(Path(f"{shipped}.json").read_text(encoding="utf-8"))
    Path(f"{voice}.json").write_text(json.dumps(config), encoding="utf-8")
    store = LocalStore(tmp_path / "store")
    plan = parse_seed_rows([{"question": q, "answer": "At nine.", "intent": "hours",
                             "action": "answer"}
                            for q in ("when do you open", "what time do you open")])

    def seed_audio() -> tuple[str, int, int]:
        """(audio id, rendered, reused) of the seed's rendering step with the voice at
        ``voice``, loaded afresh as a gateway or a seed would."""
        tts = PiperTTS(executor, voice_path=voice)
        _, rendered, reused = render_answers(plan, store, blocking_renderer(tts),
                                             voice_id(tts), progress=False)
        return voice_id(tts), rendered, reused

    first, rendered, reused = seed_audio()
    assert (rendered, reused) == (1, 0)
    assert seed_audio() == (first, 0, 1)  # the same voice: reused

    # Another voice under the same name: here the same model with another speaking style
    # in its config (noise, speed), which changes every answer's sound.
    config["inference"] = {"noise_scale": 0.3, "length_scale": 1.4, "noise_w": 0.3}
    Path(f"{voice}.json").write_text(json.dumps(config), encoding="utf-8")
    replaced, rendered, reused = seed_audio()
    assert replaced != first
    assert (rendered, reused) == (1, 0), "the old voice's audio was reused for another voice"

    # The same voice files elsewhere, under another name, are the same voice.
    elsewhere = tmp_path / "elsewhere" / "renamed.onnx"
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(shipped)
    shutil.copy(f"{voice}.json", f"{elsewhere}.json")
    assert PiperTTS(executor, voice_path=elsewhere).audio_id == replaced


async def test_a_synthesis_whose_pool_work_the_shutdown_cancelled_fails_as_a_shutdown():
    """Review (stop 60): gateway/providers/piper_tts.py awaited ``run_in_executor`` itself.
    Its pool is the one STT decodes share; a sentence queued behind them when the runtime
    shuts it down (``cancel_futures``) got a CancelledError nobody sent: to the reply that
    is no failure but a cancel it never asked for (a sentence fetched ahead ended with
    nothing for its reader). As every pool's work does (``executors.run_in``), it is now
    an ``ExecutorShutDown``: a synthesis that failed (tts_failed, the apology)."""
    import asyncio
    import threading

    from gateway.executors import ExecutorShutDown

    pool = ThreadPoolExecutor(1)
    busy = threading.Event()
    try:
        tts = PiperTTS(pool)
        pool.submit(busy.wait)  # an STT decode holds the pool's one thread
        sentence = asyncio.ensure_future(anext(tts.synthesize("Our branches open at nine.")))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not sentence.done()  # queued behind the decode
        pool.shutdown(wait=False, cancel_futures=True)
        # Bounded only so a regression cannot hang the suite: the answer is a few loop
        # iterations away (the pool's cancel reaches the loop thread-safely).
        with pytest.raises(ExecutorShutDown, match="TTS executor shut down"):
            await asyncio.wait_for(sentence, 5)
    finally:
        busy.set()
        pool.shutdown()


def test_the_shipped_voice_says_every_hold_phrase_within_the_hold_floor(executor):
    """llm_hold_after_ms is refused below HOLD_AFTER_MIN_MS (gateway/settings.py): how often
    a hold phrase starts, so each must be said in less, with quiet after it. Measured, not
    assumed: the shipped voice says every hold phrase with half a second to spare."""
    from gateway.agent import HOLD_PHRASES
    from gateway.settings import HOLD_AFTER_MIN_MS

    tts = PiperTTS(executor)
    for text in HOLD_PHRASES:
        seconds = len(tts.synthesize_all(text)) / 2 / tts.sample_rate
        assert seconds + 0.5 <= HOLD_AFTER_MIN_MS / 1000, (text, seconds)
