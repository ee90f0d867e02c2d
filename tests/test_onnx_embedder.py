"""The int8 ONNX embedder: the same vectors as sentence-transformers, no torch when serving,
exported once per cache directory, rebuilt when the cached file is broken; a version
seeded by the other backend is re-embedded, not refused."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from intents.embedder import Embedder, default_model_dir, resolve_backend
from intents.onnx_encoder import cached_model

ROOT = Path(__file__).resolve().parents[1]
BANKING = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
pytestmark = pytest.mark.slow


def _texts() -> list[str]:
    """40 Banking77 questions and 2-4 word partials of them (what routing sees)."""
    if BANKING.is_file():
        with BANKING.open(newline="", encoding="utf-8") as f:
            questions = [row["text"] for row in csv.DictReader(f)][::250][:40]
    else:  # the shipped example FAQ
        from tests.intents_support import BANK_FAQ

        with open(BANK_FAQ, newline="", encoding="utf-8") as f:
            questions = [row["question"] for row in csv.DictReader(f)][:40]
    partials = [" ".join(q.split()[:2 + i % 3]) for i, q in enumerate(questions)]
    return questions + partials


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export for each quantization for the module (each costs ~12-20 s)."""
    cache = tmp_path_factory.mktemp("models")
    cached_model(default_model_dir(), cache)
    cached_model(default_model_dir(), cache, "dynamic")
    cached_model(default_model_dir(), cache, "dynamic-7bit")
    return cache


@pytest.fixture(scope="module")
def onnx_embedder(model_cache: Path) -> Embedder:
    """The blockwise int8 backend: the float model's vectors."""
    return Embedder(backend="onnx-int8", cache_dir=model_cache, cache_size=0)


def test_int8_vectors_match_sentence_transformers(onnx_embedder: Embedder) -> None:
    texts = _texts()
    reference = Embedder(backend="torch", cache_size=0).encode_batch(texts)
    ours = onnx_embedder.encode_batch(texts)
    assert ours.shape == reference.shape and ours.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = (ours * reference).sum(axis=1)
    # Measured 0.9997 mean on questions, 0.9991 on partials, worst 0.998.
    assert cosine.mean() >= 0.999 and cosine.min() >= 0.995, (cosine.mean(), cosine.min())
    # The LRU path gives the same vectors as the batch path.
    assert np.allclose(onnx_embedder.encode_many(texts[:5]), ours[:5], atol=1e-5)


def test_the_dynamic_int8_backend_is_its_own_model_near_the_float_one(
        model_cache: Path) -> None:
    """onnx-int8-dynamic: its own export file and recorded name (a seed calibrated on the
    blockwise vectors is re-embedded, not served on these), vectors near the float model's
    (measured cosine 0.993 on questions, 0.985 on partials), padding-independent."""
    dynamic = Embedder(backend="onnx-int8-dynamic", cache_dir=model_cache, cache_size=0)
    blockwise = Embedder(backend="onnx-int8", cache_dir=model_cache, cache_size=0)
    assert dynamic.model_name not in (blockwise.model_name, Embedder(backend="torch").model_name)
    assert cached_model(default_model_dir(), model_cache, "dynamic") != \
        cached_model(default_model_dir(), model_cache)
    texts = _texts()
    reference = Embedder(backend="torch", cache_size=0).encode_batch(texts)
    ours = dynamic.encode_batch(texts)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.94, (cosine.mean(), cosine.min())
    assert not np.allclose(ours, blockwise.encode_batch(texts), atol=1e-3)
    # Its texts run one by one: the routing lanes may split a batch (FinalsFirst).
    assert not dynamic.batches_share_a_pass and blockwise.batches_share_a_pass
    together = dynamic.encode_batch(texts[:2])
    assert np.allclose(together, np.stack([dynamic.encode_batch([t])[0] for t in texts[:2]]),
                       atol=1e-4)
    with pytest.raises(ValueError, match="unknown quantization"):
        cached_model(default_model_dir(), model_cache, "fp4")


def _int8_weights(model: Path) -> list[np.ndarray]:
    """The int8 weight matrices of ``model``'s MatMulInteger nodes (dynamic quantization)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model)).graph
    initializers = {i.name: i for i in graph.initializer}
    return [numpy_helper.to_array(initializers[node.input[1]]) for node in graph.node
            if node.op_type == "MatMulInteger" and node.input[1] in initializers]


def test_the_7bit_dynamic_export_never_saturates_avx2s_16_bit_sums(model_cache: Path) -> None:
    """Review (stop 65): without VNNI, onnxruntime multiplies uint8 activations by int8
    weights with AVX2's pairwise 16-bit sums (VPMADDUBSW), which saturate: 255 x 127 x 2 >
    32,767, so the 8-bit dynamic model's products are wrong there (a MatMulInteger probe on
    an AVX2 EPYC: 3,071 of 3,072 worst-case cells off), and those CPUs served the blockwise
    backend, half as fast. With weights in 7 bits (onnxruntime's reduce_range) a pair sums
    to at most 255 x 64 x 2 = 32,640: exact on AVX2, and the same integers as VNNI's."""
    from intents.embedder import BACKENDS

    assert BACKENDS["onnx-int8-dynamic-7bit"] == "dynamic-7bit"
    seven = _int8_weights(cached_model(default_model_dir(), model_cache, "dynamic-7bit"))
    eight = _int8_weights(cached_model(default_model_dir(), model_cache, "dynamic"))
    assert len(seven) == len(eight) >= 36  # six layers' q, k, v, output and two FFN linears
    # onnxruntime's reduce_range: symmetric, |w| <= 64 (255 x 64 x 2 = 32,640 <= 32,767)
    assert all(w.dtype == np.int8 and int(np.abs(w.astype(np.int16)).max()) <= 64 for w in seven)
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in eight) > 64  # the check bites
    embedder = Embedder(backend="onnx-int8-dynamic-7bit", cache_dir=model_cache, cache_size=0)
    assert embedder.model_name.endswith("#onnx-int8-dynamic-7bit")
    assert not embedder.batches_share_a_pass  # one text per run, as the 8-bit dynamic one
    texts = _texts()
    cosine = (embedder.encode_batch(texts) *
              Embedder(backend="torch", cache_size=0).encode_batch(texts)).sum(axis=1)
    # Measured 0.9927 mean on 1,000 Banking77 questions (8-bit: 0.9936), 0.986 on partials.
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.94, (cosine.mean(), cosine.min())


@pytest.mark.parametrize("flags, backend", [
    ({"avx2", "avx512f", "avx512_vnni"}, "onnx-int8-dynamic"),
    ({"avx2", "avx_vnni"}, "onnx-int8-dynamic"),
    ({"avx2", "amx_int8"}, "onnx-int8-dynamic"),
    ({"fp", "asimd", "asimddp"}, "onnx-int8-dynamic"),  # Arm's dot product
    # AVX2 or AVX-512 alone: 16-bit pair sums, exact only for 7-bit weights
    ({"avx2", "avx512f", "avx512bw"}, "onnx-int8-dynamic-7bit"),
    ({"fp", "asimd"}, "onnx-int8-dynamic-7bit"),
    (set(), "onnx-int8-dynamic-7bit"),  # no /proc/cpuinfo
])
def test_auto_is_the_8bit_dynamic_backend_only_where_int8_products_are_exact(flags,
                                                                          backend) -> None:
    assert resolve_backend("auto", frozenset(flags)) == backend
    for named in ("onnx-int8", "onnx-int8-dynamic", "onnx-int8-dynamic-7bit", "torch"):
        assert resolve_backend(named, frozenset(flags)) == named


def test_the_default_embedder_records_the_backend_auto_chose(model_cache: Path) -> None:
    """A seed records the resolved backend, so a replica on another class of CPU re-embeds
    it instead of serving vectors its calibration never saw."""
    embedder = Embedder(cache_dir=model_cache, cache_size=0)
    assert embedder.backend == resolve_backend("auto") != "auto"
    assert embedder.model_name.endswith(f"#{embedder.backend}")
    with pytest.raises(ValueError, match="one of auto, onnx-int8"):
        Embedder(backend="int4", cache_dir=model_cache)


def test_batches_pad_without_changing_a_vector(onnx_embedder: Embedder) -> None:
    texts = ["hi", "how do I change the PIN of the card I got last week at the branch"]
    together = onnx_embedder.encode_batch(texts)
    alone = np.stack([onnx_embedder.encode_batch([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-4)


def test_the_backends_record_different_model_names(onnx_embedder: Embedder) -> None:
    torch_name = Embedder(backend="torch").model_name
    assert onnx_embedder.model_name != torch_name
    assert onnx_embedder.model_name.startswith(torch_name)
    with pytest.raises(ValueError, match="unknown embedder backend"):
        Embedder(backend="tensorflow")


def test_serving_never_imports_torch(model_cache: Path) -> None:
    """With the export cached, building and using the embedder loads no torch."""
    cache = model_cache
    probe = ("import sys\n"
             "from intents.embedder import Embedder\n"
             f"e = Embedder(cache_dir={str(cache)!r})\n"
             "v = e.encode('how do I reset my pin')\n"
             "assert v.shape == (384,), v.shape\n"
             "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers')"
             " if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_export_is_reused_and_a_broken_one_rebuilt(tmp_path: Path, model_cache: Path) -> None:
    (exported,) = model_cache.glob("minilm-int8-*.onnx")
    cache = tmp_path / "models"
    cache.mkdir()
    first = cache / exported.name
    first.write_bytes(exported.read_bytes())
    stamp = first.stat().st_mtime_ns
    assert cached_model(default_model_dir(), cache) == first
    assert first.stat().st_mtime_ns == stamp  # not exported again
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp file left
    first.write_bytes(first.read_bytes()[:4096])  # a crash mid-copy, a full disk
    again = cached_model(default_model_dir(), cache)
    assert again == first and again.stat().st_size > 4096
    assert Embedder(backend="onnx-int8", cache_dir=cache).encode("card arrival").shape == (384,)


def test_an_empty_cached_model_file_is_rebuilt_not_fatal(settings, tmp_path) -> None:
    """Model files are built once into model_cache_dir (intents/model_cache.build_once),
    "written atomically ... a crash mid-write never leave[s] a half file, and built again when
    the cached one does not load". But build_once never fsyncs before its rename, so a machine
    that crashes shortly after the first build can come back with the file present and empty
    (delayed allocation), and its check (onnx_loads: onnx.load without external data) accepts
    an empty file: an empty protobuf parses as an empty ModelProto. The embedder then fails in
    onnxruntime ("No graph was found in the protobuf"), Runtime.load fails, /readyz says 503
    with that error, and every restart fails the same way: the replica never becomes ready
    until an operator finds and deletes the file. An empty (or graph-less) cached model
    should count as not loading and be rebuilt, as a truncated one is."""
    from gateway.runtime import build_embedder
    from intents.embedder import BACKENDS
    from intents.model_cache import source_key
    from intents.onnx_encoder import EXPORT_VERSION, QUANTIZATIONS

    recipe, stem = QUANTIZATIONS[BACKENDS[resolve_backend(settings.embedder_backend)]]
    key = source_key(default_model_dir() / "model.safetensors", f"{EXPORT_VERSION}:{recipe}")
    cached = tmp_path / f"{stem}-{key}.onnx"
    cached.write_bytes(b"")  # what a crash right after the first build can leave
    try:
        embedder = build_embedder(settings.replace(model_cache_dir=str(tmp_path)))
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        pytest.fail(f"an empty cached model file stops the embedder for good (start-up "
                    f"fails on every restart): {type(exc).__name__}: {str(exc)[:300]}")
    assert embedder.encode("what time do you open").shape == (embedder.dim,)
    assert cached.stat().st_size > 0


def test_a_version_seeded_by_the_other_backend_is_reembedded(tmp_path: Path) -> None:
    """The suite's bank FAQ store (seeded with the default int8 backend), served by torch.
    Its own model cache dir: the re-embedding is kept there (intents/reembedded.py)."""
    from intents.loader import load_cache
    from intents.store import LocalStore
    from tests.intents_support import _seeded_bank_store

    torch_embedder = Embedder(backend="torch", cache_dir=tmp_path)
    cache = load_cache(LocalStore(_seeded_bank_store()), torch_embedder)
    assert cache.router.embedder is torch_embedder
    entry = next(e for e in cache.entries.values() if e.pcm is not None and e.paraphrases)
    decision = cache.router.route(entry.paraphrases[0])
    assert decision.hit and decision.intent == entry.intent


def test_a_gateway_on_the_embedded_stack_never_imports_torch(model_cache: Path) -> None:
    """VAD, recogniser, turn model, TTS and router all load without torch (the first
    start's one-off conversions, done here beforehand, are the only steps that may)."""
    from gateway.providers.moonshine_stt import MoonshineRecognizer

    cache = model_cache
    MoonshineRecognizer(threads=1, cache_dir=cache)
    probe = ("import sys\n"
             "from gateway.runtime import Runtime\n"
             "from gateway.settings import Settings\n"
             "Runtime.load(Settings.load({}))\n"
             "print(sorted(m for m in ('torch', 'sentence_transformers') if m in sys.modules))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VOICEGATE_MODEL_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
