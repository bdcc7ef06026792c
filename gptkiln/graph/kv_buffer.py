"""ONNX Runtime's in-place KV cache: each layer's attention becomes one GroupQueryAttention (com.microsoft)
that writes the step's keys and values into the past buffer itself.

Per layer, after the portable and grouped_attention fusions (rotary optional, GQA or MHA):

    q4 = RotaryEmbedding(Transpose(q, [0,2,1,3]))                  [batch, heads, seq, head]
    k4 = RotaryEmbedding(Transpose(k, [0,2,1,3])),  v4 = Transpose(v, [0,2,1,3])
    present_k = Concat(past_k, k4, axis=2),  present_v = Concat(past_v, v4, axis=2)
    out = Transpose(Attention(q4, present_k, present_v, mask), [0,2,1,3])     read by Reshapes only
        ==>
    q3 = RotaryEmbedding(Reshape(q, [0,0,-1]), num_heads)           [batch, seq, heads*head]
    out, present_k, present_v = GroupQueryAttention(q3, k3, v3, past_k, past_v, seqlens_k, total,
                                                    attention_bias=mask)       [batch, seq, heads*head]
    (a Reshape of out to [batch, seq, heads*head], which merged the heads before, is dropped)

seqlens_k is total-1 for every row and the mask (padding, causal, window) is the attention bias,
so left padding works as before. The op has two modes, chosen by the caller's buffers:
- past [batch, kv, past, head] arrays (the contract): present is past+new, as Concat made it;
- past bound to the same memory as present, [batch, kv, capacity, head] with capacity >= total:
  only the new positions are written, and attention reads the first `total` (InPlaceRunner).
The q/k/v transposes, the output transpose and the Concat copies go away.

It applies when every layer has this form, else the graph is left as it was and the reason is
returned (eager-attention families, soft-capped Gemma 2).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from gptkiln.exporter.io_spec import past_names, present_names
from gptkiln.graph.initializers import initializer, insert_node
from gptkiln.models.spec import DecoderSpec

MS_DOMAIN = "com.microsoft"
HEADS_FIRST = [0, 2, 1, 3]  # [batch, seq, heads, head] <-> [batch, heads, seq, head]
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def share_kv_buffers(model: ir.Model, spec: DecoderSpec) -> str | None:
    """Rewrite in place; return None when done, or why the graph keeps its Concat form (then unchanged)."""
    graph = model.graph
    layers = []
    for past_k, past_v, present_k, present_v in _cache_values(graph, spec.num_layers):
        layer = _layer(past_k, past_v, present_k, present_v)
        if isinstance(layer, str):
            return layer
        layers.append(layer)
    first = graph.node(0)
    inputs = {value.name: value for value in graph.inputs}
    seqlens_k, total = _lengths(model, first, inputs["input_ids"], inputs["attention_mask"])
    merge_heads = initializer(model, "kv_merge_heads", np.array([0, 0, -1], np.int64))
    for attention, q, k, v, out, concats in layers:
        mask = attention.inputs[3]
        attrs = {"num_heads": spec.num_heads, "kv_num_heads": spec.num_kv_heads}
        for name in ("scale", "softcap"):
            if name in attention.attributes:
                attrs[name] = attention.attributes[name].value
        query, key, value = (_three_d(attention, *path, heads, merge_heads, f"{attention.name}_{role}")
                             for path, heads, role in ((q, spec.num_heads, "q"), (k, spec.num_kv_heads, "k"),
                                                       (v, spec.num_kv_heads, "v")))
        past_k, past_v = (concat.inputs[0] for concat in concats)
        gqa = ir.node("GroupQueryAttention", [query, key, value, past_k, past_v, seqlens_k, total, None, None, None,
                                              mask], attrs, domain=MS_DOMAIN, num_outputs=3,
                      name=f"{attention.name}_gqa")
        graph.insert_before(attention, gqa)
        result = gqa.outputs[0]
        result.name, result.dtype = f"{attention.name}_gqa_out", out.dtype
        result.shape = ir.Shape([*inputs["input_ids"].shape, spec.num_heads * spec.head_dim])
        ir.convenience.replace_all_uses_with(out, result)
        _skip_identity_reshapes(result)
        for concat, present in zip(concats, gqa.outputs[1:]):
            old = concat.outputs[0]
            present.type, present.shape = old.type, old.shape  # the contract's shape (arrays in)
            ir.convenience.replace_all_uses_with(old, present, replace_graph_outputs=True)
            old.name, present.name = f"{old.name}_concat", old.name
    common.RemoveUnusedNodesPass()(model)
    model.opset_imports[MS_DOMAIN] = 1
    return None


def _cache_values(graph: ir.Graph, num_layers: int):
    inputs = {value.name: value for value in graph.inputs}
    outputs = {value.name: value for value in graph.outputs}
    pasts, presents = past_names(num_layers), present_names(num_layers)
    for layer in range(num_layers):
        names = pasts[2 * layer: 2 * layer + 2] + presents[2 * layer: 2 * layer + 2]
        yield tuple(inputs.get(n) if n.startswith("past") else outputs.get(n) for n in names)


def _layer(past_k, past_v, present_k, present_v):
    """(attention, q, k, v paths (x, norms, rotary), out, (concat_k, concat_v)), or why not."""
    if None in (past_k, past_v, present_k, present_v):
        return "the graph does not have the contract's past/present pairs"
    concats = []
    for past, present in ((past_k, present_k), (past_v, present_v)):
        concat = present.producer()
        if (concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is not past
                or concat.attributes.get_int("axis") not in (2, -2)):
            return f"{present.name} is not Concat({past.name}, new, axis=2)"
        if past.dtype not in FLOATS:
            return f"{past.name} is {past.dtype}, not float32 or float16"
        if any(use.node is not concat and not _reads_not_length(use.node) for use in past.uses()):
            return f"{past.name} is read by more than its Concat"
        concats.append(concat)
    attention = {use.node for use in present_k.uses()} | {use.node for use in present_v.uses()}
    attention = next(iter(attention)) if len(attention) == 1 else None
    if (attention is None or attention.op_type != "Attention" or len(attention.inputs) != 4
            or attention.inputs[1] is not present_k or attention.inputs[2] is not present_v):
        return f"{present_k.name} / {present_v.name} are not read by one Attention as its keys and values"
    mask = attention.inputs[3]
    if mask is None or mask.dtype not in FLOATS:
        return f"Attention '{attention.name}' has no additive float mask"
    if attention.attributes.get_int("is_causal", 0) or attention.attributes.get_int("qk_matmul_output_mode", 0):
        return f"Attention '{attention.name}' is causal by attribute or outputs its scores"
    paths = [_heads_first(attention.inputs[0]), _heads_first(concats[0].inputs[1]),
             _heads_first(concats[1].inputs[1], rotary_allowed=False)]
    out = _merged_output(attention)
    for role, path in zip("qkv", paths):
        if path is None:
            return f"Attention '{attention.name}': the {role} input is not Transpose(x, {HEADS_FIRST}) [+ RotaryEmbedding]"
    if out is None:
        return f"Attention '{attention.name}': its output is not Transpose(out, {HEADS_FIRST}) read by Reshapes"
    return attention, *paths, out, tuple(concats)


def _heads_first(value: ir.Value, rotary_allowed: bool = True) -> tuple[ir.Value, list[ir.Node], ir.Node | None] | None:
    """value = [RotaryEmbedding]([RMSNormalization over the head](Transpose(x, HEADS_FIRST)))
    -> (x [batch, seq, heads, head], the norms (q/k norms, Gemma 3), the rotary node)."""
    node, norms, rotary = value.producer(), [], None
    if rotary_allowed and node is not None and node.op_type == "RotaryEmbedding" and node.domain == "":
        rotary, node = node, node.inputs[0].producer()
    while node is not None and node.op_type == "RMSNormalization" and node.attributes.get_int("axis", -1) in (-1, 3):
        norms.insert(0, node)
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != HEADS_FIRST:
        return None
    return node.inputs[0], norms, rotary


def _skip_identity_reshapes(result: ir.Value) -> None:
    """The Reshapes that merged the heads, where they now reshape [batch, seq, hidden] to itself (their output's
    shape is the output's): read the attention's output directly (a kernel a layer less each step)."""
    for node, _ in list(result.uses()):
        merged = node.outputs[0]
        if merged.shape is not None and list(merged.shape) == list(result.shape) and not merged.is_graph_output():
            ir.convenience.replace_all_uses_with(merged, result)


def _merged_output(attention: ir.Node) -> ir.Value | None:
    """Transpose(y, HEADS_FIRST), the attention's output as [batch, seq, heads, head], when only Reshapes read
    it (they merge the heads, to [batch, seq, hidden] or [batch*seq, hidden]: the same from a 3-D output)."""
    uses = list(attention.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Transpose":
        return None
    transpose = uses[0].node
    if list(transpose.attributes.get_ints("perm", [])) != HEADS_FIRST:
        return None
    merged = transpose.outputs[0]
    return merged if all(use.node.op_type == "Reshape" and use.idx == 0 for use in merged.uses()) else None


def _reads_not_length(node: ir.Node) -> bool:
    """A Shape of the past's batch, heads or head size (the graph reuses one for the batch size)."""
    if node.op_type != "Shape":
        return False
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", 4)
    start, end = start % 4 if start < 0 else start, end % 4 if end < 0 else end
    return end <= 2 or start >= 3


def _three_d(before: ir.Node, x: ir.Value, norms: list[ir.Node], rotary: ir.Node | None,
             heads: int, merge_heads: ir.Value, name: str) -> ir.Value:
    """[batch, seq, heads, head] x -> [batch, seq, heads*head], normalised and rotated as before (the norms act on
    the head axis, the last in either layout; the rotary in its 3-D form)."""
    def add(op: str, inputs: list, attrs: dict, suffix: str) -> ir.Value:
        return insert_node(before, op, inputs, f"{name}_{suffix}", attrs, dtype=x.dtype)[0]

    for index, norm in enumerate(norms):
        x = add(norm.op_type, [x, *norm.inputs[1:]], {k: a.value for k, a in norm.attributes.items()}, f"norm{index}")
    split = x.producer()
    if split is not None and split.op_type == "Reshape" and split.inputs[0].shape is not None \
            and len(split.inputs[0].shape) == 3:
        merged = split.inputs[0]  # x split a linear layer's [batch, seq, heads*head] output into heads
    else:
        merged = add("Reshape", [x, merge_heads], {}, "3d")
    if rotary is None:
        return merged
    attrs = {key: attr.value for key, attr in rotary.attributes.items()}
    return add("RotaryEmbedding", [merged, *rotary.inputs[1:]], {**attrs, "num_heads": heads}, "rotary")


def _lengths(model: ir.Model, first: ir.Node, input_ids: ir.Value, attention_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """seqlens_k [batch] int32 = total-1 for every row; total_sequence_length, an int32 scalar."""
    def add(op: str, inputs: list, name: str, dtype=ir.DataType.INT64, **attrs) -> ir.Value:
        return insert_node(first, op, inputs, name, attrs, dtype=dtype)[0]

    total = add("Shape", [attention_mask], "kv_total", start=1, end=2)
    last = add("Sub", [total, initializer(model, "kv_one", np.array([1], np.int64))], "kv_last")
    batch = add("Shape", [input_ids], "kv_batch", start=0, end=1)
    seqlens = add("Cast", [add("Expand", [last, batch], "kv_last_per_row")], "kv_seqlens_k", ir.DataType.INT32,
                  to=ir.DataType.INT32)
    scalar = add("Squeeze", [total, initializer(model, "kv_axis0", np.array([0], np.int64))], "kv_total_scalar")
    return seqlens, add("Cast", [scalar], "kv_total_sequence_length", ir.DataType.INT32, to=ir.DataType.INT32)
