"""ONNX Runtime: residual Add + RMSNormalization -> com.microsoft SkipSimplifiedLayerNormalization.

    s = Add(a, b); y = RMSNormalization(s, gamma)   ==>   y, _, _, s = SkipSimplifiedLayerNormalization(a, b, gamma)

The sum stays available (output 3) for the next residual connection. In a pre-norm RMSNorm
decoder every block's second norm and the next block's first norm (the final norm for the last
block) follow a residual Add: two per layer. The first block's norm reads the embedding.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import LLM_OPS_OPSET, Fusion
from gptkiln.graph.skip_layer_norm import check_residual_inputs


class SkipRmsNorm(pattern.RewriteRuleClassBase):
    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b, _outputs=["total"])
        normed = op.RMSNormalization(total, gamma, _allow_other_attributes=True, _outputs=["normed"])
        return normed, total

    def check(self, context, a, b, gamma, normed, **_):
        result = pattern.MatchResult()
        attrs = normed.producer().attributes
        if attrs.get_int("axis", -1) != -1:
            return result.fail("RMSNormalization is not over the last axis", normed.producer())
        if attrs.get_int("stash_type", 1) != 1:
            return result.fail("RMSNormalization does not compute in float32", normed.producer())
        return check_residual_inputs(result, a, b, {"gamma": gamma})

    def rewrite(self, op, a, b, gamma, normed, **_):
        epsilon = normed.producer().attributes.get_float("epsilon", 1e-5)
        out, _, _, total = op.SkipSimplifiedLayerNormalization(a, b, gamma, epsilon=epsilon,
                                                               _domain="com.microsoft", _outputs=4)
        return out, total


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([SkipRmsNorm.rule()])


def _expected(spec, opset: int) -> int | None:
    return 2 * spec.num_layers if spec.rms_norms and opset >= LLM_OPS_OPSET else None


FUSION = Fusion("skip_rms_norm", "onnxruntime", _rules, _expected)
