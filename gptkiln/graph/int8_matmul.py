"""ONNX Runtime: a static-int8 (W8A8) linear layer as one com.microsoft MatMulIntegerToFloat.

    MatMul(DequantizeLinear(a_int8, a_scale, a_zp), DequantizeLinear(w_int8, w_scale, w_zp, axis=1))
        ==>  MatMulIntegerToFloat(a_int8, w_int8, a_scale, w_scale, a_zp, w_zp)

ONNX Runtime makes this fusion itself when a quantized activation has one reader. When one
QuantizeLinear feeds several layers (q/k/v after the attention norm, gate/up after the MLP norm: a
Llama's 5 of 7 linears) it keeps them as a DequantizeLinear of the whole weight and a float MatMul
every step (SmolLM2 W8A8 decoded 5 tokens/s for that; separate QuantizeLinears do not help, its
common-subexpression pass merges them back). The fused op takes a shared activation as it is. An
int8 activation is re-quantized to uint8 on the same grid (MLAS's fast kernels are uint8 x int8).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.graph.fusion import Fusion

INT8 = (ir.DataType.INT8, ir.DataType.UINT8)


class Int8MatMul(pattern.RewriteRuleClassBase):
    def pattern(self, op, a, a_scale, a_zp, w, w_scale, w_zp):
        activation = op.DequantizeLinear(a, a_scale, a_zp, _allow_other_attributes=True, _outputs=["activation"])
        weight = op.DequantizeLinear(w, w_scale, w_zp, _allow_other_attributes=True, _outputs=["weight"])
        return op.MatMul(activation, weight)

    def check(self, context, a, a_scale, a_zp, w, w_scale, w_zp, activation, weight, **_):
        result = pattern.MatchResult()
        if a.dtype not in INT8 or w.dtype not in INT8:
            return result.fail("the activation or the weight is not 8-bit", activation.producer())
        if w.const_value is None or w.shape is None or len(w.shape) != 2:
            return result.fail("the weight is not a constant matrix", weight.producer())
        if any(v.shape is None or v.shape.dims not in ((), (1,)) for v in (a_scale, a_zp)):
            return result.fail("the activation is not quantized per tensor", activation.producer())
        attrs = weight.producer().attributes
        per_column = w_scale.shape is not None and w_scale.shape.dims == (w.shape[1],)
        if attrs.get_int("block_size", 0) or not (per_column and attrs.get_int("axis", 1) in (1, -1)
                                                   or w_scale.shape is not None and w_scale.shape.dims in ((), (1,))):
            return result.fail("the weight is not quantized per output column or per tensor", weight.producer())
        return result

    def rewrite(self, op, a, a_scale, a_zp, w, w_scale, w_zp, **_):
        quantize = a.producer()
        zero = ir.convenience.get_const_tensor(a_zp)
        if (a.dtype == ir.DataType.INT8 and quantize is not None and quantize.op_type == "QuantizeLinear"
                and not quantize.attributes and zero is not None):
            # the same grid as uint8 (zero point + 128): MLAS's fast kernels take uint8 activations, int8 x int8
            # ran 8 tokens/s on SmolLM2 against 90+ for uint8 (int8-dynamic's form)
            a_zp = op.Constant(value=ir.tensor((zero.numpy().astype(np.int16) + 128).astype(np.uint8)))
            a = op.QuantizeLinear(quantize.inputs[0], a_scale, a_zp)
        return op.MatMulIntegerToFloat(a, w, a_scale, w_scale, a_zp, w_zp, _domain="com.microsoft")


def _rules() -> pattern.RewriteRuleSet:
    # remove_nodes=False: a shared activation DequantizeLinear has other readers; cleanup drops it once unused
    return pattern.RewriteRuleSet([Int8MatMul.rule(remove_nodes=False)])


FUSION = Fusion("int8_matmul", "onnxruntime", _rules, lambda spec, opset: None)
