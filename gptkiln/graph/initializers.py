"""New constants in a graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


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
