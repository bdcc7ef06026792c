"""ONNX Runtime: tanh GELU with its bias -> com.microsoft FastGelu.

Takes either form of the activation: the decomposed one (opset 18 graphs) or the portable
Gelu(approximate="tanh") that gelu.py makes at opset >= 20.

    x = MatMul(h, W) + b;  y = tanh_gelu(x)   ==>   FastGelu(MatMul(h, W), b)
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import Fusion, per_layer
from gptkiln.graph.gelu import TANH_GELU_ACTIVATIONS, check_tanh_gelu_constants, tanh_gelu


def _check_bias(y, bias, result: pattern.MatchResult) -> pattern.MatchResult:
    """FastGelu adds a bias over the last axis only: a constant vector of that width."""
    if not result:
        return result
    if bias.const_value is None or bias.shape is None or bias.shape.rank() != 1:
        return result.fail("the bias is not a constant 1-D tensor", bias)
    # Add(y, 1-D bias) already broadcasts over the last axis; refuse only a known mismatch
    # (values made by earlier rewrites carry no inferred shape)
    if y.shape is not None and y.shape.rank() and y.shape[-1] != bias.shape[0]:
        return result.fail(f"the bias width {bias.shape[0]} does not match the input {y.shape}", bias)
    return result


def _check_tanh_attribute(gelu) -> pattern.MatchResult:
    result = pattern.MatchResult()
    if gelu.producer().attributes.get_string("approximate", "none") != "tanh":
        return result.fail("Gelu is not the tanh approximation", gelu.producer())
    return result


class BiasFastGeluFromDecomposed(pattern.RewriteRuleClassBase):
    def pattern(self, op, y, bias, half, three, cubic, sqrt_2_over_pi, one):
        return tanh_gelu(op, op.Add(y, bias), half, three, cubic, sqrt_2_over_pi, one)

    def check(self, context, y, bias, half, three, cubic, sqrt_2_over_pi, one, **_):
        return _check_bias(y, bias, check_tanh_gelu_constants(half, three, cubic, sqrt_2_over_pi, one))

    def rewrite(self, op, y, bias, **_):
        return op.FastGelu(y, bias, _domain="com.microsoft")


class FastGeluFromDecomposed(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, half, three, cubic, sqrt_2_over_pi, one):
        return tanh_gelu(op, x, half, three, cubic, sqrt_2_over_pi, one)

    def check(self, context, half, three, cubic, sqrt_2_over_pi, one, **_):
        return check_tanh_gelu_constants(half, three, cubic, sqrt_2_over_pi, one)

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


class BiasFastGeluFromGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, y, bias):
        return op.Gelu(op.Add(y, bias), _allow_other_attributes=True, _outputs=["gelu"])

    def check(self, context, y, bias, gelu, **_):
        return _check_bias(y, bias, _check_tanh_attribute(gelu))

    def rewrite(self, op, y, bias, **_):
        return op.FastGelu(y, bias, _domain="com.microsoft")


class FastGeluFromGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Gelu(x, _allow_other_attributes=True, _outputs=["gelu"])

    def check(self, context, gelu, **_):
        return _check_tanh_attribute(gelu)

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


def _rules() -> pattern.RewriteRuleSet:
    # bias forms first: they consume the Add that the plain forms would leave behind
    return pattern.RewriteRuleSet([BiasFastGeluFromDecomposed.rule(), BiasFastGeluFromGelu.rule(),
                                   FastGeluFromDecomposed.rule(), FastGeluFromGelu.rule()])


def _expected(spec, opset: int) -> int | None:
    return per_layer(spec) if spec.activation in TANH_GELU_ACTIVATIONS else None


FUSION = Fusion("fast_gelu", "onnxruntime", _rules, _expected)
