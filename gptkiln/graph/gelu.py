"""Portable: tanh-approximated GELU (transformers' gelu_new) -> ONNX Gelu(approximate="tanh"), opset >= 20.

    y = 0.5 * x * (1 + tanh(0.7978845608 * (x + 0.044715 * x^3)))  ==>  Gelu(x, approximate="tanh")

Gelu exists from opset 20; an opset-18 graph keeps the decomposed form (and says so).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import Fusion, per_layer

GELU_OPSET = 20
TANH_GELU_ACTIVATIONS = ("gelu_new",)


def tanh_gelu(op, x, half, three, cubic, sqrt_2_over_pi, one):
    """The decomposed form torch.onnx emits for gelu_new."""
    inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), cubic)), sqrt_2_over_pi)
    return op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))


def check_tanh_gelu_constants(half, three, cubic, sqrt_2_over_pi, one) -> pattern.MatchResult:
    result = pattern.MatchResult()
    wanted = ((half, 0.5), (three, 3.0), (cubic, 0.044715), (sqrt_2_over_pi, 0.7978845608028654), (one, 1.0))
    for value, number in wanted:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None or tensor.size != 1:
            return result.fail(f"expected the constant {number}", value)
        array = tensor.numpy()
        tolerance = max(1e-6, float(ml_dtypes.finfo(array.dtype).eps) * abs(number))  # fp16/bf16 graphs round it
        if abs(float(array.reshape(()).astype(np.float64)) - number) > tolerance:
            return result.fail(f"expected the constant {number}", value)
    return result


class TanhGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, half, three, cubic, sqrt_2_over_pi, one):
        return tanh_gelu(op, x, half, three, cubic, sqrt_2_over_pi, one)

    def check(self, context, half, three, cubic, sqrt_2_over_pi, one, **_):
        opset = context.model.opset_imports.get("", 0)
        if opset < GELU_OPSET:
            return pattern.MatchResult().fail(f"the graph is opset {opset}; Gelu needs opset {GELU_OPSET} (--opset 20)")
        return check_tanh_gelu_constants(half, three, cubic, sqrt_2_over_pi, one)

    def rewrite(self, op, x, **_):
        return op.Gelu(x, approximate="tanh")


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([TanhGelu.rule()])


def _expected(spec, opset: int) -> int | None:
    return per_layer(spec) if spec.activation in TANH_GELU_ACTIVATIONS and opset >= GELU_OPSET else None


FUSION = Fusion("gelu", "portable", _rules, _expected)
