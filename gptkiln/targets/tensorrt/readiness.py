"""Will TensorRT build this graph? Answered without TensorRT, from its published ONNX support.

Checked: every node's op and the type of its data input against onnx_support.SUPPORTED_OPS;
no contrib ops and no If/Loop/Scan (a decoder graph has none; one would defeat the profiles);
no tensor of a type the parser cannot represent; the quantization TensorRT accepts (zero points
all zero, blocked scales only for int4 with blocks of 64 or 128 over 2-D constant weights); the
Attention and LayerNormalization restrictions; and graph inputs whose every dynamic dimension
is one the optimization profiles cover. Problems fail the build; warnings are recorded.
It also counts the linear layers whose weights are 2:4 sparse (`gptkiln compress --sparsity 2:4`): the
engine is then built with SPARSE_WEIGHTS, whose kernels run fp16/bf16/int8 layers, not fp32 ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from gptkiln.graph.sparsity import two_four_linear_layers
from gptkiln.models.spec import DecoderSpec
from gptkiln.targets.tensorrt.compat import parse_version
from gptkiln.targets.tensorrt.onnx_support import (ADDED_IN, INT4_BLOCK_SIZES, DOCUMENTED_VERSION, MIN_VERSION, OPSET_RANGE, REPRESENTABLE,
                                                   SUPPORTED_OPS)
from gptkiln.targets.tensorrt.profiles import Profile

CONTROL_FLOW = ("If", "Loop", "Scan")
# the listed types describe the op's output, not its first input
OUTPUT_TYPED = ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike", "Range")
LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class ReadinessReport:
    documented_version: str
    opset: int
    minimum_tensorrt: str = MIN_VERSION  # the oldest parser that has every op the graph uses
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sparse_layers: int = 0  # linear layers with 2:4 sparse constant weights
    linear_layers: int = 0  # linear layers with constant weights

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ready": self.ready, "checked_against": f"TensorRT {self.documented_version} ONNX operator support",
                "opset": self.opset, "minimum_tensorrt": self.minimum_tensorrt, "problems": self.problems,
                "warnings": self.warnings, "sparse_layers": self.sparse_layers, "linear_layers": self.linear_layers}


def check(model: ir.Model, spec: DecoderSpec, profiles: list[Profile]) -> ReadinessReport:
    opset = model.opset_imports.get("", 0)
    report = ReadinessReport(DOCUMENTED_VERSION, opset)
    low, high = OPSET_RANGE
    if not low <= opset <= high:
        report.warnings.append(f"opset {opset} is outside the documented range {low}..{high}")
    _check_inputs(model.graph, spec, profiles, report)
    for node in model.graph.all_nodes():
        where = f"{node.op_type} '{node.name}'" if node.name else node.op_type
        for problem in _node_problems(node):
            report.problems.append(f"{where}: {problem}")
        for warning in _node_warnings(node):
            report.warnings.append(f"{where}: {warning}")
        added = ADDED_IN.get(node.op_type)
        if added and node.domain == "" and parse_version(added) > parse_version(report.minimum_tensorrt):
            report.minimum_tensorrt = added
    for value in _values(model.graph):
        if value.dtype is not None and value.dtype.name not in REPRESENTABLE:
            report.problems.append(f"tensor '{value.name}' is {value.dtype.name}, which TensorRT cannot represent")
    report.sparse_layers, report.linear_layers = two_four_linear_layers(model)
    if report.sparse_layers and not weight_types(model) & {ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT8}:
        report.warnings.append(f"{report.sparse_layers} of {report.linear_layers} linear layers are 2:4 sparse, but the "
                               "graph is fp32: sparse tensor cores run fp16, bf16 and int8 layers (TF32 is off), so "
                               "they run dense; build --quantize fp16, bf16 or w8a8 to use them")
    return report


def weight_types(model: ir.Model) -> set[ir.DataType]:
    """The element types of the graph's initializers."""
    return {value.dtype for value in model.graph.initializers.values()}


def _node_problems(node: ir.Node) -> list[str]:
    if node.domain not in ("", "ai.onnx"):
        return [f"contrib op {node.domain}.{node.op_type}: TensorRT runs standard ONNX ops only "
                "(the ONNX Runtime fusion set must not run for this target)"]
    if node.op_type in CONTROL_FLOW:
        return [f"control flow ({node.op_type}) in a decoder graph: export without data-dependent branches"]
    if node.op_type not in SUPPORTED_OPS:
        return [f"op {node.op_type} is not in TensorRT's ONNX operator support"]
    problems = []
    data = node.outputs[0] if node.op_type in OUTPUT_TYPED or not node.inputs else node.inputs[0]
    if data is not None and data.dtype is not None and data.dtype.name not in SUPPORTED_OPS[node.op_type]:
        problems.append(f"input type {data.dtype.name} is not supported (supported: "
                        f"{', '.join(SUPPORTED_OPS[node.op_type])})")
    rules = {"QuantizeLinear": _quantize_problems, "DequantizeLinear": _quantize_problems,
             "Attention": _attention_problems, "LayerNormalization": _layer_norm_problems,
             "Gelu": _gelu_problems, "ScatterND": _scatter_problems}
    if node.op_type in rules:
        problems += rules[node.op_type](node)
    return problems


def _quantize_problems(node: ir.Node) -> list[str]:
    problems = []
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None:
        if zero_point.dtype is not None and zero_point.dtype.name in ("UINT8", "UINT4"):
            problems.append(f"zero point of type {zero_point.dtype.name}: TensorRT quantizes to signed types only")
        constant = ir.convenience.get_const_tensor(zero_point)
        if constant is not None and np.any(constant.numpy().astype(np.float32) != 0):
            problems.append("nonzero zero point: TensorRT supports symmetric quantization only "
                            "(build int4 with --int4-symmetric)")
    block_size = node.attributes.get_int("block_size", 0)
    if block_size:
        problems += _block_problems(node, block_size)
    return problems


def _block_problems(node: ir.Node, block_size: int) -> list[str]:
    problems = []
    data, scale = node.inputs[0], node.inputs[1]
    if node.op_type != "DequantizeLinear" or data.dtype != ir.DataType.INT4:
        problems.append("blocked quantization is supported for int4 weights (DequantizeLinear) only")
    if block_size not in INT4_BLOCK_SIZES:
        problems.append(f"int4 block size {block_size}: TensorRT supports {' or '.join(map(str, INT4_BLOCK_SIZES))} "
                        "(build with --int4-block-size 64 or 128; a layer whose input size is not a multiple of "
                        "64 gets a smaller block)")
    if data.shape is None or data.shape.rank() != 2 or ir.convenience.get_const_tensor(data) is None:
        problems.append("blocked quantization needs 2-D constant weights")
    if ir.convenience.get_const_tensor(scale) is None:
        problems.append("blocked scales must be constants")
    return problems


def _attention_problems(node: ir.Node) -> list[str]:
    problems = []
    names = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
    for index in (4, 5, 6):
        if len(node.inputs) > index and node.inputs[index] is not None:
            problems.append(f"the {names[index]} input is not supported (concatenate the cache outside Attention)")
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        problems.append("only the first output is supported (present_key/value and qk_matmul_output are not)")
    if node.attributes.get_int("qk_matmul_output_mode", 0) or node.attributes.get_float("softcap", 0.0):
        problems.append("qk_matmul_output_mode and softcap are not supported")
    return problems


def _layer_norm_problems(node: ir.Node) -> list[str]:
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return ["only the first output (Y) is supported"]
    return []


def _gelu_problems(node: ir.Node) -> list[str]:
    approximate = node.attributes.get_string("approximate", "none")
    return [] if approximate in ("none", "tanh") else [f"approximate={approximate!r} is not supported"]


def _scatter_problems(node: ir.Node) -> list[str]:
    reduction = node.attributes.get_string("reduction", "none")
    return [] if reduction == "none" else [f"reduction={reduction!r} is not supported"]


def _node_warnings(node: ir.Node) -> list[str]:
    warnings = []
    if node.op_type == "Attention" and node.domain == "" and node.inputs[0].shape is not None \
            and node.inputs[0].shape.rank() != 4:
        warnings.append("3-D Q/K/V: TensorRT 10.15 documents 4-D only (newer parsers reshape)")
    if node.op_type == "DequantizeLinear" and node.attributes.get_int("block_size", 0):
        consumers = {use.node.op_type for use in node.outputs[0].uses()}
        if not consumers <= set(LINEAR_OPS) | {"Transpose"}:
            warnings.append(f"int4 weights feed {', '.join(sorted(consumers))}; TensorRT documents them for MatMul/Gemm")
    return warnings


def _check_inputs(graph: ir.Graph, spec: DecoderSpec, profiles: list[Profile], report: ReadinessReport) -> None:
    """Every graph input must be in the profiles, with the profiles' rank and static sizes."""
    shapes = profiles[0].shapes(spec)
    for value in graph.inputs:
        if value.name not in shapes:
            report.problems.append(f"graph input '{value.name}' is not part of the IO contract: "
                                   "no optimization profile gives it a shape")
            continue
        if value.shape is None:
            report.problems.append(f"graph input '{value.name}' has no shape")
            continue
        low, _, high = shapes[value.name]
        if value.shape.rank() != len(low):
            report.problems.append(f"graph input '{value.name}' has rank {value.shape.rank()}, the profiles {len(low)}")
            continue
        for axis, dim in enumerate(value.shape):
            static = low[axis] == high[axis]
            if isinstance(dim, int) and not (static and dim == low[axis]):
                report.problems.append(f"graph input '{value.name}' dim {axis} is fixed at {dim}, the profiles "
                                       f"range {low[axis]}..{high[axis]}")
            elif not isinstance(dim, int) and dim.value is None:
                report.problems.append(f"graph input '{value.name}' dim {axis} is dynamic without a name: "
                                       "no profile can tie it to batch, sequence or past")


def _values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.all_nodes():
        yield from (output for output in node.outputs)
