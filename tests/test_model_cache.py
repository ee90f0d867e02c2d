"""Model exports kept in the model cache dir (intents/model_cache.py): superseded ones of a
kind are pruned. The exports are stubbed (a one-node ONNX model written in place of the real
export or conversion): the naming and the pruning are the real callers'."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from gateway.providers import moonshine_stt, ort_format
from intents import model_cache, onnx_encoder

OLD = 1_000_000  # mtimes set explicitly, long before any file written by the test run


def _tiny_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    return helper.make_model(graph)


@pytest.fixture
def stub_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedder's export (a child process) and Moonshine's conversion write a tiny model."""
    def run(args, **kwargs):  # type: ignore[no-untyped-def]
        onnx.save(_tiny_model(), args[4] if "intents.onnx_encoder" in args else args[-1])
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(onnx_encoder.subprocess, "run", run)
    monkeypatch.setattr(moonshine_stt.subprocess, "run", run)
    monkeypatch.setattr(ort_format, "ort_to_onnx", lambda path: _tiny_model())


def _installed_again(source: Path, at: int) -> None:
    """What ``pip install`` does to the source's key: another modification time."""
    os.utime(source, (at, at))


def _placed(directory: Path, names: list[str], at: int) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = directory / name
        path.write_bytes(b"x")
        os.utime(path, (at + i, at + i))
        paths.append(path)
    return paths


def test_superseded_exports_of_a_kind_are_pruned_to_the_newest_two(
        tmp_path: Path, stub_exports: None) -> None:
    """Review (stop 63): an export's name holds its source's key, which holds the installed
    model file's modification time (set by ``pip install``), so every image rebuild exports
    again under a new name and the old exports stay in the cache dir forever (~150 MB per
    upgrade on the shared volume). Three blockwise exports written with different source keys
    leave the newest 2 of that kind; the dynamic export's files (another kind, maybe in use by
    replicas on another CPU class sharing the volume), other cached files, a temp file of a
    write under way and look-alike names are untouched. (Stop 64: a temp file of that kind
    last written longer ago than the grace, a crashed write's, is deleted.)"""
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    model_dir.mkdir()
    cache.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    others = _placed(cache, [f"minilm-dynint8-{i:016x}.onnx" for i in range(3)]
                     + ["negatives-0123456789abcdef.npy",
                        "reembedded-01234567-0123456789abcdef.npz",
                        "minilm-int8-0123456789abcdef.onnx0a1b2c3d.tmp.bak",
                        "minilm-int8-notes.onnx", "minilm-int8-0123456789abcdef.onnx.bak",
                        "moonshine-encoder_model-0123456789abcdef.onnx"], at=10)
    writing = cache / "minilm-int8-0123456789abcdef.onnx0a1b2c3d.tmp"  # written just now
    writing.write_bytes(b"half")
    crashed = _placed(cache, ["minilm-int8-fedcba9876543210.onnxq_7z0k2m.tmp"], at=10)[0]
    exports = []
    for i in range(3):
        _installed_again(model_dir / "model.safetensors", OLD + 100 * i)
        export = onnx_encoder.cached_model(model_dir, cache)
        assert export.name.startswith("minilm-int8-") and export not in exports
        if i < 2:
            os.utime(export, (OLD + i, OLD + i))  # written in this order, long ago
        exports.append(export)
    assert sorted(cache.iterdir()) == sorted([*others, writing, *exports[1:]])
    assert not crashed.exists()
    assert onnx_encoder.cached_model(model_dir, cache) == exports[2]  # still loads


def test_moonshine_conversions_are_pruned_per_kind(tmp_path: Path, stub_exports: None) -> None:
    """Review (stop 63): the same for Moonshine's exports. The decoder's float conversion and
    its int8 build are different kinds (``moonshine_decoder_weights``): writing three of one
    leaves the other's alone, as it does the encoder's."""
    ort_dir, cache = tmp_path / "ort", tmp_path / "cache"
    ort_dir.mkdir()
    cache.mkdir()
    decoder = ort_dir / "decoder_model_merged.ort"
    decoder.write_bytes(b"ort")
    others = _placed(cache, [f"moonshine-decoder_model_merged-int8-{i:016x}.onnx"
                             for i in range(3)]
                     + [f"moonshine-encoder_model-{i:016x}.onnx" for i in range(3)], at=10)
    converted = []
    for i in range(3):
        _installed_again(decoder, OLD + 100 * i)
        path = moonshine_stt.converted_model(decoder, cache)
        os.utime(path, (OLD + 50 - i, OLD + 50 - i))  # the first written is the newest
        converted.append(path)
    assert sorted(cache.iterdir()) == sorted([*others, converted[0], converted[2]])


def test_a_failed_removal_is_logged_never_raised(tmp_path: Path, stub_exports: None,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Review (stop 63): a superseded export that cannot be removed (a read-only volume,
    another owner) is logged; the new export is returned and loads."""
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    model_dir.mkdir()
    cache.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    old = _placed(cache, [f"minilm-int8-{i:016x}.onnx" for i in range(3)], at=OLD)

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    with caplog.at_level(logging.INFO, logger="voicegate.models"):
        export = onnx_encoder.cached_model(model_dir, cache)
    monkeypatch.undo()
    assert model_cache.onnx_loads(export)
    assert sorted(cache.iterdir()) == sorted([*old, export])
    assert "model_cache_prune_failed" in caplog.text
