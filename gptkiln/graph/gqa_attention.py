"""grouped_attention: grouped-query attention reads its K/V heads as they are, without repeating them.

transformers repeats each key/value head for its group of query heads before SDPA (`repeat_kv`),
which the export keeps as Unsqueeze -> Expand -> Reshape: a copy of the whole cache per layer
and step. ONNX Attention takes fewer K/V heads itself (q_num_heads % kv_num_heads == 0, query
head h reading K/V head h // group, which is what repeat_kv computes), so:

    Attention(q, Reshape(Expand(Unsqueeze(k, 2))), Reshape(Expand(Unsqueeze(v, 2))), mask)
        ==>  Attention(q, k, v, mask)

Standard ops, but its own set: OpenVINO's stateless CPU path cannot run it (targets/openvino.py).
`actual` counts the Attention nodes that read K/V with the model's kv_num_heads.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import LLM_OPS_OPSET, Fusion, per_layer



def _repeated(op, x, name: str):
    return op.Reshape(op.Expand(op.Unsqueeze(x, pattern.ANY_VALUE, _outputs=[f"{name}_unsqueezed"]),
                                pattern.ANY_VALUE), pattern.ANY_VALUE, _outputs=[f"{name}_repeated"])


class GroupedQueryAttention(pattern.RewriteRuleClassBase):
    def pattern(self, op, query, key, value, mask):
        return op.Attention(query, _repeated(op, key, "key"), _repeated(op, value, "value"), mask,
                            _allow_other_attributes=True, _outputs=["attention"])

    def check(self, context, query, key, value, key_unsqueezed, value_unsqueezed, key_repeated, value_repeated,
              **_):
        result = pattern.MatchResult()
        for name, unsqueezed in (("key", key_unsqueezed), ("value", value_unsqueezed)):
            axes = ir.convenience.get_const_tensor(unsqueezed.producer().inputs[1])
            if axes is None or axes.numpy().tolist() not in ([2], [-3]):
                return result.fail(f"the {name} is not unsqueezed at axis 2 (repeat_kv)", unsqueezed)
        for value_ in (query, key, value, key_repeated, value_repeated):
            if value_.shape is None or value_.shape.rank() != 4 or not isinstance(value_.shape[1], int):
                return result.fail("a 4-D [batch, heads, seq, head_dim] input with static heads is needed", value_)
        heads, kv_heads = query.shape[1], key.shape[1]
        if value.shape[1] != kv_heads or heads % kv_heads or key_repeated.shape[1] != heads \
                or value_repeated.shape[1] != heads:
            return result.fail(f"{kv_heads} K/V heads are not repeated to the {heads} query heads", key)
        return result

    def rewrite(self, op, query, key, value, mask, attention, **_):
        return op.Attention(query, key, value, mask, **attention.producer().attributes)


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([GroupedQueryAttention.rule()])


def _expected(spec, opset: int) -> int | None:
    grouped = spec.num_kv_heads < spec.num_heads
    return per_layer(spec) if grouped and spec.sdpa and opset >= LLM_OPS_OPSET else None


def _grouped(model: ir.Model, spec) -> int:
    if spec.num_kv_heads == spec.num_heads:
        return 0
    return sum(1 for node in model.graph if node.op_type == "Attention" and node.inputs[1].shape is not None
               and node.inputs[1].shape.rank() == 4 and node.inputs[1].shape[1] == spec.num_kv_heads)


FUSION = Fusion("gqa_attention", "grouped_attention", _rules, _expected, _grouped)
