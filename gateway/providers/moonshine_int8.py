"""Moonshine's decoder with its MatMul weights in int8 blocks (``MatMulNBits``): the default.

A decoder step is memory-bound: it reads every weight once for one token, and as float
(``ort_format``'s conversion, folded by ORT at load) that is ~150 MB a step, 54 MB of it
the 32k-token output projection. Here the weights are stored as int8 in blocks of 32 along
the input dimension, each block with its own scale (onnxruntime's ``MatMulNBitsQuantizer``:
8 bits, symmetric, ``accuracy_level=4``, as the router's embedder, intents/onnx_encoder.py),
so a step reads ~40 MB. The shipped weights are themselves int8, one scale per tensor;
blocks of 32 keep them to within 1/254 of each block's largest weight.

The recipe, from the ``.ort`` file:

1. ``ort_to_onnx``; every ``Cast(int8 constant) → Mul(scale) → Add(zero point)`` is folded
   into a float initializer with numpy (the same float32 arithmetic as ORT's folding at
   load: the same logits, bit for bit). The embedding table is tied to the output projection: its
   ``Transpose`` inside both branches of the merged decoder's ``If`` becomes one
   transposed initializer, and the embedding ``Gather`` reads the int8 rows and scales
   only those (exact, and the table is not kept as float).
2. ``MatMulNBitsQuantizer`` turns every MatMul whose weight is a constant into
   ``MatMulNBits``, inside both ``If`` branches (81 with no cache, 65 with one: the
   output projection included; the attention's activation × activation MatMuls stay).
   A weight both branches use is kept once.

Only the decoder: the encoder runs once per utterance on many frames, where int8
activations cost more than the weights' bandwidth saves (90 vs 65 ms here).

Measured on a 2-core AVX2 machine, one thread, the recognisers taking turns on each of 30
phone-band Banking77 questions (``bench/recognizer_speed.py --n 30``; medians, int8 vs
float): a decoder step 9.5 vs 17.8 ms, the decoder over an utterance 141 vs 234 ms, the
whole decode (encoder ~82 ms in both) 226 vs 311 ms, with a draft 174 vs 210 ms; WER 19.3%
vs 19.6%, the same token ids on 28 of 30. The recogniser holds ~345 MB instead of ~745 MB
and loads in 1.2 s instead of 1.9 s. With int8 activations, float rounding that differs
between a one-token step and a many-token pass can move a logit by ~0.1, so a draft
(``MoonshineRecognizer.token_ids``) can change the decode at a near-tie: 1 of 30
utterances here ("using a European card" for "using your European card"). 4-bit weights
(the same recipe, bits=4, in a separate interleaved run: step 7.6 ms where int8 took 10.2
and float 18.6) kept the float decoder's ids on only 23 of 30, for the same WER.

Built once per machine into the model cache, in a child process (the quantizer sets up
logging at import and needs a few hundred MB while it runs):
``python -m gateway.providers.moonshine_int8 DECODER_ORT TARGET``.
"""

from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

BITS = 8
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations in the kernel: the fast path (levels 0-1 are ~30x slower)


class QuantizeError(RuntimeError):
    """The decoder does not have the structure this recipe expects."""


def graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph and every subgraph under it (outermost first)."""
    return [model.graph, *_subgraphs(model.graph)]


def _child_graphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs a node holds as attributes (an ``If``'s branches)."""
    for attr in node.attribute:
        yield from [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for g in _child_graphs(node):
            yield g
            yield from _subgraphs(g)


def op_counts(model: onnx.ModelProto, op_type: str) -> dict[str, int]:
    """``op_type`` nodes per graph name (the ``If`` branches are else_branch, then_branch)."""
    return {g.name: sum(n.op_type == op_type for n in g.node) for g in graphs(model)}


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    graph.ClearField("node")
    graph.node.extend(nodes)


def fold_weights(model: onnx.ModelProto) -> int:
    """Fold the main graph's dequantized weights into float initializers (in place).

    Returns how many were folded."""
    main = model.graph
    inits = {t.name: t for t in main.initializer}
    uses = collections.Counter(i for g in graphs(model) for n in g.node for i in n.input)
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in main.node:
        for name in node.input:
            consumers[name].append(node)

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        if uses[name] == 1 and len(found) == 1 and found[0].op_type == op_type:
            return found[0]
        return None

    def scalar(name: str) -> np.ndarray | None:
        t = inits.get(name)
        if t is None or t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) != 1:
            return None
        return numpy_helper.to_array(t).reshape(())

    # Add output -> (float weight, int8 name, scale name, zero point name)
    folded: dict[str, tuple[np.ndarray, str, str, str]] = {}
    dropped: set[int] = set()
    for cast in main.node:
        to = next((a.i for a in cast.attribute if a.name == "to"), None)
        q = inits.get(cast.input[0]) if cast.op_type == "Cast" else None
        if q is None or q.data_type != onnx.TensorProto.INT8 or to != onnx.TensorProto.FLOAT:
            continue
        mul = only_consumer(cast.output[0], "Mul")
        add = only_consumer(mul.output[0], "Add") if mul is not None else None
        if mul is None or add is None:
            continue
        scale_name = next(i for i in mul.input if i != cast.output[0])
        zero_name = next(i for i in add.input if i != mul.output[0])
        scale, zero = scalar(scale_name), scalar(zero_name)
        if scale is None or zero is None:
            continue
        weight = numpy_helper.to_array(q).astype(np.float32) * np.float32(scale)
        folded[add.output[0]] = (weight + np.float32(zero), q.name, scale_name, zero_name)
        dropped.update(id(n) for n in (cast, mul, add))
    _replace_nodes(main, [n for n in main.node if id(n) not in dropped])

    extra: dict[str, np.ndarray] = {}
    renamed: dict[str, str] = {}
    # Innermost graphs first: rebuilding a graph's node list copies its subgraphs.
    for graph in reversed(graphs(model)):
        nodes = []
        for node in graph.node:
            source = folded.get(node.input[0]) if node.input else None
            if source is not None and node.op_type == "Transpose":  # the tied output projection
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                name = f"{node.input[0]}_transposed"
                extra[name] = np.ascontiguousarray(np.transpose(source[0], perm))
                renamed[node.output[0]] = name
                continue
            if source is not None and node.op_type == "Gather":  # the embedding: int8 rows
                _, q_name, scale_name, zero_name = source
                out = node.output[0]
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                nodes += [
                    helper.make_node("Gather", [q_name, node.input[1]], [f"{out}_int8"],
                                     name=node.name, **attrs),
                    helper.make_node("Cast", [f"{out}_int8"], [f"{out}_cast"],
                                     to=onnx.TensorProto.FLOAT, name=f"{node.name}_cast"),
                    helper.make_node("Mul", [f"{out}_cast", scale_name], [f"{out}_scaled"],
                                     name=f"{node.name}_scale"),
                    helper.make_node("Add", [f"{out}_scaled", zero_name], [out],
                                     name=f"{node.name}_zero_point"),
                ]
                continue
            nodes.append(node)
        _replace_nodes(graph, nodes)
    for graph in graphs(model):
        for node in graph.node:
            for j, name in enumerate(node.input):
                if name in renamed:
                    node.input[j] = renamed[name]
    used = {i for g in graphs(model) for n in g.node for i in n.input}
    extra.update((name, w) for name, (w, *_) in folded.items() if name in used)
    kept = [t for t in main.initializer if t.name in used]
    main.ClearField("initializer")
    main.initializer.extend(kept)
    main.initializer.extend(numpy_helper.from_array(w, name) for name, w in extra.items())
    return len(folded)


def quantize_weights(model: onnx.ModelProto, bits: int = BITS) -> onnx.ModelProto:
    """Every MatMul with a constant weight (in any subgraph) as ``MatMulNBits``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE,
                                     is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    out = quantizer.model.model
    # A main-graph weight used in both branches was quantized twice, under one name.
    for graph in graphs(out):
        unique = {t.name: t for t in graph.initializer}
        if len(unique) != len(graph.initializer):
            graph.ClearField("initializer")
            graph.initializer.extend(unique.values())
    left = _constant_matmuls(out.graph, set())
    if left:
        raise QuantizeError(f"MatMuls left with float weights: {left[:5]}")
    return out


def _constant_matmuls(graph: onnx.GraphProto, outer: set[str]) -> list[str]:
    """MatMuls whose weight is an initializer of their graph or of one enclosing it."""
    visible = (outer - {o for n in graph.node for o in n.output}) | {
        t.name for t in graph.initializer}
    found = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in visible]
    for node in graph.node:
        for g in _child_graphs(node):
            found += _constant_matmuls(g, visible)
    return found


def build(ort_path: Path, target: Path, bits: int = BITS) -> None:
    """The ``.ort`` decoder as an ONNX model with int8 block weights, written to ``target``."""
    from .ort_format import ort_to_onnx

    model = ort_to_onnx(ort_path)
    if fold_weights(model) == 0:
        raise QuantizeError(f"{ort_path.name}: no int8 weights to fold")
    model = quantize_weights(model, bits)
    if not any(op_counts(model, "MatMulNBits").values()):
        raise QuantizeError(f"{ort_path.name}: no MatMul weights were quantized")
    target.write_bytes(model.SerializeToString())


if __name__ == "__main__":  # the child process of moonshine_stt.int8_model: ORT_FILE TARGET
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its basicConfig)

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    build(Path(sys.argv[1]), Path(sys.argv[2]))
