"""ONNX Runtime: the rotary embedding and the q/k/v Split taken into GroupQueryAttention (after kv_buffer and
packed_linears), as onnxruntime-genai's builder lays its CPU graphs out.

    q = RotaryEmbedding(x_q, cos, sin),  k = RotaryEmbedding(x_k, cos, sin)
    GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, -, -, -, mask)
        ==>
    GroupQueryAttention(x_q, x_k, v, ..., cos_cache, sin_cache, positions, mask, do_rotary=1)
    and, where x_q, x_k, v are one Split of a packed q/k/v MatMul:
    GroupQueryAttention(qkv, -, -, ..., cos_cache, sin_cache, positions, mask, do_rotary=1)

Two RotaryEmbeddings and a Split less per layer, and the per-step cos/sin arithmetic goes.
cos_cache / sin_cache [rows, rotary_dim/2] are the graph's own cos/sin nodes, copied to read positions 0..rows-1
(rows: the model's positions rounded up to the cache's growth block, since ORT wants a row for every slot of the KV
buffer); ORT folds the copy into initializers when it creates the session. The cos/sin must depend on position_ids
alone; a rope that reads the sequence length (dynamic NTK) keeps the form as is.

Positions: on a first prompt GroupQueryAttention rotates every row at position_ids[0, 0] + its column, and at later
steps each row at its own position_ids. So it is given each token's column in a left-padded row (the real position
+ the row's padding: RoPE scores depend only on the distance between positions, so this shift changes no score) and
the real position where no padding precedes the token (onnxruntime-genai pads on the right: its prompt tokens sit
at their positions, its new tokens after the padding). Both layouts then rotate each row consistently.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from gptkiln.graph.initializers import initializer, insert_node
from gptkiln.graph.kv_buffer import MS_DOMAIN
from gptkiln.models.spec import DecoderSpec

GQA_COS, GQA_SIN, GQA_POSITIONS = 7, 8, 9  # GroupQueryAttention's input indices


def rotary_into_attention(model: ir.Model, spec: DecoderSpec, rows: int) -> str | None:
    """Rewrite in place; return None when done, or why the graph keeps its RotaryEmbedding nodes (then unchanged)."""
    if not spec.rotary:
        return "the model has no rotary embedding"
    attentions = [node for node in model.graph if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN]
    if not attentions:
        return "no GroupQueryAttention (the KV cache kept its Concat form)"
    rotaries = [_rotary_pair(node) for node in attentions]
    for found in rotaries:
        if isinstance(found, str):
            return found
    subgraphs = {}  # (cos, sin) -> the nodes that make them
    for q_rotary, _ in rotaries:
        cos, sin = q_rotary.inputs[1], q_rotary.inputs[2]
        if (cos, sin) in subgraphs:
            continue
        width = cos.shape[-1] if cos.shape is not None else None
        if not isinstance(width, int) or spec.head_dim % 16 or width % 8 or width * 2 > spec.head_dim:
            return (f"rotary width {width and width * 2} of head {spec.head_dim}: GroupQueryAttention rotates heads "
                    "of 16n in widths of 16n")
        subgraphs[(cos, sin)] = _table_nodes(model, [cos, sin])
        if isinstance(subgraphs[(cos, sin)], str):
            return subgraphs[(cos, sin)]
    positions = _rotary_positions(model)
    made = {pair: _position_tables(model, nodes, list(pair), rows, f"rotary_table{index}")
            for index, (pair, nodes) in enumerate(subgraphs.items())}
    for attention, (q_rotary, k_rotary) in zip(attentions, rotaries):
        cos_cache, sin_cache = made[(q_rotary.inputs[1], q_rotary.inputs[2])]
        inputs = list(attention.inputs)
        inputs[0], inputs[1] = q_rotary.inputs[0], k_rotary.inputs[0]
        inputs[GQA_COS], inputs[GQA_SIN] = cos_cache, sin_cache
        inputs[GQA_POSITIONS] = positions
        packed = _packed_source(inputs[0], inputs[1], inputs[2], spec)
        if packed is not None:
            inputs[0:3] = [packed, None, None]
        attrs = {key: attr.value for key, attr in attention.attributes.items()}
        attrs.update(do_rotary=1, rotary_interleaved=q_rotary.attributes.get_int("interleaved", 0))
        fused = ir.node("GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, num_outputs=3, name=attention.name)
        model.graph.insert_before(attention, fused)
        for old, new in zip(attention.outputs, fused.outputs):
            new.type, new.shape = old.type, old.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = f"{old.name}_rotary_unfused", old.name
        model.graph.remove(attention, safe=True)
    common.RemoveUnusedNodesPass()(model)
    return None


def _rotary_pair(attention: ir.Node) -> tuple[ir.Node, ir.Node] | str:
    """The RotaryEmbeddings that make the attention's q and k, when they can move into it."""
    if len(attention.inputs) > GQA_POSITIONS and any(attention.inputs[i] is not None
                                                     for i in (GQA_COS, GQA_SIN, GQA_POSITIONS)):
        return f"'{attention.name}' already has rotary inputs"
    pair = [value.producer() if value is not None else None for value in attention.inputs[:2]]
    if any(node is None or node.op_type != "RotaryEmbedding" or len(node.inputs) != 3 for node in pair):
        return f"'{attention.name}': q and k are not each a RotaryEmbedding(x, cos, sin)"
    q_rotary, k_rotary = pair
    if (q_rotary.inputs[1] is not k_rotary.inputs[1] or q_rotary.inputs[2] is not k_rotary.inputs[2]
            or q_rotary.attributes.get_int("interleaved", 0) != k_rotary.attributes.get_int("interleaved", 0)
            or q_rotary.attributes.get_int("rotary_embedding_dim", 0)
            or k_rotary.attributes.get_int("rotary_embedding_dim", 0)):
        return f"'{attention.name}': q and k are rotated differently, or in part of the head"
    if any(len(node.outputs[0].uses()) != 1 for node in pair):
        return f"'{attention.name}': a rotated q or k has another reader"
    return q_rotary, k_rotary


def _packed_source(q: ir.Value, k: ir.Value, v: ir.Value, spec: DecoderSpec) -> ir.Value | None:
    """x when q, k, v are outputs 0, 1, 2 of one Split(x, axis=-1) into the heads' widths that nothing else reads."""
    split = q.producer()
    if (split is None or split.op_type != "Split" or list(split.outputs) != [q, k, v]
            or split.attributes.get_int("axis", 0) not in (-1, 2) or len(split.inputs) < 2):
        return None
    widths = split.inputs[1].const_value
    expected = [spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim]
    if widths is None or widths.numpy().tolist() != expected or any(len(value.uses()) != 1 for value in (q, k, v)):
        return None
    return split.inputs[0]


def _table_nodes(model: ir.Model, values: list[ir.Value]) -> list[ir.Node] | str:
    """The nodes that compute the values from position_ids and constants alone, in graph order, or why not."""
    nodes, stack, seen = [], [value.producer() for value in values], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for value in node.inputs:
            if value is None or value.const_value is not None:
                continue
            if value.producer() is not None:
                stack.append(value.producer())
            elif value.name != "position_ids":
                return f"the rotary's cos/sin read '{value.name}', not position_ids alone"
    order = {id(node): index for index, node in enumerate(model.graph)}
    return sorted(nodes, key=lambda node: order[id(node)])


def _position_tables(model: ir.Model, nodes: list[ir.Node], values: list[ir.Value], rows: int,
                     name: str) -> list[ir.Value]:
    """The values at positions 0..rows-1 as [rows, width] tables: a copy of their nodes reading Range(rows) instead of
    position_ids. Every input is then a constant, so ONNX Runtime folds the copy into two initializers when the
    session is created (the engine file stores none)."""
    first = model.graph.node(0)

    def insert(op: str, operands: list, label: str, attrs: dict | None = None, domain: str = "",
               outputs: int = 1) -> list[ir.Value]:
        return insert_node(first, op, operands, f"{name}_{label}", attrs, domain=domain, outputs=outputs)

    def constant(label: str, array: np.ndarray) -> ir.Value:
        return initializer(model, f"{name}_{label}", array)

    limits = [constant(label, np.array(n, np.int64)) for label, n in (("start", 0), ("limit", rows), ("delta", 1))]
    positions = insert("Unsqueeze", [insert("Range", limits, "range")[0], constant("axis0", np.array([0], np.int64))],
                       "positions")[0]
    mapped: dict[int, ir.Value] = {}
    for index, node in enumerate(nodes):
        operands = [None if v is None else positions if v.name == "position_ids" and v.producer() is None
                    else mapped.get(id(v), v) for v in node.inputs]
        copies = insert(node.op_type, operands, str(index), {k: a.value for k, a in node.attributes.items()},
                        node.domain, len(node.outputs))
        for old, new in zip(node.outputs, copies):
            mapped[id(old)], new.dtype = new, old.dtype
    shape = constant("shape", np.array([rows, -1], np.int64))
    return [insert("Reshape", [mapped[id(value)], shape], f"table{index}")[0] for index, value in enumerate(values)]


def _rotary_positions(model: ir.Model) -> ir.Value:
    """[batch, seq] int64: position_ids + the row's leading padding where the token is not padding, else its column."""
    inputs = {value.name: value for value in model.graph.inputs}
    first = model.graph.node(0)

    def add(op: str, operands: list, name: str, **attrs) -> ir.Value:
        return insert_node(first, op, operands, f"rotary_positions_{name}", attrs)[0]

    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    total = add("Shape", [mask], "total", start=1, end=2)
    length = add("Shape", [ids], "length", start=1, end=2)
    past = add("Sub", [total, length], "past")
    scalar = initializer(model, "rotary_positions_axis0", np.array([0], np.int64))
    columns = add("Range", [add("Squeeze", [past, scalar], "start"), add("Squeeze", [total, scalar], "end"),
                            initializer(model, "rotary_positions_one", np.array(1, np.int64))], "columns")
    step_mask = add("Slice", [mask, past, total, initializer(model, "rotary_positions_axis1", np.array([1], np.int64))],
                    "step_mask")
    leading = add("ArgMax", [mask], "leading_padding", axis=1, keepdims=1)  # the first 1 of each row
    real = add("Add", [inputs["position_ids"], leading], "shifted")
    return add("Where", [add("Cast", [step_mask], "is_token", to=ir.DataType.BOOL), real, columns], "value")

