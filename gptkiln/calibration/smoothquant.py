"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, per input channel.

For an activation X that feeds only linear layers, s_j = max|X_j|^α / max|W_j,:|^(1-α);
X is divided by s (folded into the LayerNormalization scale and bias, or the RMSNorm
weight Mul, that produces X) and each consuming weight's row j multiplied by s. The fp32
function is unchanged and the graph keeps its standard ops; X's range per channel evens
out, so a per-tensor int8 scale wastes less of its range on a few channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gptkiln.calibration.layers import LinearLayer, replace_weight
from gptkiln.graph.initializers import initializer

MIN_SCALE = 1e-5


@dataclass
class Smoothed:
    activation: str
    layers: list[str]
    absmax_before: float  # per-tensor max |x|
    absmax_after: float
    outlier_ratio_before: float  # largest channel max over the median channel max
    outlier_ratio_after: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def smooth(model: ir.Model, layers: list[LinearLayer], absmax: dict[str, np.ndarray], alpha: float) -> list[Smoothed]:
    """Apply SmoothQuant in place to every activation whose producer can absorb the scale."""
    consumers: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        consumers.setdefault(layer.activation.name, []).append(layer)
    report = []
    for name, group in consumers.items():
        activation = group[0].activation
        if name not in absmax or not _only_feeds(activation, group):
            continue
        fold = _foldable_producer(activation)
        if fold is None:
            continue
        x_max = np.maximum(absmax[name].astype(np.float64), MIN_SCALE)
        w_max = np.max([np.abs(layer.weight()).max(axis=1) for layer in group], axis=0)
        scales = np.maximum(x_max**alpha / np.maximum(w_max, MIN_SCALE) ** (1 - alpha), MIN_SCALE)
        for value_index in fold:
            _divide_input(model, activation.producer(), value_index, scales)
        for layer in group:
            replace_weight(model, layer, layer.weight() * scales[:, None].astype(np.float32))
        after = x_max / scales
        report.append(Smoothed(name, [layer.name for layer in group], float(x_max.max()), float(after.max()),
                               float(x_max.max() / np.median(x_max)), float(after.max() / np.median(after))))
        absmax[name] = after.astype(np.float32)
    return report


def _only_feeds(activation: ir.Value, group: list[LinearLayer]) -> bool:
    nodes = {id(layer.node) for layer in group}
    return all(id(node) in nodes and index == 0 for node, index in activation.uses()) and not activation.is_graph_output()


def _foldable_producer(activation: ir.Value) -> list[int] | None:
    """The producer's inputs that carry a per-channel factor of X, or None if it has none:
    LayerNormalization's scale and bias, or the constant of Mul(x, weight) (RMSNorm's last op)."""
    node = activation.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    channels = activation.shape[-1] if activation.shape is not None else None
    if node.op_type == "LayerNormalization" and node.attributes.get_int("axis", -1) == -1:
        indices = [i for i in (1, 2) if i < len(node.inputs) and node.inputs[i] is not None]
        if all(node.inputs[i].const_value is not None for i in indices):
            return indices
    if node.op_type == "Mul":
        for index, value in enumerate(node.inputs):
            if value.const_value is not None and value.const_value.shape == ir.Shape([channels]):
                return [index]
    return None


def _divide_input(model: ir.Model, node: ir.Node, index: int, scales: np.ndarray) -> None:
    """Replace the node's constant input by a private copy divided by the scales."""
    value = node.inputs[index]
    divided = (value.const_value.numpy().astype(np.float64) / scales).astype(value.const_value.numpy().dtype)
    node.replace_input_with(index, initializer(model, f"{value.name}.smoothed", divided))
