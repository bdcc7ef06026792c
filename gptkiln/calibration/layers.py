"""The layers quantization works on: MatMuls with a constant weight, found in the ONNX graph
(so every family is covered the same way), grouped by role (the same layer in every transformer
block: the DecoderSpec's `blocks_path`, over the parameter names the exporter restored) for the
mixed-precision fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gptkiln.graph.initializers import initializer, stored_initializer
from gptkiln.models.spec import DecoderSpec


@dataclass
class LinearLayer:
    node: ir.Node  # MatMul(activation, weight)
    activation: ir.Value  # [..., K]
    weight_name: str  # the initializer the weight comes from
    transposed: bool  # the weight is Transpose(initializer): a tied lm_head

    @property
    def name(self) -> str:
        return self.weight_name

    def role(self, spec: DecoderSpec) -> str:
        """The parameter's name with its block's index as '*' ('model.layers.*.mlp.down_proj.weight': that layer
        in every block); outside the blocks (the lm_head), its own name. A transposed copy ('….T') names its
        parameter."""
        name = self.weight_name.removesuffix(".T")
        block = spec.block_of(name)
        if block is None:
            return name
        return f"{spec.blocks_path}.*.{name[len(f'{spec.blocks_path}.{block}.'):]}"

    def weight(self) -> np.ndarray:
        """[K, N] float32, as the MatMul sees it."""
        value = self._stored().const_value.numpy().astype(np.float32)
        return value.T if self.transposed else value

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(K, N), as the MatMul sees it, without reading the weight."""
        rows, columns = self._stored().const_value.shape
        return (columns, rows) if self.transposed else (rows, columns)

    def _stored(self) -> ir.Value:
        source = self.node.inputs[1]
        return source.producer().inputs[0] if self.transposed else source


def linear_layers(model: ir.Model) -> list[LinearLayer]:
    """Every MatMul whose second input is a 2-D initializer (or a Transpose of one) and whose
    first input is a float activation: the linear layers, lm_head included."""
    layers = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        activation, weight = node.inputs
        transposed = False
        producer = weight.producer()
        if producer is not None and producer.op_type == "Transpose" and producer.inputs[0].const_value is not None:
            perm = producer.attributes.get_ints("perm", [1, 0])
            if list(perm) != [1, 0]:
                continue
            weight, transposed = producer.inputs[0], True
        if weight.const_value is None or len(weight.const_value.shape) != 2 or activation.const_value is not None:
            continue
        layers.append(LinearLayer(node, activation, weight.name, transposed))
    return layers


def tied_table(layer: LinearLayer) -> ir.Value | None:
    """The table a tied lm_head reads through its Transpose, when the embedding's Gather reads it too."""
    if not layer.transposed:
        return None
    table = layer.node.inputs[1].producer().inputs[0]
    return table if any(node.op_type == "Gather" and index == 0 for node, index in table.uses()) else None


def untied(layers: list[LinearLayer]) -> list[LinearLayer]:
    """The layers without a tied lm_head: the channel scales of AWQ and weight-only int8's SmoothQuant leave it out,
    so that it keeps sharing the embedding table's codes (scaled, it would need its own copy of the table)."""
    return [layer for layer in layers if tied_table(layer) is None]


MIN_WEIGHT_ELEMENTS = 64  # smaller constants are shapes, axes and scalars, not weights


def weight_bits(model: ir.Model) -> tuple[int, int]:
    """(elements, stored bits) of the graph's weights: every initializer of MIN_WEIGHT_ELEMENTS or more,
    codes, scales and zero points alike (a table shared by two consumers counts once; one that nothing reads
    any more, such as a weight its quantized copy replaced, not at all)."""
    elements = bits = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None and value.const_value.size >= MIN_WEIGHT_ELEMENTS and value.uses():
            elements += value.const_value.size
            bits += value.const_value.size * value.const_value.dtype.bitwidth
    return elements, bits


def linear_bits(layer: LinearLayer) -> tuple[int, int]:
    """(weights, stored bits) of one linear layer: its fp32 weight, or the codes, scales (fp16: half_constant)
    and zero points of the DequantizeLinear in front of it."""
    source = layer.node.inputs[1].producer()
    if source is not None and source.op_type == "Transpose" and source.inputs[0].producer() is not None:
        source = source.inputs[0].producer()  # a tied lm_head reading the quantized table (tied_table)
    if source is None or source.op_type != "DequantizeLinear":
        size = layer.weight().size
        return size, size * 32
    stored = [stored_initializer(value) for value in source.inputs if value is not None]
    parts = [value.const_value for value in stored if value is not None]
    return parts[0].size, sum(part.size * part.dtype.bitwidth for part in parts)


def replace_weight(model: ir.Model, layer: LinearLayer, array: np.ndarray) -> None:
    """Give the layer a new [K, N] fp32 weight. A tied weight (Transpose) gets its own copy,
    so the embedding that shares it is left alone."""
    if layer.transposed:
        layer.node.replace_input_with(1, initializer(model, f"{layer.weight_name}.T", array.astype(np.float32)))
        layer.transposed = False  # weight_name stays: it names the layer
        return
    value = layer.node.inputs[1]
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)
