"""int8 graphs in standard ONNX ops.

W8A8 (static): every linear layer's activation goes through QuantizeLinear → DequantizeLinear
with a calibrated per-tensor scale, its weight is int8 per output channel behind a
DequantizeLinear. Both are symmetric (zero point 0), the form TensorRT requires and ONNX
Runtime and OpenVINO also fuse into int8 kernels.

int8-dynamic: each activation row (token) gets its own scale at run time, max |x| / 127, and
is stored as uint8 around a fixed zero point of 128; MatMulInteger (uint8 x int8, the fast
kernel on x86) then Cast and the row and weight scales. ONNX's DynamicQuantizeLinear would
give one scale per tensor, so one batch row would change another's tokens (a padded batch
disagreed with the same prompts run alone on 3-4% of tokens on the reference model).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gptkiln.calibration.layers import LinearLayer
from gptkiln.graph.initializers import initializer
from gptkiln.calibration.statistics import HIST_BINS, ActivationStats
from gptkiln.config import ActivationCalibration

INT8_MAX = 127
ROW_ZERO_POINT = 128  # int8-dynamic: symmetric codes stored as uint8
ENTROPY_LEVELS = 128  # quantized levels of |x| (int8 symmetric)


def weight_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: (codes [K, N] int8, scales [N] float32)."""
    scales = np.maximum(np.abs(weight).max(axis=0), 1e-12) / INT8_MAX
    codes = np.clip(np.round(weight / scales), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scales.astype(np.float32)


def activation_threshold(stats: ActivationStats, name: str, method: ActivationCalibration, percentile: float) -> float:
    """The |x| that maps to int8 127."""
    top = stats.tensor_absmax(name)
    if method is ActivationCalibration.MINMAX:
        return top
    hist = stats.histograms[name].astype(np.float64)
    if method is ActivationCalibration.PERCENTILE:
        index = int(np.searchsorted(np.cumsum(hist) / hist.sum(), percentile / 100.0))
        return top * min(index + 1, HIST_BINS) / HIST_BINS
    return top * _entropy_bins(hist) / HIST_BINS


def _entropy_bins(hist: np.ndarray) -> int:
    """TensorRT's entropy calibration: the clip bin count whose 128-level quantized distribution
    is closest (KL divergence) to the clipped reference distribution (tail folded into its last bin)."""
    total = np.concatenate([[0.0], np.cumsum(hist)])
    best, best_kl = len(hist), np.inf
    for bins in range(ENTROPY_LEVELS, len(hist) + 1):
        merged = bins // ENTROPY_LEVELS
        edges = np.arange(ENTROPY_LEVELS + 1) * merged
        edges[-1] = bins  # the remainder joins the last level
        reference = hist[:bins].copy()
        reference[-1] += total[-1] - total[bins]
        nonzero = reference > 0
        nonzero_total = np.concatenate([[0], np.cumsum(nonzero)])
        level_mass = (total[edges[1:]] - total[edges[:-1]]) / np.maximum(nonzero_total[edges[1:]] - nonzero_total[edges[:-1]], 1)
        level = np.minimum(np.arange(bins) // merged, ENTROPY_LEVELS - 1)
        candidate = np.where(nonzero, level_mass[level], 0.0)
        p = reference[nonzero] / reference.sum()
        q = np.maximum(candidate[nonzero] / max(candidate.sum(), 1e-12), 1e-12)
        kl = float(np.sum(p * np.log(p / q)))
        if kl < best_kl:
            best, best_kl = bins, kl
    return best


def quantize_w8a8(model: ir.Model, layers: list[LinearLayer], thresholds: dict[str, float],
                  floating: dict[str, np.ndarray] | None = None) -> None:
    """`thresholds`: each activation's |x| at int8 127. `floating`: an activation's input channels kept out of
    int8 (LLM.int8()'s decomposition): Gather(x, channels) @ W[channels] in float, added to the int8 product of
    x with those channels zeroed (Mul by a 0/1 mask) and W without their rows. Not for a graph output's layer."""
    floating = floating or {}
    dequantized: dict[str, ir.Value] = {}
    gathered: dict[str, ir.Value] = {}
    for layer in layers:
        name = layer.activation.name
        channels = floating.get(name, np.zeros(0, np.int64))
        if len(channels) and layer.node.outputs[0].is_graph_output():
            raise ValueError(f"{layer.name}: a layer whose output is a graph output cannot keep channels in float")
        if name not in dequantized:
            nodes, source = [], layer.activation
            if len(channels):
                mask = np.ones(layer.weight().shape[0], np.float32)
                mask[channels] = 0
                masked = ir.node("Mul", [source, initializer(model, f"{name}.int8_channels", mask)])
                kept = ir.node("Gather", [source, initializer(model, f"{name}.float_channels", channels.astype(np.int64))],
                               attributes={"axis": -1})
                nodes, source, gathered[name] = [masked, kept], masked.outputs[0], kept.outputs[0]
            scale = initializer(model, f"{name}.scale", np.asarray(max(thresholds[name], 1e-12) / INT8_MAX, np.float32))
            zero = initializer(model, f"{name}.zero_point", np.asarray(0, np.int8))
            quantize = ir.node("QuantizeLinear", [source, scale, zero])
            dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero])
            _insert_after_producer(model, layer.activation, [*nodes, quantize, dequantize])
            dequantized[name] = dequantize.outputs[0]
        layer.node.replace_input_with(0, dequantized[name])
        weight = layer.weight()
        if len(channels):
            _add_float_part(model, layer, gathered[name], weight[channels])
            weight = weight.copy()
            weight[channels] = 0
        codes, scales = weight_int8(weight)
        weight = ir.node("DequantizeLinear", [initializer(model, f"{layer.name}.int8", codes),
                                              initializer(model, f"{layer.name}.scale", scales),
                                              initializer(model, f"{layer.name}.zero_point", np.zeros_like(scales, np.int8))],
                         attributes={"axis": 1})
        model.graph.insert_before(layer.node, weight)
        layer.node.replace_input_with(1, weight.outputs[0])


def _add_float_part(model: ir.Model, layer: LinearLayer, x_float: ir.Value, rows: np.ndarray) -> None:
    """layer output + x_float @ rows, for every reader of the layer's output."""
    output = layer.node.outputs[0]
    product = ir.node("MatMul", [x_float, initializer(model, f"{layer.name}.float_rows", rows.astype(np.float32))])
    total = ir.node("Add", [output, product.outputs[0]])
    for reader, index in list(output.uses()):
        if reader is not total:
            reader.replace_input_with(index, total.outputs[0])
    model.graph.insert_after(layer.node, [product, total])


def quantize_dynamic(model: ir.Model, layers: list[LinearLayer]) -> None:
    codes_by_activation: dict[str, tuple[ir.Value, ir.Value]] = {}
    offset = initializer(model, "dynamic_quant.zero_point", np.asarray(ROW_ZERO_POINT, np.uint8))
    for layer in layers:
        name = layer.activation.name
        if name not in codes_by_activation:
            nodes, codes_by_activation[name] = _per_row_uint8(model, layer.activation)
            _insert_after_producer(model, layer.activation, nodes)
        x_codes, x_scale = codes_by_activation[name]
        codes, scales = weight_int8(layer.weight())
        matmul = ir.node("MatMulInteger", [x_codes, initializer(model, f"{layer.name}.int8", codes), offset])
        as_float = ir.node("Cast", matmul.outputs, attributes={"to": ir.DataType.FLOAT})
        row_scaled = ir.node("Mul", [as_float.outputs[0], x_scale])
        output = ir.node("Mul", [row_scaled.outputs[0], initializer(model, f"{layer.name}.scale", scales)])
        ir.convenience.replace_nodes_and_values(model.graph, layer.node, [layer.node],
                                                [matmul, as_float, row_scaled, output], layer.node.outputs, output.outputs)
        layer.node = matmul


def _per_row_uint8(model: ir.Model, x: ir.Value) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value]]:
    """x [..., K] -> (codes uint8 = round(x / s) + 128, s [..., 1] = max |x| / 127 of each row)."""
    absolute = ir.node("Abs", [x])
    row_max = ir.node("ReduceMax", [absolute.outputs[0], initializer(model, "dynamic_quant.axes", np.asarray([-1]))],
                      attributes={"keepdims": 1})
    raw = ir.node("Div", [row_max.outputs[0], initializer(model, "dynamic_quant.int8_max", np.asarray(INT8_MAX, np.float32))])
    scale = ir.node("Max", [raw.outputs[0], initializer(model, "dynamic_quant.min_scale", np.asarray(1e-12, np.float32))])
    scaled = ir.node("Div", [x, scale.outputs[0]])
    rounded = ir.node("Round", scaled.outputs)
    shifted = ir.node("Add", [rounded.outputs[0], initializer(model, "dynamic_quant.offset", np.asarray(ROW_ZERO_POINT, np.float32))])
    codes = ir.node("Cast", shifted.outputs, attributes={"to": ir.DataType.UINT8})
    return [absolute, row_max, raw, scale, scaled, rounded, shifted, codes], (codes.outputs[0], scale.outputs[0])


def _insert_after_producer(model: ir.Model, value: ir.Value, nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is None:  # a graph input
        model.graph.insert_before(next(iter(model.graph)), nodes)
    else:
        model.graph.insert_after(producer, nodes)
