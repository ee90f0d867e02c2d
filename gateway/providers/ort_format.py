"""ONNX Runtime's ``.ort`` flatbuffer format back to an ONNX model, so ORT can optimise it.

An ``.ort`` file is a model already optimised for a minimal runtime, and ONNX Runtime
loads it as it is. Moonshine's files store their weights as int8 that the graph casts
and scales back to float on every run (``Cast`` → ``Mul`` before each ``MatMul``): a
decoder step spends most of its time re-creating the same float weights. As ONNX, the
same graph goes through ORT's constant folding, which computes those float weights
once, at load.

The conversion is structural and lossless: nodes (with their subgraphs), initializers,
graph inputs and outputs with their types. Only what the flatbuffer schema holds and
ONNX needs is read, from ORT's own generated reader
(``onnxruntime.tools.ort_format_model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
    InferenceSession as FbInferenceSession)

# The flatbuffer's enums use ONNX's numbering for attribute and tensor element types.
_FLOAT, _INT, _STRING, _TENSOR, _GRAPH = 1, 2, 3, 4, 5
_FLOATS, _INTS, _STRINGS, _TENSORS, _GRAPHS = 6, 7, 8, 9, 10
_DIM_VALUE, _DIM_PARAM = 1, 2
_TENSOR_TYPE = 1  # TypeInfoValue.tensor_type


class OrtFormatError(ValueError):
    """The file is not an ``.ort`` model this converter can turn into ONNX."""


def ort_to_onnx(path: str | Path) -> onnx.ModelProto:
    data = Path(path).read_bytes()
    try:
        session = FbInferenceSession.InferenceSession.GetRootAs(data, 0)
        model = session.Model()
    except Exception as exc:  # the flatbuffer reader raises whatever it hits
        raise OrtFormatError(f"{path}: not an ORT format model ({exc})") from exc
    if model is None or model.Graph() is None:
        raise OrtFormatError(f"{path}: no model graph in the file")
    opsets = [helper.make_opsetid(_text(model.OpsetImport(i).Domain()),
                                  model.OpsetImport(i).Version())
              for i in range(model.OpsetImportLength())]
    graph = _graph(model.Graph(), "main")
    proto = helper.make_model(graph, opset_imports=opsets,
                              producer_name="voicegate.ort_format")
    proto.ir_version = model.IrVersion()
    return proto


def _text(value: bytes | None) -> str:
    return value.decode("utf-8") if value else ""


def _graph(fb: Any, name: str) -> onnx.GraphProto:
    value_infos = {}
    for i in range(fb.NodeArgsLength()):
        arg = fb.NodeArgs(i)
        value_infos[_text(arg.Name())] = arg
    nodes = [_node(fb.Nodes(i)) for i in range(fb.NodesLength())]
    initializers = [_tensor(fb.Initializers(i)) for i in range(fb.InitializersLength())]
    if fb.SparseInitializersLength():
        raise OrtFormatError("sparse initializers are not supported")
    inputs = [_value_info(_text(fb.Inputs(i)), value_infos)
              for i in range(fb.InputsLength())]
    outputs = [_value_info(_text(fb.Outputs(i)), value_infos)
               for i in range(fb.OutputsLength())]
    return helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)


def _node(fb: Any) -> onnx.NodeProto:
    node = onnx.NodeProto()
    node.op_type = _text(fb.OpType())
    node.domain = _text(fb.Domain())
    node.name = _text(fb.Name())
    node.input.extend(_text(fb.Inputs(i)) for i in range(fb.InputsLength()))
    node.output.extend(_text(fb.Outputs(i)) for i in range(fb.OutputsLength()))
    for i in range(fb.AttributesLength()):
        node.attribute.append(_attribute(fb.Attributes(i)))
    return node


def _attribute(fb: Any) -> onnx.AttributeProto:
    name, kind = _text(fb.Name()), fb.Type()
    if kind == _FLOAT:
        return helper.make_attribute(name, fb.F())
    if kind == _INT:
        return helper.make_attribute(name, fb.I())
    if kind == _STRING:
        return helper.make_attribute(name, fb.S() or b"")
    if kind == _TENSOR:
        return helper.make_attribute(name, _tensor(fb.T()))
    if kind == _GRAPH:
        return helper.make_attribute(name, _graph(fb.G(), name))
    if kind == _FLOATS:
        return helper.make_attribute(name, [fb.Floats(i) for i in range(fb.FloatsLength())],
                                     attr_type=onnx.AttributeProto.FLOATS)
    if kind == _INTS:
        return helper.make_attribute(name, [fb.Ints(i) for i in range(fb.IntsLength())],
                                     attr_type=onnx.AttributeProto.INTS)
    if kind == _STRINGS:
        return helper.make_attribute(name, [fb.Strings(i) for i in range(fb.StringsLength())],
                                     attr_type=onnx.AttributeProto.STRINGS)
    if kind == _TENSORS:
        return helper.make_attribute(name, [_tensor(fb.Tensors(i))
                                            for i in range(fb.TensorsLength())])
    if kind == _GRAPHS:
        return helper.make_attribute(name, [_graph(fb.Graphs(i), name)
                                            for i in range(fb.GraphsLength())])
    raise OrtFormatError(f"attribute {name!r} has an unsupported type {kind}")


def _tensor(fb: Any) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name = _text(fb.Name())
    tensor.data_type = fb.DataType()
    tensor.dims.extend(int(d) for d in (fb.DimsAsNumpy() if fb.DimsLength() else []))
    if fb.ExternalDataOffset() >= 0:
        raise OrtFormatError(f"tensor {tensor.name!r} keeps its data outside the file")
    if fb.StringDataLength():
        tensor.string_data.extend(fb.StringData(i) for i in range(fb.StringDataLength()))
    elif fb.RawDataLength():
        tensor.raw_data = fb.RawDataAsNumpy().tobytes()
    return tensor


def _value_info(name: str, value_infos: dict[str, Any]) -> onnx.ValueInfoProto:
    arg = value_infos.get(name)
    type_info = arg.Type() if arg is not None else None
    if type_info is None or type_info.ValueType() != _TENSOR_TYPE:
        return helper.make_empty_tensor_value_info(name)
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import TensorTypeAndShape

    table = type_info.Value()
    tensor_type = TensorTypeAndShape.TensorTypeAndShape()
    tensor_type.Init(table.Bytes, table.Pos)
    shape = tensor_type.Shape()
    dims: list[int | str | None] | None = None
    if shape is not None:
        dims = []
        for i in range(shape.DimLength()):
            value = shape.Dim(i).Value()
            if value is None:
                dims.append(None)
            elif value.DimType() == _DIM_VALUE:
                dims.append(int(value.DimValue()))
            elif value.DimType() == _DIM_PARAM:
                dims.append(_text(value.DimParam()))
            else:
                dims.append(None)
    return helper.make_tensor_value_info(name, tensor_type.ElemType(), dims)


def constant_count(model: onnx.ModelProto) -> int:
    """Initializer elements (for a log line and tests)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


__all__ = ["OrtFormatError", "ort_to_onnx", "numpy_helper"]
