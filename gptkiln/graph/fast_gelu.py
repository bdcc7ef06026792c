"""ONNX Runtime: tanh-approximated GELU (transformers' gelu_new), with its bias -> com.microsoft FastGelu.

    y = 0.5 * x * (1 + tanh(0.7978845608 * (x + 0.044715 * x^3))),  x = MatMul(h, W) + b
    ==> FastGelu(MatMul(h, W), b)
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import Fusion, per_layer

TANH_GELU_ACTIVATIONS = ("gelu_new",)


def _gelu(op, x, half, three, cubic, sqrt_2_over_pi, one):
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), cubic)), sqrt_2_over_pi)
    return op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))


def _check_constants(half, three, cubic, sqrt_2_over_pi, one) -> pattern.MatchResult:
    result = pattern.MatchResult()
    wanted = ((half, 0.5), (three, 3.0), (cubic, 0.044715), (sqrt_2_over_pi, 0.7978845608028654), (one, 1.0))
    for value, number in wanted:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None or tensor.size != 1 or abs(float(tensor.numpy().reshape(())) - number) > 1e-6:
            return result.fail(f"expected the constant {number}", value)
    return result


class BiasFastGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, y, bias, half, three, cubic, sqrt_2_over_pi, one):
        return _gelu(op, op.Add(y, bias), half, three, cubic, sqrt_2_over_pi, one)

    def check(self, context, bias, half, three, cubic, sqrt_2_over_pi, one, **_):
        result = _check_constants(half, three, cubic, sqrt_2_over_pi, one)
        if result and (bias.const_value is None or bias.shape is None or bias.shape.rank() != 1):
            return result.fail("the bias is not a constant 1-D tensor", bias)
        return result

    def rewrite(self, op, y, bias, **_):
        return op.FastGelu(y, bias, _domain="com.microsoft")


class FastGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, half, three, cubic, sqrt_2_over_pi, one):
        return _gelu(op, x, half, three, cubic, sqrt_2_over_pi, one)

    def check(self, context, half, three, cubic, sqrt_2_over_pi, one, **_):
        return _check_constants(half, three, cubic, sqrt_2_over_pi, one)

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([BiasFastGelu.rule(), FastGelu.rule()])


def _expected(spec) -> int | None:
    return per_layer(spec) if spec.activation in TANH_GELU_ACTIVATIONS else None


FUSION = Fusion("fast_gelu", "onnxruntime", _rules, _expected)
