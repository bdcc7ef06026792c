"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, per input channel.

For an activation X that feeds only linear layers, s_j = max|X_j|^α / max|W_j,:|^(1-α);
X is divided by s and each consuming weight's row j multiplied by s. The fp32 function is
unchanged and the graph keeps its standard ops; X's range per channel evens out, so an int8
scale wastes less of its range on a few channels. The division is folded into X's producer:

- a normalization: the scale (and bias) of LayerNormalization or RMSNormalization, or the
  constant of Mul(x, weight) (an RMSNorm written out), in front of q/k/v or gate/up;
- a linear layer, through ops that are linear per channel of it:
  - down_proj's input Mul(act(gate), up): up's output columns;
  - o_proj's input, the attention's output: v_proj's output columns, through the attention's
    reshapes, transposes, cache Concat and the repeat of K/V heads (Unsqueeze → Expand →
    Reshape). With grouped-query attention one value channel feeds a channel of every query
    head of its group, so those channels share one factor (the group's largest).
Llama-family models keep their largest activations (hundreds of times the rest, on a few
channels of a few tokens) at o_proj's and down_proj's inputs, which only the second kind reaches.

α = "auto" (W8A8) picks α per activation from a grid by the output error its layers would have with
static per-tensor int8 activations (threshold max |x / s|) and int8 per-output-channel weights, both from
the calibration Hessians H = Σ x xᵀ over n tokens: Σ tr(ΔWᵀ H' ΔW) for the weights plus the activations'
rounding noise, n · Δ² / 12 · ‖s W‖², with Δ the activation step and H' = H / (s sᵀ). A fixed α suits
one model's outliers: on SmolLM2 0.5 leaves the per-tensor range to o_proj's and down_proj's massive
activations, 0.9 moves them all into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gptkiln.calibration.layers import LinearLayer, replace_weight
from gptkiln.calibration.qdq import INT8_MAX, weight_int8
from gptkiln.config import AUTO_ALPHA, FLOAT_RATIO, FLOAT_SHARE
from gptkiln.graph.initializers import initializer
from gptkiln.models.spec import DecoderSpec
from gptkiln.progress import QUIET, Progress

MIN_SCALE = 1e-5
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # the grid of α = "auto"
# ops between v_proj's output and the attention's output that move whole channels without mixing them
_CHANNEL_MOVES = ("Reshape", "Transpose", "Unsqueeze", "Expand", "Concat")


@dataclass
class Smoothed:
    activation: str
    layers: list[str]
    folded_into: str  # the op or linear layer that absorbed 1/s
    absmax_before: float  # per-tensor max |x|
    absmax_after: float
    outlier_ratio_before: float  # largest channel max over the median channel max
    outlier_ratio_after: float
    alpha: float
    # α = "auto": the predicted output error of the site's layers at α = 0 and at the chosen α, relative to ‖X W‖²
    error_before: float | None = None
    error_after: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class _Fold:
    """Where 1/s goes: a producer node's constant inputs, or a linear layer's output columns.
    `channels` maps X's channels to the producer's (None: one to one)."""

    name: str
    node: ir.Node | None = None
    indices: tuple[int, ...] = ()
    layer: LinearLayer | None = None
    bias: ir.Node | None = None  # Add(layer output, constant bias)
    channels: np.ndarray | None = None


@dataclass
class FoldSite:
    """An activation whose channels can be rescaled: X / s absorbed by `fold`, s by the consumers' rows."""

    activation: str
    layers: list[LinearLayer]  # the linear layers that read X
    fold: _Fold

    def shared(self, per_channel: np.ndarray) -> np.ndarray:
        """Per-channel values made valid factors: where one producer channel feeds several X channels (GQA),
        each gets the largest of them."""
        if self.fold.channels is None:
            return per_channel
        source = np.zeros(int(self.fold.channels.max()) + 1)
        np.maximum.at(source, self.fold.channels, per_channel)
        return source[self.fold.channels]


def fold_sites(layers: list[LinearLayer], measured, spec: DecoderSpec | None = None) -> list[FoldSite]:
    """Every activation in `measured` (the names with statistics) that only linear layers read and whose
    producer can absorb a per-channel factor; normalizations first (a v_proj or up_proj is rescaled as a
    consumer, its rows, and as a producer, its columns). With a `spec` (its head counts) also through a
    v_proj into the attention's output."""
    consumers: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        consumers.setdefault(layer.activation.name, []).append(layer)
    by_output = {id(_output_of(layer)): layer for layer in layers}
    sites = []
    for name, group in consumers.items():
        activation = group[0].activation
        if name in measured and _only_feeds(activation, group):
            fold = _normalization_fold(activation) or _mlp_fold(activation, by_output) or (
                _attention_fold(activation, by_output, spec) if spec is not None else None)
            if fold is not None:
                sites.append(FoldSite(name, group, fold))
    return sorted(sites, key=lambda site: site.fold.layer is not None)


def apply_scales(model: ir.Model, site: FoldSite, scales: np.ndarray) -> None:
    """X / s into the producer, s into each consumer's rows: the fp32 function is unchanged."""
    _divide_producer(model, site.fold, scales)
    for layer in site.layers:
        replace_weight(model, layer, layer.weight() * scales[:, None].astype(np.float32))


def float_channels(x_max: np.ndarray) -> np.ndarray:
    """The channels of an activation W8A8 keeps in float (sorted): max |x_j| at least FLOAT_RATIO times the median
    channel's, the largest FLOAT_SHARE of the channels at most."""
    ratio = x_max / max(float(np.median(x_max)), 1e-12)
    largest = np.argsort(-ratio, kind="stable")[:max(1, int(len(x_max) * FLOAT_SHARE))]
    return np.sort(largest[ratio[largest] >= FLOAT_RATIO]).astype(np.int64)


def smooth(model: ir.Model, layers: list[LinearLayer], absmax: dict[str, np.ndarray], alpha: float | str,
           spec: DecoderSpec | None = None, hessians: dict[str, np.ndarray] | None = None, tokens: int = 0,
           progress: Progress = QUIET, floating: dict[str, np.ndarray] | None = None) -> list[Smoothed]:
    """Apply SmoothQuant in place to every activation whose producer can absorb the scale (fold_sites).
    α = "auto" needs the activations' `hessians` over `tokens` calibration tokens; `floating`: the channels
    W8A8 keeps in float, which the search leaves out of the int8 range and weights."""
    if alpha == AUTO_ALPHA and (hessians is None or tokens < 1):
        raise ValueError("SmoothQuant's α search needs the calibration Hessians and their token count")
    sites = fold_sites(layers, absmax, spec)
    bar = progress.bar(len(sites), "SmoothQuant α" if alpha == AUTO_ALPHA else "SmoothQuant", "activations")
    report = []
    for site in sites:
        bar.step()
        x_max = np.maximum(absmax[site.activation].astype(np.float64), MIN_SCALE)
        w_max = np.max([np.abs(layer.weight()).max(axis=1) for layer in site.layers], axis=0)
        errors = {}
        if alpha == AUTO_ALPHA:
            errors = _errors_by_alpha(site, x_max, w_max, hessians[site.activation], tokens,
                                      (floating or {}).get(site.activation, ()))
        chosen = min(errors, key=errors.get) if errors else alpha
        scales = _scales(site, x_max, w_max, chosen)
        apply_scales(model, site, scales)
        after = x_max / scales
        report.append(Smoothed(site.activation, [layer.name for layer in site.layers], site.fold.name,
                               float(x_max.max()), float(after.max()), float(x_max.max() / np.median(x_max)),
                               float(after.max() / np.median(after)), chosen, errors.get(0.0), errors.get(chosen)))
        absmax[site.activation] = after.astype(np.float32)
    bar.close()
    return report


def _scales(site: FoldSite, x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j,:|^(1-α), shared where GQA needs it."""
    x_shared, w_shared = site.shared(x_max), site.shared(w_max)
    return np.maximum(x_shared**alpha / np.maximum(w_shared, MIN_SCALE) ** (1 - alpha), MIN_SCALE)


def _errors_by_alpha(site: FoldSite, x_max: np.ndarray, w_max: np.ndarray, hessian: np.ndarray,
                     tokens: int, floating=()) -> dict[float, float]:
    """Each α of the grid -> the site's predicted output error with int8 weights and static int8 activations
    (the module docstring), relative to Σ tr(Wᵀ H W). The `floating` channels are exact (not in int8)."""
    weights = [layer.weight().astype(np.float32) for layer in site.layers]
    hessian = hessian.astype(np.float32)
    total = sum(float((w * (hessian @ w)).sum()) for w in weights)
    in_int8 = np.ones(len(x_max), bool)
    in_int8[list(floating)] = False
    errors = {}
    for alpha in ALPHAS:
        scales = _scales(site, x_max, w_max, alpha).astype(np.float32)
        step = float((x_max / scales)[in_int8].max()) / INT8_MAX
        scaled_hessian = hessian / np.outer(scales, scales)
        error = 0.0
        for weight in weights:
            scaled = weight * scales[:, None] * in_int8[:, None]
            codes, steps = weight_int8(scaled)
            delta = codes * steps - scaled
            error += float((delta * (scaled_hessian @ delta)).sum()) + tokens * step**2 / 12 * float((scaled**2).sum())
        errors[alpha] = error / max(total, 1e-30)
    return errors


def _only_feeds(activation: ir.Value, group: list[LinearLayer]) -> bool:
    nodes = {id(layer.node) for layer in group}
    return all(id(node) in nodes and index == 0 for node, index in activation.uses()) and not activation.is_graph_output()


def _standard(node: ir.Node | None) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


def _normalization_fold(activation: ir.Value) -> _Fold | None:
    """LayerNormalization's scale and bias, RMSNormalization's scale, or the constant of Mul(x, weight)."""
    node = activation.producer()
    if not _standard(node):
        return None
    channels = activation.shape[-1] if activation.shape is not None else None
    if node.op_type in ("LayerNormalization", "RMSNormalization") and node.attributes.get_int("axis", -1) == -1:
        indices = tuple(i for i in (1, 2) if i < len(node.inputs) and node.inputs[i] is not None)
        if all(node.inputs[i].const_value is not None for i in indices):
            return _Fold(node.op_type, node=node, indices=indices)
    if node.op_type == "Mul":
        for index, value in enumerate(node.inputs):
            if value.const_value is not None and value.const_value.shape == ir.Shape([channels]):
                return _Fold(node.op_type, node=node, indices=(index,))
    return None


def _output_of(layer: LinearLayer) -> ir.Value:
    return layer.node.outputs[0]


def _linear_source(value: ir.Value, by_output: dict[int, LinearLayer]) -> _Fold | None:
    """The linear layer that produces `value` (directly or through Add of a constant bias), read by nothing else."""
    bias = None
    node = value.producer()
    if _standard(node) and node.op_type == "Add":
        constant = [v for v in node.inputs if v.const_value is not None]
        other = [v for v in node.inputs if v.const_value is None]
        if len(constant) != 1 or len(other) != 1 or len(constant[0].shape) != 1:
            return None
        bias, value = node, other[0]
    layer = by_output.get(id(value))
    if layer is None or len(value.uses()) != 1 or value.is_graph_output():
        return None
    return _Fold(layer.name, layer=layer, bias=bias)


def _mlp_fold(activation: ir.Value, by_output: dict[int, LinearLayer]) -> _Fold | None:
    """down_proj's input Mul(act(gate), up): the factor goes into up's output columns."""
    node = activation.producer()
    if not _standard(node) or node.op_type != "Mul":
        return None
    for value in node.inputs:
        if value.shape == activation.shape and len(value.uses()) == 1:
            fold = _linear_source(value, by_output)
            if fold is not None:
                return fold
    return None


def _attention_fold(activation: ir.Value, by_output: dict[int, LinearLayer], spec: DecoderSpec) -> _Fold | None:
    """o_proj's input: back through the merge of heads to an Attention's value input, and through the value's
    reshapes, cache Concat and head repeat to the v_proj that produced it."""
    heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if activation.shape is None or activation.shape[-1] != heads * head_dim or heads % kv_heads:
        return None
    value = activation
    while _standard(value.producer()) and value.producer().op_type in ("Reshape", "Transpose") \
            and len(value.uses()) <= 1:
        value = value.producer().inputs[0]
    attention = value.producer()
    if not _standard(attention) or attention.op_type != "Attention" or len(value.uses()) != 1 \
            or attention.outputs[0] is not value or len(attention.inputs) > 4:  # no past inputs: the Concat below is it
        return None
    value = attention.inputs[2]
    while _standard(value.producer()) and value.producer().op_type in _CHANNEL_MOVES:
        node = value.producer()
        if node.op_type == "Concat":  # Concat(past value, new value) along the sequence: the new part
            fresh = [v for v in node.inputs if not v.is_graph_input()]
            if len(fresh) != 1 or node.attributes.get_int("axis", 0) not in (2, -2):
                return None
            value = fresh[0]
        else:
            value = node.inputs[0]
    fold = _linear_source(value, by_output)
    if fold is None or fold.layer.weight().shape[1] != kv_heads * head_dim:
        return None
    # X channel h * head_dim + d reads value channel (h // group) * head_dim + d
    group = heads // kv_heads
    fold.channels = (np.arange(heads)[:, None] // group * head_dim + np.arange(head_dim)[None, :]).ravel()
    return fold


def _divide_producer(model: ir.Model, fold: _Fold, scales: np.ndarray) -> None:
    if fold.layer is None:
        for index in fold.indices:
            _divide_input(model, fold.node, index, scales)
        return
    if fold.channels is not None:  # every X channel of one producer channel has the same factor
        source = np.ones(int(fold.channels.max()) + 1)
        source[fold.channels] = scales
        scales = source
    replace_weight(model, fold.layer, fold.layer.weight() / scales[None, :].astype(np.float32))
    if fold.bias is not None:
        index = next(i for i, v in enumerate(fold.bias.inputs) if v.const_value is not None)
        _divide_input(model, fold.bias, index, scales)


def _divide_input(model: ir.Model, node: ir.Node, index: int, scales: np.ndarray) -> None:
    """Replace the node's constant input by a private copy divided by the scales."""
    value = node.inputs[index]
    divided = (value.const_value.numpy().astype(np.float64) / scales).astype(value.const_value.numpy().dtype)
    node.replace_input_with(index, initializer(model, f"{value.name}.smoothed", divided))
