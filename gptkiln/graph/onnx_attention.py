"""Portable: every layer's attention is one ONNX Attention op (opset 23).

torch.onnx emits Attention for transformers' SDPA path at opset 23 (gptkiln.exporter.attention_op
takes broadcast multi-query heads too). This rewrites nothing: it claims the op per layer, so a
torch or transformers upgrade that falls back to MatMul/Softmax shows in the report. Families that
run eager attention (soft-capped Gemma 2, GPT-Neo) make no claim.
"""

from __future__ import annotations

from gptkiln.graph.fusion import LLM_OPS_OPSET, Fusion, count_ops, per_layer



def _expected(spec, opset: int) -> int | None:
    return per_layer(spec) if spec.sdpa and opset >= LLM_OPS_OPSET else None


FUSION = Fusion("onnx_attention", "portable", None, _expected, count_ops("Attention"))
