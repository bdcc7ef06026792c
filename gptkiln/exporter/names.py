"""Give every weight initializer of the exported graph the name of the parameter it came from.

torch.onnx's optimizer folds `weight.T` (every nn.Linear) into new initializers named `val_N`,
so a manifest, a quantization report or a readiness message would name nothing a user knows.
Each initializer is matched by content to the model's parameters and buffers: the same tensor
takes the parameter's name (`model.layers.0.self_attn.q_proj.weight`), a transposed copy the
name with `.T` (`...q_proj.weight.T`). Names are the model's own, without the KV-cache
wrapper's prefix.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import torch

TRANSPOSED = ".T"


def _key(array: np.ndarray) -> tuple:
    return array.dtype.str, array.shape, hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def _tensors(module: torch.nn.Module, prefix: str) -> dict[tuple, str]:
    """content key -> name, for every parameter and buffer (and the transpose of each matrix)."""
    names: dict[tuple, str] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=True), *module.named_buffers(remove_duplicate=True)]:
        array = tensor.detach().cpu().numpy()
        name = name.removeprefix(prefix)
        names.setdefault(_key(array), name)
        if array.ndim == 2:
            names.setdefault(_key(array.T), name + TRANSPOSED)
    return names


def restore_parameter_names(model: ir.Model, module: torch.nn.Module, prefix: str = "model.") -> int:
    """Rename the graph's initializers after the parameters they hold; returns how many were renamed."""
    known = _tensors(module, prefix)
    renamed = 0
    for value in list(model.graph.initializers.values()):
        if value.const_value is None or value.const_value.size < 2:
            continue
        name = known.get(_key(value.const_value.numpy()))
        if name is None or name == value.name:
            continue
        if name in model.graph.initializers:  # two initializers with one content: keep the first name
            continue
        value.name = name
        renamed += 1
    return renamed
