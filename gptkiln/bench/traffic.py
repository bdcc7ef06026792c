"""Bytes one decode step must read: every weight once, plus the KV cache at the current length.

An embedding table that is only gathered from is not counted (a step reads one row of it);
the same table read by a MatMul (a tied lm_head) is. Constants smaller than 4 KiB are noise
and are counted like any other.
"""

from __future__ import annotations

import math
from pathlib import Path

from gptkiln.models.spec import DecoderSpec

# ops that only decompress a weight on its way to the op that reads it (OpenVINO's compressed weights)
_DECOMPRESSION = {"Convert", "Subtract", "Multiply", "Reshape", "Unsqueeze", "Transpose"}


def kv_cache_bytes(spec: DecoderSpec, batch: int, length: int, element_bytes: int = 4) -> int:
    return 2 * spec.num_layers * batch * spec.num_kv_heads * length * spec.head_dim * element_bytes


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the initializers a decode step reads (sizes from the graph; external data is not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, index))
    total = 0
    for tensor in graph.initializer:
        if readers.get(tensor.name) and all(op == "Gather" and index == 0 for op, index in readers[tensor.name]):
            continue
        total += math.prod(tensor.dims) * _onnx_element_bits(tensor.data_type) // 8
    return total


def _onnx_element_bits(data_type: int) -> int:
    import onnx

    if data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
        return 4
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize * 8


def openvino_weight_bytes(xml: Path) -> int:
    """Bytes of the IR's constants a decode step reads (a constant decompressed into a Gather's table is skipped)."""
    import openvino as ov

    total = 0
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() != "Constant" or _only_gathered(op.output(0)):
            continue
        total += math.prod(op.get_output_shape(0)) * op.get_output_element_type(0).bitwidth // 8
    return total


def _only_gathered(output) -> bool:
    consumers = list(output.get_target_inputs())
    if not consumers:
        return False
    for consumer in consumers:
        node = consumer.get_node()
        kind = node.get_type_name()
        if kind == "Gather" and consumer.get_index() == 0:
            continue
        if kind in _DECOMPRESSION and _only_gathered(node.output(0)):
            continue
        return False
    return True


def torch_weight_bytes(model) -> int:
    """Bytes of a PyTorch model's parameters a decode step reads (an embedding counts when an output layer shares it)."""
    import torch

    output = model.get_output_embeddings()
    tied = output.weight.data_ptr() if output is not None else None
    gathered = {module.weight.data_ptr() for module in model.modules()
                if isinstance(module, torch.nn.Embedding) and module.weight.data_ptr() != tied}
    unique = {p.data_ptr(): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for ptr, p in unique.items() if ptr not in gathered)
