"""Portable: RMSNorm -> ONNX RMSNormalization (opset 23), one per RMSNorm module of the model.

torch.onnx already emits RMSNormalization for transformers' RMSNorm modules at opset 23; the
rules (onnxscript's: Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) take a norm written out
by hand. `actual` counts the op in the final graph, whichever made it.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_rules

from gptkiln.graph.fusion import LLM_OPS_OPSET, Fusion, count_ops



def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(rms_normalization_rules)


def _expected(spec, opset: int) -> int | None:
    return spec.rms_norms if spec.rms_norms and opset >= LLM_OPS_OPSET else None


FUSION = Fusion("rms_normalization", "portable", _rules, _expected, count_ops("RMSNormalization"))
