"""New constants and nodes in a graph, and constants stored in half precision.

A quantized weight's scales are stored in fp16 (SmolLM2's int8: 8.5 bits per weight, not 9): an fp16
initializer and a Cast to fp32 in front of the DequantizeLinear. The onnxruntime target's compile stores them
as fp32 in its MatMulNBits (graph.matmul_nbits); OpenVINO's conversion folds the Cast, and the openvino target
stores the scales back in fp16 (store_half_constants). The portable file holds half the bytes. The
values are fp16-exact (the quantizer rounds the scales first), so the fp32 the runtimes compute with is the value
the codes were rounded against.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

HALF_SMALLEST = float(np.finfo(np.float16).smallest_subnormal)


def initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer under a name not yet used in the graph."""
    taken = model.graph.initializers
    unique, suffix = name, 1
    while unique in taken:
        unique, suffix = f"{name}_{suffix}", suffix + 1
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    model.graph.register_initializer(value)
    return value


def insert_node(before: ir.Node, op: str, operands: list, name: str, attrs: dict | None = None, *, domain: str = "",
                outputs: int = 1, dtype: ir.DataType | None = None) -> list[ir.Value]:
    """A node named `name` inserted in front of `before`, its outputs named after it (and typed `dtype` where
    given); its outputs."""
    node = ir.node(op, operands, attrs or {}, domain=domain, num_outputs=outputs, name=name)
    before.graph.insert_before(before, node)
    for index, value in enumerate(node.outputs):
        value.name = name if outputs == 1 else f"{name}_{index}"
        if dtype is not None:
            value.dtype = dtype
    return list(node.outputs)


def half_exact(array: np.ndarray) -> np.ndarray:
    """Positive fp32 values (scales) rounded to the nearest fp16 value, at least fp16's smallest: what
    half_constant stores."""
    return np.maximum(array, HALF_SMALLEST).astype(np.float16).astype(np.float32)


def half_constant(model: ir.Model, name: str, array: np.ndarray) -> ir.Node:
    """The Cast to fp32 of a new fp16 initializer holding `array` (fp16-exact: see half_exact). The caller
    inserts the node; its output is the fp32 constant."""
    half = array.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), array):
        raise ValueError(f"'{name}' is not fp16-exact: round it with half_exact first")
    return ir.node("Cast", [initializer(model, name, half)], attributes={"to": ir.DataType.FLOAT}, name=f"{name}.cast")


def stored_half(value: ir.Value) -> ir.Value | None:
    """The fp16 initializer a half_constant output is cast from; None for any other value."""
    cast = value.producer()
    if (cast is None or cast.op_type != "Cast" or cast.attributes.get_int("to") != ir.DataType.FLOAT
            or cast.inputs[0].const_value is None or cast.inputs[0].dtype != ir.DataType.FLOAT16):
        return None
    return cast.inputs[0]


def is_half_cast(node: ir.Node) -> bool:
    """Whether the node is the Cast of a half_constant."""
    return node.op_type == "Cast" and stored_half(node.outputs[0]) is not None


def stored_initializer(value: ir.Value) -> ir.Value | None:
    """The initializer a constant is stored in: itself, or the fp16 one a half_constant casts; None if computed."""
    return value if value.const_value is not None else stored_half(value)


def constant_array(value: ir.Value) -> np.ndarray | None:
    """The value of an initializer or of a half_constant (as fp32); None for anything computed."""
    if value.const_value is not None:
        return value.const_value.numpy()
    half = stored_half(value)
    return None if half is None else half.const_value.numpy().astype(np.float32)


def fold_half_constants(model: ir.Model) -> int:
    """Every half_constant back to an fp32 initializer (for a runtime that wants its scales as plain constants:
    TensorRT); returns how many."""
    folded = 0
    for node in list(model.graph):
        if is_half_cast(node):
            half = node.inputs[0]
            plain = initializer(model, f"{half.name}.fp32", half.const_value.numpy().astype(np.float32))
            node.outputs[0].replace_all_uses_with(plain)
            model.graph.remove(node, safe=True)
            if not half.uses():  # the fp32 copy takes its name
                model.graph.initializers.pop(half.name)
                model.graph.initializers.pop(plain.name)
                plain.name = plain.const_value.name = half.name
                model.graph.register_initializer(plain)
            folded += 1
    return folded


def replace_node(model: ir.Model, old: ir.Node, new: ir.Node) -> None:
    """`new` in place of the one-output node `old`: its readers, its output's name, shape and type."""
    model.graph.insert_before(old, new)
    old.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    new.outputs[0].name, new.outputs[0].shape, new.outputs[0].type = (
        old.outputs[0].name, old.outputs[0].shape, old.outputs[0].type)
    model.graph.remove(old, safe=True)


def remove_with_constant_inputs(model: ir.Model, node: ir.Node) -> None:
    """Remove a node nothing reads now, and the constants only it read (initializers, the Cast of fp16 scales)."""
    inputs = list(node.inputs)
    model.graph.remove(node, safe=True)
    for value in inputs:
        if value is None or value.uses():
            continue
        if value.producer() is not None:
            remove_with_constant_inputs(model, value.producer())
        else:
            model.graph.initializers.pop(value.name)
