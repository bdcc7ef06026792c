"""ONNX Runtime: the lookup tables of a quantized build stored as uint8.

    Gather(table_f32, ids)  ==>  com.microsoft GatherBlockQuantized(codes_u8, ids, scales, zero_points)

A table that only feeds Gather's data input (the token and position embeddings; a tied lm_head reads
its own quantized copy) is quantized asymmetrically in blocks of its row (bits=8): SmolLM2's 49,152 x 576
embedding is 113 MB in f32, 30 MB so. OpenVINO's target does the same per row
(`targets.openvino.compress_lookup_tables`). fp32 builds keep their tables exact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gptkiln.graph.initializers import initializer

LOW_PRECISION = {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4}
MAX_BLOCK = 128  # GatherBlockQuantized takes a power-of-two block of at least 16


def table_block(row: int) -> int | None:
    """The largest power-of-two block of at most MAX_BLOCK that divides a row of `row` values."""
    block = MAX_BLOCK
    while block >= 16 and row % block:
        block //= 2
    return block if block >= 16 else None


def quantize_rows(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [V, D], scales f32 [V, D/block], zero points uint8 [V, D/block]): asymmetric per block."""
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)  # 0 exact: padding rows stay 0
    scale = (np.maximum(high - low, 1e-12) / 255).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, 255).astype(np.uint8)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
    return codes.reshape(rows, width), scale, zero


def quantize_lookup_tables(model: ir.Model) -> list[str]:
    """Rewrite every f32 table that only Gather (axis 0) reads; returns their names. A graph without
    low-precision weights is left as it is."""
    if not any(v.const_value is not None and v.const_value.dtype in LOW_PRECISION
               for v in model.graph.initializers.values()):
        return []
    done = []
    for name, value in list(model.graph.initializers.items()):
        tensor, uses = value.const_value, value.uses()
        if (tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2 or not uses
                or any(node.op_type != "Gather" or index != 0 or node.attributes.get_int("axis", 0) != 0
                       for node, index in uses)):
            continue
        block = table_block(tensor.shape[1])
        if block is None:
            continue
        codes, scales, zeros = quantize_rows(tensor.numpy(), block)
        inputs = [initializer(model, f"{name}.uint8", codes), initializer(model, f"{name}.scale", scales),
                  initializer(model, f"{name}.zero_point", zeros)]
        for node, _ in uses:
            gather = ir.node("GatherBlockQuantized", [inputs[0], node.inputs[1], *inputs[1:]], domain="com.microsoft",
                             attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 8},
                             name=node.name)
            model.graph.insert_before(node, gather)
            ir.convenience.replace_all_uses_with(node.outputs[0], gather.outputs[0])
            gather.outputs[0].name, gather.outputs[0].shape, gather.outputs[0].type = (
                node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type)
            model.graph.remove(node, safe=True)
        model.graph.initializers.pop(name)
        done.append(name)
    if done:
        model.opset_imports.setdefault("com.microsoft", 1)
    return done
