"""ONNX Runtime's weight-only kernel, com.microsoft MatMulNBits, written in its own layout at compile time:

    MatMul(x, DequantizeLinear(codes [K, N], scales, zero_points, axis=0, block_size))
        ==>  MatMulNBits(x, blocks [N, K/block, block bytes (half in 4 bits)], scales [N, K/block] f32, zero points)

ONNX Runtime's own fusion does the same when it loads the standard form, at every load: it builds transposed
copies of the codes, prepacks those and keeps the memory it used (SmolLM2's engines, tokenizer loaded: a peak
26 MB (int4) and 43 MB (int8) higher than from this form, and session creation twice as long: benchmarks/RESULTS.md,
session 44). From this form the session prepacks straight from the mapped file. The cost is
on disk: MatMulNBits takes its scales in the activations' type, so the fp16 scales (initializers.half_constant) are
stored as fp32 (int4 +4.1 MB, int8 +6.5 MB); a Cast in front would read as zeros in a session without graph
optimisations. The numbers are the fusion's, bit for bit: the same codes, scales and accuracy level.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from gptkiln.graph.initializers import (constant_array, initializer, remove_with_constant_inputs, replace_node,
                                       stored_initializer)

MATMUL_NBITS_ACCURACY = 4  # int8 compute, the only fast one-token kernel on a CPU; ORT's fusion's default too


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [V, n] (one a byte) as [V, ceil(n / 2)] bytes, low nibble first (a zero nibble pads an odd n)."""
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((len(codes), 1), np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unsigned_codes(dequantize: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(codes uint8, scales f32, zero points uint8 (one per block), bits) of a blocked DequantizeLinear, in its
    own orientation, signed codes shifted to the unsigned grid (zero point 2**(bits-1))."""
    codes, scales = (constant_array(v) for v in dequantize.inputs[:2])
    bits = 4 if codes.dtype in (ml_dtypes.int4, ml_dtypes.uint4) else 8
    if len(dequantize.inputs) == 3:
        zeros = constant_array(dequantize.inputs[2]).astype(np.int16)
    else:
        zeros = np.zeros(scales.shape, np.int16)
    shift = 2 ** (bits - 1) if codes.dtype in (ml_dtypes.int4, np.int8) else 0
    return ((codes.astype(np.int16) + shift).astype(np.uint8), scales.astype(np.float32),
            (zeros + shift).astype(np.uint8), bits)


def nbits_layout(codes: np.ndarray, zeros: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray | None]:
    """MatMulNBits' weight [N, K/block, block bytes] from unsigned codes [N, K], and its zero points [N, K/block] as
    the kernel takes them (two a byte in 4 bits); None where each is its default, the middle of the grid."""
    rows, width = codes.shape
    blocks = (pack_nibbles(codes) if bits == 4 else np.ascontiguousarray(codes)).reshape(rows, width // block, -1)
    if (zeros == 2 ** (bits - 1)).all():
        return blocks, None
    return blocks, pack_nibbles(zeros) if bits == 4 else np.ascontiguousarray(zeros)


def _lowerable(dequantize: ir.Node) -> bool:
    """A weight-only DequantizeLinear that only MatMuls read as their weight, in a form MatMulNBits takes: 4 or
    8 bits, fp32 activations, blocks along the input axis of a power-of-two size of at least 16 dividing it."""
    block = dequantize.attributes.get_int("block_size", 0)
    codes = dequantize.inputs[0]
    users = dequantize.outputs[0].uses()
    if (dequantize.attributes.get_int("axis", 1) != 0 or block < 16 or block & (block - 1) or codes.const_value is None
            or codes.dtype not in (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8)
            or len(codes.shape) != 2 or codes.shape[0] % block or not users):
        return False
    if any(constant_array(value) is None for value in dequantize.inputs[1:]):
        return False
    return all(user.op_type == "MatMul" and index == 1 and user.inputs[0].dtype == ir.DataType.FLOAT
               for user, index in users)


def lower_blocked_matmuls(model: ir.Model) -> int:
    """Each MatMul of a weight-only blocked DequantizeLinear as MatMulNBits on the same numbers; returns how many
    weights were lowered (the others stay for ONNX Runtime's fusion or its plain kernels)."""
    lowered = 0
    for dequantize in [node for node in model.graph if node.op_type == "DequantizeLinear" and _lowerable(node)]:
        codes, scales, zeros, bits = unsigned_codes(dequantize)
        block = dequantize.attributes.get_int("block_size")
        width, outputs = codes.shape
        blocks, zero_points = nbits_layout(codes.T, zeros.T, bits, block)
        names = [stored_initializer(value).name for value in dequantize.inputs]  # fp16 scales: their initializer's
        inputs = [initializer(model, f"{names[0]}.blocks", blocks),
                  initializer(model, f"{names[1]}.rows", np.ascontiguousarray(scales.T))]
        if zero_points is not None:
            zero_name = names[2] if len(names) == 3 else f"{names[0]}.zero_point"  # unsigned codes' default: 0
            inputs.append(initializer(model, f"{zero_name}.rows", zero_points))
        for matmul, _ in list(dequantize.outputs[0].uses()):
            replace_node(model, matmul, ir.node(
                "MatMulNBits", [matmul.inputs[0], *inputs], domain="com.microsoft", name=matmul.name,
                attributes={"K": width, "N": outputs, "bits": bits, "block_size": block,
                            "accuracy_level": MATMUL_NBITS_ACCURACY}))
        remove_with_constant_inputs(model, dequantize)
        lowered += 1
    if lowered:
        model.opset_imports.setdefault("com.microsoft", 1)
    return lowered
