"""Linear layers that read the same activation, packed into one: q/k/v after the attention norm, gate/up after
the MLP norm (5 of a Llama block's 7 linears become 2).

    MatMul(x, W_q), MatMul(x, W_k), MatMul(x, W_v)  ==>  Split(MatMul(x, [W_q | W_k | W_v]), [N_q, N_k, N_v])

A weight is a float initializer or a weight-only DequantizeLinear of one (blocks along the input axis, the form
ONNX Runtime fuses into MatMulNBits); codes, scales (fp16 ones too: initializers.half_constant) and zero points
are concatenated along the output axis, so each output column is computed as before. At batch 1 a decode step
is many small kernels: fewer, larger ones cost less of the step's fixed overhead (onnxruntime-genai's builder
packs the same layers).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from gptkiln.graph.initializers import half_constant, initializer, stored_initializer


def _stored(value: ir.Value | None) -> ir.Value | None:
    """The initializer a weight's input is stored in (itself, or the fp16 one a half_constant casts), if nothing
    else reads either."""
    if value is None or len(value.uses()) != 1:
        return None
    stored = stored_initializer(value)
    return stored if stored is not None and len(stored.uses()) == 1 else None


def _weight_parts(matmul: ir.Node) -> tuple[tuple, list[ir.Value]] | None:
    """(what must match for two weights to pack, the initializers to concatenate along their last axis), or None."""
    weight = matmul.inputs[1]
    if weight.const_value is not None and len(weight.shape or ()) == 2 and len(weight.uses()) == 1:
        return ("float", weight.dtype, weight.shape[0]), [weight]
    dequantize = weight.producer()
    if (dequantize is None or dequantize.op_type != "DequantizeLinear" or len(weight.uses()) != 1
            or dequantize.attributes.get_int("axis", 1) != 0 or not dequantize.attributes.get_int("block_size", 0)):
        return None
    parts = [_stored(v) for v in dequantize.inputs]
    if None in parts:
        return None
    stored = tuple((part.dtype, value.const_value is None) for part, value in zip(parts, dequantize.inputs))
    key = ("blocked", stored, parts[0].shape[0], dequantize.attributes.get_int("block_size"))
    return key, parts


def packed_name(names: list[str]) -> str:
    """The members' names with what differs joined by '+': model.layers.0.self_attn.{q,k,v}_proj.weight ->
    'model.layers.0.self_attn.q_proj+k_proj+v_proj.weight' (the parameters stay findable by name)."""
    split = [name.split(".") for name in names]
    head = 0
    while all(len(s) > head + 1 and s[head] == split[0][head] for s in split):  # each keeps a part of its own
        head += 1
    tail = 0
    while all(len(s) - head > tail + 1 and s[-1 - tail] == split[0][-1 - tail] for s in split):
        tail += 1
    middle = "+".join(".".join(s[head:len(s) - tail]) for s in split)
    return ".".join(split[0][:head] + [middle] + split[0][len(split[0]) - tail:])


def pack_linears(model: ir.Model) -> int:
    """Pack every group of linear layers that share their input and their weight's form; returns how many packed
    MatMuls the graph has now."""
    groups = defaultdict(list)
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            parts = _weight_parts(node)
            if parts is not None:
                groups[(id(node.inputs[0]), parts[0])].append((node, parts[1]))
    packed = 0
    for (_, key), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0][0]
        nodes, weights = [], []
        halves = [halved for _, halved in key[1]] if key[0] == "blocked" else [False]
        for column, halved in zip(zip(*(parts for _, parts in members)), halves):
            array = np.concatenate([v.const_value.numpy() for v in column], axis=-1)
            if halved:  # fp16 scales: a half_constant again
                nodes.append(half_constant(model, packed_name([v.name for v in column]), array.astype(np.float32)))
                weights.append(nodes[-1].outputs[0])
            else:
                weights.append(initializer(model, packed_name([v.name for v in column]), array))
        name = f"{weights[0].name}.packed"
        if key[0] == "blocked":
            dequantize = first.inputs[1].producer()
            nodes.append(ir.node("DequantizeLinear", weights, attributes={
                "axis": 0, "block_size": dequantize.attributes.get_int("block_size")}, name=f"{name}.dequantize"))
            weight = nodes[-1].outputs[0]
        else:
            (weight,) = weights
        nodes.append(ir.node("MatMul", [first.inputs[0], weight], name=name))
        widths = initializer(model, f"{name}.widths", np.array([parts[0].shape[-1] for _, parts in members], np.int64))
        split = ir.node("Split", [nodes[-1].outputs[0], widths], attributes={"axis": -1}, num_outputs=len(members),
                        name=f"{name}.split")
        nodes.append(split)
        model.graph.insert_before(first, nodes)
        for (node, _), output in zip(members, split.outputs):
            old, source = node.outputs[0], node.inputs[1].producer()
            old.replace_all_uses_with(output, replace_graph_outputs=True)
            output.name, output.shape, output.type = old.name, old.shape, old.type
            replaced = [node] + ([source] if source is not None else [])
            inputs = source.inputs if source is not None else []
            replaced += [v.producer() for v in inputs if v.producer() is not None]  # fp16 scales' Casts
            constants = [v for n in replaced for v in n.inputs if v.const_value is not None and v.producer() is None]
            model.graph.remove(replaced, safe=True)
            for value in constants:
                model.graph.initializers.pop(value.name)
        packed += 1
    return packed
