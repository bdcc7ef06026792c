"""ONNX Runtime: attention with its KV cache -> com.microsoft MultiHeadAttention.

Matches what torch.onnx makes of scaled_dot_product_attention behind the KV-cache wrapper:

    k4 = Transpose(Reshape(k, [B,S,N,H]), 0213);  present_k = Concat(past_k, k4, axis=-2)   (same for v)
    q4 = Transpose(Reshape(q, [B,S,N,H]), 0213)
    scores = MatMul(Mul(q4, c), Mul(transpose_last_two(present_k), c))   # c = scale ** 0.5
    out = Reshape(Transpose(MatMul(Softmax(Add(scores, bias)), present_v), 0213), [B,S,D])

and rewrites it to MultiHeadAttention(q, k, v, attention_bias=bias, past_key, past_value)
with outputs (out, present_k, present_v): the op concatenates the cache itself. K's last two
axes are swapped either by one Transpose (eager attention) or, as torch's SDPA
decomposition does, by a Reshape/Transpose/Reshape chain; both forms are rules here.
MultiHeadAttention needs equal query and key/value head counts: grouped-query models are
not fused (see the check).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import LLM_OPS_OPSET, Fusion, per_layer

BNSH = (0, 2, 1, 3)


def _heads(op, x, shape):
    return op.Transpose(op.Reshape(x, shape, _allow_other_attributes=True), perm=list(BNSH))


def _scalar(value: ir.Value) -> float | None:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


class _AttentionWithCache(pattern.RewriteRuleClassBase):
    def keys_transposed(self, op, present_k, shape_a, shape_b):
        raise NotImplementedError

    def pattern(self, op, q, k, v, past_k, past_v, bias, q_shape, k_shape, v_shape, out_shape,
                scale_q, scale_k, shape_a, shape_b):
        present_k = op.Concat(past_k, _heads(op, k, k_shape), axis=-2, _outputs=["present_k"])
        present_v = op.Concat(past_v, _heads(op, v, v_shape), axis=-2, _outputs=["present_v"])
        scores = op.MatMul(op.Mul(_heads(op, q, q_shape), scale_q),
                           op.Mul(self.keys_transposed(op, present_k, shape_a, shape_b), scale_k))
        probs = op.Softmax(op.Add(scores, bias), axis=-1)
        context = op.Transpose(op.MatMul(probs, present_v), perm=list(BNSH))
        out = op.Reshape(context, out_shape, _allow_other_attributes=True)
        return out, present_k, present_v

    def check(self, context, q, k, v, past_k, scale_q, scale_k, **_):
        result = pattern.MatchResult()
        if _scalar(scale_q) is None or _scalar(scale_k) is None:
            return result.fail("the query/key scales are not scalar constants", scale_q)
        past = past_k.shape
        if past is None or past.rank() != 4 or not (isinstance(past[1], int) and isinstance(past[3], int)):
            return result.fail(f"past key must be [batch, heads, past, head_dim], got {past}", past_k)
        for name, value in (("query", q), ("key", k), ("value", v)):
            if value.shape is None or value.shape.rank() != 3 or not isinstance(value.shape[2], int):
                return result.fail(f"{name} must be [batch, seq, hidden] with a known hidden, got {value.shape}", value)
            if value.shape[2] != past[1] * past[3]:
                # e.g. grouped-query attention: fewer key/value heads than query heads
                return result.fail(f"{name} width {value.shape[2]} != heads {past[1]} x head_dim {past[3]}", value)
        return result

    def rewrite(self, op, q, k, v, past_k, past_v, bias, out_shape, scale_q, scale_k, **_):
        heads = past_k.shape[1]
        scale = _scalar(scale_q) * _scalar(scale_k)
        out, present_k, present_v = op.MultiHeadAttention(
            q, k, v, None, None, bias, past_k, past_v, num_heads=heads, scale=scale,
            _domain="com.microsoft", _outputs=3)
        # keep the original output shape (the exporter often flattens to [batch*seq, hidden])
        return op.Reshape(out, out_shape), present_k, present_v


class AttentionTransposeK(_AttentionWithCache):
    """Eager attention: MatMul(q, Transpose(k, 0132))."""

    def keys_transposed(self, op, present_k, shape_a, shape_b):
        return op.Transpose(present_k, perm=[0, 1, 3, 2])


class AttentionReshapeTransposeK(_AttentionWithCache):
    """torch's SDPA decomposition: Reshape(k, [B*N, T, H]) -> Transpose(021) -> Reshape([B, N, H, T])."""

    def keys_transposed(self, op, present_k, shape_a, shape_b):
        flat = op.Reshape(present_k, shape_a, _allow_other_attributes=True)
        return op.Reshape(op.Transpose(flat, perm=[0, 2, 1]), shape_b, _allow_other_attributes=True)


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([AttentionReshapeTransposeK.rule(), AttentionTransposeK.rule()])


# Families whose exported attention this rule is verified on (tests/graph, tests/test_architectures).
# GPT-Neo (unscaled scores), GPT-J / GPT-NeoX (rotary embeddings) and the grouped-query
# families export other patterns: they run unfused, and their count is reported, not expected.
FUSED_FAMILIES = ("gpt2",)


def _expected(spec, opset: int) -> int | None:
    """From opset 23 the exporter emits ONNX's own Attention op (every runtime runs it fused):
    nothing is left for this rule."""
    fused = spec.model_type in FUSED_FAMILIES and spec.num_kv_heads == spec.num_heads and opset < LLM_OPS_OPSET
    return per_layer(spec) if fused else None


FUSION = Fusion("attention_with_kv_cache", "onnxruntime", _rules, _expected)
