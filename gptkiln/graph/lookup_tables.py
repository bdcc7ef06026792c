"""The lookup tables of a quantized build: the initializers only Gather reads (the token and position
embeddings; a tied lm_head reads its own quantized copy).

The quantize stage stores each one in standard ONNX (opset 21), asymmetric in blocks of its row, in 8 bits or,
in int4 builds, 4:

    Gather(table_f32, ids)  ==>  Gather(DequantizeLinear(codes, scales, zero_points, axis=1, block_size), ids)

so the fallback's trials are scored with the tables the engines hold (SmolLM2's 49,152 x 576 embedding: 113 MB
in f32, 30 MB in 8 bits, 16 MB in 4). A decode step gathers one row, so those bytes are size, not time. Per target:
- ONNX Runtime would dequantize the whole table at every step (62 ms for SmolLM2's): its compile lowers the
  pair to com.microsoft GatherBlockQuantized on the same codes (uint8, two a byte in 4 bits);
- OpenVINO gathers from the DequantizeLinear's compressed constant as it is;
- TensorRT quantizes weights in front of a MatMul only: its compile folds the table back to float.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from gptkiln.graph.initializers import initializer

MAX_BLOCK = 128  # GatherBlockQuantized takes a power-of-two block of at least 16
MIN_OPSET = 21  # blocked DequantizeLinear and 4-bit tensors
CODE_TYPES = {4: ml_dtypes.uint4, 8: np.uint8}


def table_block(row: int) -> int | None:
    """The largest power-of-two block of at most MAX_BLOCK that divides a row of `row` values."""
    block = MAX_BLOCK
    while block >= 16 and row % block:
        block //= 2
    return block if block >= 16 else None


def quantize_rows(table: np.ndarray, block: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [V, D], scales f32 [V, D/block], zero points uint8 [V, D/block]): asymmetric per block, codes
    and zero points in 0 .. 2**bits - 1, one a byte."""
    rows, width = table.shape
    top = 2**bits - 1
    blocks = table.reshape(rows, width // block, block)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)  # 0 exact: padding rows stay 0
    scale = (np.maximum(high - low, 1e-12) / top).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, top).astype(np.uint8)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    return codes.reshape(rows, width), scale, zero


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [V, n] (one a byte) as [V, ceil(n / 2)] bytes, low nibble first (a zero nibble pads an odd n)."""
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((len(codes), 1), np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _lookup_only(value: ir.Value) -> bool:
    return bool(value.uses()) and all(node.op_type == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0
                                      for node, index in value.uses())


def quantize_lookup_tables(model: ir.Model, bits: int) -> list[str]:
    """The quantize stage: every f32 table only Gather (axis 0) reads, as a blocked DequantizeLinear in `bits`;
    returns their names. A graph below opset 21 keeps its tables in float."""
    if model.opset_imports.get("", 0) < MIN_OPSET:
        return []
    common.RemoveUnusedNodesPass()(model)  # a tied lm_head's Transpose, left behind by its quantized copy
    done = []
    for name, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2 or not _lookup_only(value):
            continue
        block = table_block(tensor.shape[1])
        if block is None:
            continue
        codes, scales, zeros = quantize_rows(tensor.numpy(), block, bits)
        node = ir.node("DequantizeLinear", [initializer(model, f"{name}.uint{bits}", codes.astype(CODE_TYPES[bits])),
                                            initializer(model, f"{name}.scale", scales),
                                            initializer(model, f"{name}.zero_point", zeros.astype(CODE_TYPES[bits]))],
                       attributes={"axis": 1, "block_size": block}, name=f"{name}.dequantize")
        model.graph.insert_before(next(iter(model.graph)), node)  # constant inputs only: first is always in order
        for gather, _ in value.uses():
            gather.replace_input_with(0, node.outputs[0])
        model.graph.initializers.pop(name)
        done.append(name)
    return done


def _quantized_tables(model: ir.Model):
    """(DequantizeLinear node, its Gathers) for each table quantize_lookup_tables wrote."""
    for node in list(model.graph):
        if (node.op_type == "DequantizeLinear" and len(node.inputs) == 3 and node.attributes.get_int("axis", 0) == 1
                and node.attributes.get_int("block_size", 0) and all(v.const_value is not None for v in node.inputs)
                and _lookup_only(node.outputs[0])):
            yield node, [gather for gather, _ in node.outputs[0].uses()]


def gather_block_quantized(model: ir.Model) -> list[str]:
    """ONNX Runtime: each quantized table's Gather(DequantizeLinear(...)) as com.microsoft GatherBlockQuantized on
    the same codes; returns the tables' names."""
    done = []
    for dequantize, gathers in _quantized_tables(model):
        codes, scales, zeros = (v.const_value.numpy() for v in dequantize.inputs)
        bits = 4 if codes.dtype == CODE_TYPES[4] else 8
        codes, zeros = codes.astype(np.uint8), zeros.astype(np.uint8)
        if bits == 4:
            codes, zeros = pack_nibbles(codes), pack_nibbles(zeros)
        name = dequantize.inputs[0].name
        inputs = [initializer(model, f"{name}.packed", codes), dequantize.inputs[1],
                  initializer(model, f"{name}.zero_point.packed", zeros)]
        for gather in gathers:
            lowered = ir.node("GatherBlockQuantized", [inputs[0], gather.inputs[1], *inputs[1:]], domain="com.microsoft",
                              attributes={"gather_axis": 0, "quantize_axis": 1, "bits": bits,
                                          "block_size": dequantize.attributes.get_int("block_size")}, name=gather.name)
            _replace(model, gather, lowered)
        replaced = (dequantize.inputs[0], dequantize.inputs[2])
        model.graph.remove(dequantize, safe=True)
        for value in replaced:
            model.graph.initializers.pop(value.name)
        done.append(name)
    if done:
        model.opset_imports.setdefault("com.microsoft", 1)
    return done


def dequantize_lookup_tables(model: ir.Model) -> list[str]:
    """TensorRT: each quantized table back in float (the values its codes stand for); returns the tables' names."""
    done = []
    for dequantize, _ in _quantized_tables(model):
        codes, scales, zeros = (v.const_value.numpy().astype(np.float32) for v in dequantize.inputs)
        block = dequantize.attributes.get_int("block_size")
        table = (codes - np.repeat(zeros, block, axis=1)) * np.repeat(scales, block, axis=1)
        name = dequantize.inputs[0].name
        ir.convenience.replace_all_uses_with(dequantize.outputs[0], initializer(model, f"{name}.float", table))
        inputs = list(dequantize.inputs)
        model.graph.remove(dequantize, safe=True)
        for value in inputs:
            if not value.uses():
                model.graph.initializers.pop(value.name)
        done.append(name)
    return done


def _replace(model: ir.Model, old: ir.Node, new: ir.Node) -> None:
    model.graph.insert_before(old, new)
    old.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    new.outputs[0].name, new.outputs[0].shape, new.outputs[0].type = (
        old.outputs[0].name, old.outputs[0].shape, old.outputs[0].type)
    model.graph.remove(old, safe=True)
