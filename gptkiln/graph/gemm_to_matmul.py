"""Portable: Reshape(x, [-1, K]) -> Gemm(W, b) -> Reshape([B, S, N])  ==>  MatMul(x, W) + b.

torch.onnx flattens every linear layer to 2-D for Gemm. Keeping activations 3-D removes two
Reshapes per linear layer and lets the bias Add be fused into what follows (FastGelu's bias,
SkipLayerNormalization's input), which every target's own fusions also prefer.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import Fusion


class GemmToMatMul(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, flat_shape, weight, bias, out_shape):
        flat = op.Reshape(x, flat_shape, _allow_other_attributes=True)
        y = op.Gemm(flat, weight, bias, _allow_other_attributes=True, _outputs=["gemm"])
        return op.Reshape(y, out_shape, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, flat_shape, weight, bias, gemm, out, **_):
        result = pattern.MatchResult()
        flat = ir.convenience.get_const_tensor(flat_shape)
        if flat is None or weight.shape is None or list(flat.numpy()) != [-1, weight.shape[0]]:
            return result.fail("the input is not flattened to [-1, in_features]", flat_shape)
        attrs = gemm.producer().attributes
        if attrs.get_int("transA", 0) or attrs.get_int("transB", 0):
            return result.fail("Gemm transposes an input", gemm.producer())
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return result.fail("Gemm has alpha/beta != 1", gemm.producer())
        if x.shape is None or out.shape is None or x.shape.rank() not in (3, 4) or out.shape.rank() != 3:
            return result.fail(f"need a 3-D/4-D input and a 3-D output, got {x.shape} -> {out.shape}", x)
        if list(x.shape)[:2] != list(out.shape)[:2]:
            return result.fail(f"batch/sequence dims differ: {x.shape} vs {out.shape}", out)
        if weight.shape is None or weight.shape.rank() != 2 or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("weight must be 2-D and bias 1-D", weight)
        return result

    def rewrite(self, op, x, weight, bias, **_):
        if x.shape.rank() == 4:  # [B, S, N, H] -> [B, S, N*H]
            x = op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))
        return op.Add(op.MatMul(x, weight), bias)


def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([GemmToMatMul.rule()])


FUSION = Fusion("gemm_to_matmul", "portable", _rules, lambda spec, opset: None)  # a prerequisite: no count to expect
