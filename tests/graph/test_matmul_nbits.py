"""The onnxruntime target writes each weight-only DequantizeLinear -> MatMul as MatMulNBits in the kernel's own
layout: the numbers ONNX Runtime's own load-time fusion computes, in a session that needs no graph optimisation."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gptkiln.graph.initializers import half_constant, half_exact, initializer
from gptkiln.graph.matmul_nbits import lower_blocked_matmuls

K, N, BLOCK = 128, 48, 32
X = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)


def _linear_graph(code_type, zero_points: bool, block: int = BLOCK, width: int = K) -> ir.Model:
    """x [2, 3, width] -> MatMul(x, DequantizeLinear(codes [width, N], Cast(fp16 scales), zero points, axis 0))."""
    rng = np.random.default_rng(0)
    info = np.iinfo(np.int8) if code_type == np.int8 else np.iinfo(np.uint8) if code_type == np.uint8 else None
    low, high = (info.min, info.max + 1) if info else ((-8, 8) if code_type == ml_dtypes.int4 else (0, 16))
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, width]))
    graph.inputs.append(x)
    scale = half_constant(model, "w.scale", half_exact(rng.uniform(0.01, 0.05, (width // block, N)).astype(np.float32)))
    inputs = [initializer(model, "w.codes", rng.integers(low, high, (width, N)).astype(code_type)), scale.outputs[0]]
    if zero_points:
        inputs.append(initializer(model, "w.zero_point", rng.integers(low, high, (width // block, N)).astype(code_type)))
    dequantize = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": block})
    matmul = ir.node("MatMul", [x, dequantize.outputs[0]])
    graph.extend([scale, dequantize, matmul])
    matmul.outputs[0].name = "y"
    graph.outputs.append(matmul.outputs[0])
    return model


def _run(model: ir.Model, level) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(["y"], {"x": X})[0]


@pytest.mark.parametrize("code_type, zero_points", [(ml_dtypes.int4, True), (ml_dtypes.int4, False),
                                                    (ml_dtypes.uint4, True), (np.int8, True), (np.uint8, False)])
def test_a_weight_only_linear_computes_what_onnx_runtimes_own_fusion_computes(code_type, zero_points):
    model = _linear_graph(code_type, zero_points)
    fused_at_load = _run(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    exact = _run(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # the float weight, no int8 activations

    assert lower_blocked_matmuls(model) == 1
    assert [node.op_type for node in model.graph] == ["MatMulNBits"]
    # the fp16 scales and their Cast are gone; unsigned codes without zero points have 0 for them, not the
    # kernel's default (the middle of the grid)
    zero_points = {"w.zero_point.rows"} if zero_points else (
        set() if code_type in (ml_dtypes.int4, np.int8) else {"w.codes.zero_point.rows"})
    assert set(model.graph.initializers) == {"w.codes.blocks", "w.scale.rows"} | zero_points
    bits = 4 if code_type in (ml_dtypes.int4, ml_dtypes.uint4) else 8
    blocks = model.graph.initializers["w.codes.blocks"].const_value
    assert blocks.dtype == ir.DataType.UINT8 and blocks.shape == (N, K // BLOCK, BLOCK * bits // 8)
    assert model.graph.initializers["w.scale.rows"].const_value.dtype == ir.DataType.FLOAT

    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_array_equal(_run(model, level), fused_at_load)
    np.testing.assert_allclose(fused_at_load, exact, rtol=0.05, atol=0.05 * np.abs(exact).max())


def test_a_weight_the_kernel_cannot_take_stays_as_it_is():
    odd_block = _linear_graph(ml_dtypes.int4, True, block=24, width=96)  # not a power of two
    assert lower_blocked_matmuls(odd_block) == 0
    assert [node.op_type for node in odd_block.graph] == ["Cast", "DequantizeLinear", "MatMul"]

    also_read = _linear_graph(ml_dtypes.int4, True)  # the float weight is an output too
    dequantize = next(node for node in also_read.graph if node.op_type == "DequantizeLinear")
    also_read.graph.outputs.append(dequantize.outputs[0])
    identity = ir.node("Identity", [dequantize.outputs[0]])
    also_read.graph.append(identity)
    assert lower_blocked_matmuls(also_read) == 0
