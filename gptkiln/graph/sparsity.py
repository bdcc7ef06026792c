"""2:4 semi-structured sparsity: at most 2 nonzero weights in every group of 4 consecutive weights along a
linear layer's reduction (input) axis, the pattern NVIDIA's sparse tensor cores (Ampere and newer) run.

`is_two_four` checks an array; `two_four_linear_layers` counts the linear layers of an ONNX graph whose
constant weights hold the pattern (MatMul's B is [K, N]; Gemm's B is [N, K] under transB), looking through a
DequantizeLinear, whose zero point is 0 in every build TensorRT takes, so a zero weight stays zero.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

GROUP, KEPT = 4, 2


def is_two_four(weight: np.ndarray, axis: int) -> bool:
    """True where every group of 4 along `axis` (whose size is a multiple of 4) holds at most 2 nonzeros."""
    if weight.ndim != 2 or weight.shape[axis] % GROUP:
        return False
    rows = np.moveaxis(weight, axis, -1).reshape(-1, GROUP)
    return bool(np.all(np.count_nonzero(rows, axis=1) <= KEPT))


def two_four_linear_layers(model: ir.Model) -> tuple[int, int]:
    """(linear layers with 2:4 sparse constant weights, linear layers with constant weights)."""
    sparse = total = 0
    for node in model.graph.all_nodes():
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = _constant_weight(node.inputs[1])
        if weight is None:
            continue
        axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
        total += 1
        sparse += is_two_four(weight, axis)
    return sparse, total


def _constant_weight(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    constant = ir.convenience.get_const_tensor(value)
    if constant is not None:
        return constant.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        quantized = ir.convenience.get_const_tensor(producer.inputs[0])
        return None if quantized is None else quantized.numpy()
    return None
