"""Half precision for strongly typed runtimes: every float tensor becomes fp16 or bf16, except
normalization and softmax, which compute in fp32 (Cast in, Cast out), and the logits, which stay fp32.

A strongly typed TensorRT network takes each layer's precision from the graph's types, so this
pass is where "fp16 with LayerNorm and softmax in fp32" is decided; the engine builder only
follows it. The KV cache inputs and outputs are half too (half the bytes every decode step
reads); the Runner converts at the contract's boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

HALF_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
# ops computed in fp32 inside a half graph: their statistics (mean, variance, sum of exp) overflow
# or lose too much in fp16
FP32_OPS = ("LayerNormalization", "RMSNormalization", "Softmax")
KEEP_FP32_OUTPUTS = ("logits",)


@dataclass
class HalfReport:
    dtype: str
    initializers: int  # converted to half
    fp32_islands: dict  # op type -> nodes kept in fp32
    clipped: int  # constant elements beyond the half range, clipped to its largest finite value

    def to_dict(self) -> dict:
        return vars(self).copy()


def convert_file(source: Path, destination: Path, dtype: str) -> HalfReport:
    """The ONNX at `source` in half precision, written to `destination` (weights as external data)."""
    model = ir.load(source)
    report = to_half(model, dtype)
    destination.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, destination, external_data=destination.name + ".data")
    return report


def to_half(model: ir.Model, dtype: str) -> HalfReport:
    """Rewrite the model in place; returns what changed."""
    half = HALF_TYPES[dtype]
    graph = model.graph
    clipped = 0
    originals: dict[str, np.ndarray] = {}
    for value in graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT:
            array = value.const_value.numpy()
            originals[value.name] = array
            value.const_value, count = _half_tensor(array, half, value.name)
            value.dtype = half
            clipped += count
    for node in graph.all_nodes():
        clipped += _convert_attributes(node, half)
    for value in _all_values(graph):
        if value.dtype == ir.DataType.FLOAT:
            value.dtype = half
    islands = {op: 0 for op in FP32_OPS}
    for node in list(graph):
        if node.op_type in FP32_OPS and node.domain == "":
            _compute_in_fp32(graph, node, half, originals)
            islands[node.op_type] += 1
        if node.op_type == "Attention" and node.domain == "":
            node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", ir.DataType.FLOAT)
            islands["Attention"] = islands.get("Attention", 0) + 1
    for index, output in enumerate(graph.outputs):
        if output.name in KEEP_FP32_OUTPUTS and output.dtype == half:
            graph.outputs[index] = _cast_output(graph, output)
    return HalfReport(dtype, len(originals), {k: v for k, v in islands.items() if v}, clipped)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph.all_nodes():
        yield from node.outputs


def _half_tensor(array: np.ndarray, half: ir.DataType, name: str | None = None) -> tuple[ir.Tensor, int]:
    limit = float(ml_dtypes.finfo(_NUMPY[half]).max)
    finite = np.isfinite(array)
    over = finite & (np.abs(array) > limit)  # e.g. a mask's float32 minimum: -inf in fp16 makes NaN rows
    converted = np.clip(array, -limit, limit) if over.any() else array
    return ir.tensor(converted.astype(_NUMPY[half]), name=name), int(over.sum())


def _convert_attributes(node: ir.Node, half: ir.DataType) -> int:
    """Float Constants and ConstantOfShape values become half; Cast to float becomes Cast to half.
    Returns how many constant elements were clipped to the half range."""
    if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", half)
    value = node.attributes.get("value")
    if value is not None and value.type == ir.AttributeType.TENSOR and value.value.dtype == ir.DataType.FLOAT:
        array = value.value.numpy()
    elif node.op_type == "Constant" and ("value_float" in node.attributes or "value_floats" in node.attributes):
        name = "value_float" if "value_float" in node.attributes else "value_floats"
        array = np.array(node.attributes.pop(name).value, np.float32)
    else:
        return 0
    tensor, clipped = _half_tensor(array, half)
    node.attributes["value"] = ir.AttrTensor("value", tensor)
    return clipped


def _compute_in_fp32(graph: ir.Graph, node: ir.Node, half: ir.DataType, originals: dict[str, np.ndarray]) -> None:
    """Cast the data input to fp32, give the node its fp32 parameters back, cast its output to half."""
    data = node.inputs[0]
    cast_in = ir.node("Cast", [data], {"to": ir.DataType.FLOAT}, name=_derived(node, "to_fp32"))
    cast_in.outputs[0].dtype, cast_in.outputs[0].shape = ir.DataType.FLOAT, data.shape
    graph.insert_before(node, cast_in)
    node.replace_input_with(0, cast_in.outputs[0])
    for index, parameter in enumerate(node.inputs[1:], start=1):
        if parameter is None or parameter.name not in originals or parameter.dtype == ir.DataType.FLOAT:
            continue
        if all(use.node.op_type in FP32_OPS for use in parameter.uses()):  # read only by fp32 islands
            parameter.const_value = ir.tensor(originals[parameter.name], name=parameter.name)
            parameter.dtype = ir.DataType.FLOAT
            continue
        name = f"{parameter.name}_fp32"  # shared with half consumers: one fp32 copy for the islands
        if name not in graph.initializers:
            graph.register_initializer(ir.Value(name=name, shape=parameter.shape, type=ir.TensorType(ir.DataType.FLOAT),
                                                const_value=ir.tensor(originals[parameter.name], name=name)))
        node.replace_input_with(index, graph.initializers[name])
    output = node.outputs[0]
    output.dtype = ir.DataType.FLOAT
    cast_out = ir.node("Cast", [output], {"to": half}, name=_derived(node, "to_half"))
    cast_out.outputs[0].dtype, cast_out.outputs[0].shape = half, output.shape
    output.replace_all_uses_with(cast_out.outputs[0], replace_graph_outputs=True)
    cast_out.replace_input_with(0, output)
    graph.insert_after(node, cast_out)
    for extra in node.outputs[1:]:  # mean / inverse std-dev outputs: fp32 statistics
        if extra.dtype == half:
            extra.dtype = ir.DataType.FLOAT


def _derived(node: ir.Node, suffix: str) -> str | None:
    return f"{node.name}_{suffix}" if node.name else None


def _cast_output(graph: ir.Graph, output: ir.Value) -> ir.Value:
    name = output.name
    output.name = f"{name}_half"
    cast = ir.node("Cast", [output], {"to": ir.DataType.FLOAT}, name=f"{name}_to_fp32")
    result = cast.outputs[0]
    result.name, result.dtype, result.shape = name, ir.DataType.FLOAT, output.shape
    graph.append(cast)
    return result
