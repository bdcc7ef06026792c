"""The lookup tables of a quantized build: the initializers only Gather reads (the token and position
embeddings; a tied lm_head reads its own quantized copy).

The quantize stage stores each one in standard ONNX (opset 21), asymmetric in blocks of its row, in 8 bits or,
in int4 builds, 4:

    Gather(table_f32, ids)  ==>  Gather(DequantizeLinear(codes, scales, zero_points, axis=1, block_size), ids)

A table a weight-only lm_head is tied to holds the lm_head's codes instead (calibration.weight_only), and the same
DequantizeLinear feeds the lm_head's Transpose -> MatMul: one copy of the codes (SmolLM2's int8: 30 MB less).

so the fallback's trials are scored with the tables the engines hold (SmolLM2's 49,152 x 576 embedding: 113 MB
in f32, 30 MB in 8 bits, 16 MB in 4). A decode step gathers one row, so those bytes are size, not time. Per target:
- ONNX Runtime would dequantize the whole table at every step (62 ms for SmolLM2's): its compile lowers the
  pair to com.microsoft GatherBlockQuantized on the same codes (uint8, two a byte in 4 bits), and a tied lm_head
  to MatMulNBits reading that same initializer (its own fusion leaves a DequantizeLinear with two readers alone);
- OpenVINO gathers from the DequantizeLinear's compressed constant as it is;
- TensorRT quantizes weights in front of a MatMul only: its compile folds the table back to float (a tied
  lm_head keeps a transposed copy of the codes).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from gptkiln.graph.initializers import (constant_array, half_constant, half_exact, initializer, remove_with_constant_inputs,
                                       replace_node, stored_initializer)
from gptkiln.graph.matmul_nbits import MATMUL_NBITS_ACCURACY, nbits_layout, pack_nibbles, unsigned_codes

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
    """(codes uint8 [V, D], scales f32 [V, D/block] (fp16-exact), zero points uint8 [V, D/block]): asymmetric per
    block, codes and zero points in 0 .. 2**bits - 1, one a byte."""
    rows, width = table.shape
    top = 2**bits - 1
    blocks = table.reshape(rows, width // block, block)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)  # 0 exact: padding rows stay 0
    scale = half_exact((high - low) / top)
    zero = np.clip(np.round(-low / scale), 0, top).astype(np.uint8)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    return codes.reshape(rows, width), scale, zero


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
        scale = half_constant(model, f"{name}.scale", scales)
        node = ir.node("DequantizeLinear", [initializer(model, f"{name}.uint{bits}", codes.astype(CODE_TYPES[bits])),
                                            scale.outputs[0],
                                            initializer(model, f"{name}.zero_point", zeros.astype(CODE_TYPES[bits]))],
                       attributes={"axis": 1, "block_size": block}, name=f"{name}.dequantize")
        model.graph.insert_before(next(iter(model.graph)), [scale, node])  # constant inputs only: first is in order
        for gather, _ in value.uses():
            gather.replace_input_with(0, node.outputs[0])
        model.graph.initializers.pop(name)
        done.append(name)
    return done


def _table_readers(value: ir.Value) -> tuple[list[ir.Node], list[ir.Node]] | None:
    """(its Gathers, the Transposes by which a tied lm_head reads it) of a table; None if anything else reads it."""
    gathers, heads = [], []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0:
            gathers.append(node)
        elif (node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]
              and all(user.op_type == "MatMul" and i == 1 for user, i in node.outputs[0].uses())):
            heads.append(node)
        else:
            return None
    return (gathers, heads) if gathers else None


def _quantized_tables(model: ir.Model):
    """(DequantizeLinear node, its Gathers, its lm_head Transposes) for each quantized table: quantize_lookup_tables'
    and a tied lm_head's (calibration.weight_only)."""
    for node in list(model.graph):
        if (node.op_type == "DequantizeLinear" and len(node.inputs) in (2, 3) and node.attributes.get_int("axis", 0) == 1
                and node.attributes.get_int("block_size", 0)
                and all(constant_array(v) is not None for v in node.inputs)):
            readers = _table_readers(node.outputs[0])
            if readers is not None:
                yield node, *readers


def gather_block_quantized(model: ir.Model) -> list[str]:
    """ONNX Runtime: each quantized table's Gather(DequantizeLinear(...)) as com.microsoft GatherBlockQuantized on
    the same codes, and a tied lm_head's MatMul(x, Transpose(...)) as MatMulNBits on them too; returns the tables'
    names."""
    done = []
    for dequantize, gathers, heads in _quantized_tables(model):
        codes, scales, zeros, bits = unsigned_codes(dequantize)
        block = dequantize.attributes.get_int("block_size")
        name = dequantize.inputs[0].name
        if heads:
            _lower_tied(model, name, codes, scales, zeros, bits, block, gathers, heads)
        else:
            if bits == 4:
                codes, zeros = pack_nibbles(codes), pack_nibbles(zeros)
            inputs = [initializer(model, f"{name}.packed", codes), dequantize.inputs[1],
                      initializer(model, f"{name}.zero_point.packed", zeros)]
            for gather in gathers:
                lowered = ir.node("GatherBlockQuantized", [inputs[0], gather.inputs[1], *inputs[1:]],
                                  domain="com.microsoft", attributes={"gather_axis": 0, "quantize_axis": 1, "bits": bits,
                                                                      "block_size": block}, name=gather.name)
                replace_node(model, gather, lowered)
        remove_with_constant_inputs(model, dequantize)
        done.append(name)
    if done:
        model.opset_imports.setdefault("com.microsoft", 1)
    return done


def _lower_tied(model: ir.Model, name: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
                block: int, gathers: list[ir.Node], heads: list[ir.Node]) -> None:
    """One initializer in MatMulNBits' layout [V, K/block, block bytes (half in 4 bits)] for the lm_head (N = V)
    and for GatherBlockQuantized (rank 3, quantized along the last axis, a Reshape back to [..., K])."""
    vocab, width = codes.shape
    blocks, head_zeros = nbits_layout(codes, zeros, bits, block)
    shared = initializer(model, f"{name}.blocks", blocks)
    default_zeros = head_zeros is None  # both ops' default for uint8 codes: a symmetric grid
    # MatMulNBits wants fp32 scales [V, K/block] as an initializer (a Cast in front reads as zeros when graph
    # optimisations are off); GatherBlockQuantized rank 3: a Reshape of the same initializer, folded at load
    head_inputs = [initializer(model, f"{name}.scale.rows", scales)]
    blocks_shape = initializer(model, f"{name}.scale.blocks_shape", np.array([vocab, width // block, 1], np.int64))
    scale_blocks = ir.node("Reshape", [head_inputs[0], blocks_shape], name=f"{name}.scale.blocks")
    model.graph.insert_before(gathers[0], scale_blocks)
    gather_inputs = [scale_blocks.outputs[0]]
    if not default_zeros:
        gather_inputs.append(initializer(model, f"{name}.zero_point.blocks", zeros[..., None]))  # low nibble in 4 bits
    for gather in gathers:
        ids = gather.inputs[1]
        if ids.shape is None:
            raise ValueError(f"the ids of '{gather.name}' have no known rank")
        lowered = ir.node("GatherBlockQuantized", [shared, ids, *gather_inputs], domain="com.microsoft",
                          attributes={"gather_axis": 0, "quantize_axis": 2, "bits": bits, "block_size": block})
        shape = initializer(model, f"{gather.name}.rows", np.array([0] * len(ids.shape) + [width], np.int64))
        model.graph.insert_before(gather, lowered)
        replace_node(model, gather, ir.node("Reshape", [lowered.outputs[0], shape], name=gather.name))
    if not default_zeros:
        head_inputs.append(initializer(model, f"{name}.zero_point.rows", head_zeros))
    for transpose in heads:
        for matmul, _ in list(transpose.outputs[0].uses()):
            replace_node(model, matmul, ir.node(
                "MatMulNBits", [matmul.inputs[0], shared, *head_inputs], domain="com.microsoft", name=matmul.name,
                attributes={"K": width, "N": vocab, "bits": bits, "block_size": block,
                            "accuracy_level": MATMUL_NBITS_ACCURACY}))
        model.graph.remove(transpose, safe=True)


def dequantize_lookup_tables(model: ir.Model) -> list[str]:
    """TensorRT: each quantized table back in float (the values its codes stand for) for its Gathers; a tied lm_head
    keeps the codes, transposed to the [K, V] weight a DequantizeLinear -> MatMul takes. Returns the tables' names."""
    done = []
    for dequantize, _, heads in _quantized_tables(model):
        name, block = dequantize.inputs[0].name, dequantize.attributes.get_int("block_size")
        arrays = [constant_array(v) for v in dequantize.inputs]  # fp16 scales as fp32
        names = [stored_initializer(v).name for v in dequantize.inputs]
        for transpose in heads:
            head = ir.node("DequantizeLinear", [initializer(model, f"{n}.T", np.ascontiguousarray(a.T)) for n, a in
                                                zip(names, arrays)],
                           attributes={"axis": 0, "block_size": block}, name=f"{name}.lm_head")
            model.graph.insert_before(transpose, head)
            transpose.outputs[0].replace_all_uses_with(head.outputs[0])
            model.graph.remove(transpose, safe=True)
        codes, scales, *zeros = (a.astype(np.float32) for a in arrays)
        offsets = np.repeat(zeros[0], block, axis=1) if zeros else 0.0
        table = (codes - offsets) * np.repeat(scales, block, axis=1)
        ir.convenience.replace_all_uses_with(dequantize.outputs[0], initializer(model, f"{name}.float", table))
        remove_with_constant_inputs(model, dequantize)
        done.append(name)
    return done
