"""Portable: rotary position embedding -> ONNX RotaryEmbedding (opset 23), for queries and keys of every layer.

torch.onnx emits RotaryEmbedding for transformers' `rotate_half` form at opset 23; with partial
rotary (Phi, GPT-NeoX, Phi-3 with partial_rotary_factor) it applies to a Slice of each head, and
onnxscript's partial-rotary rule folds the Slice/Concat into `rotary_embedding_dim`. GPT-J's
interleaved form (`rotate_every_two`) is not claimed (spec.rotary is False for it).
"""

from __future__ import annotations

from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion._rotary_embedding import partial_embedding_rules, rotary_embedding_rules

from gptkiln.graph.fusion import LLM_OPS_OPSET, Fusion, count_ops



def _rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([*rotary_embedding_rules.rules, *partial_embedding_rules.rules])


def _expected(spec, opset: int) -> int | None:
    return 2 * spec.num_layers if spec.rotary and opset >= LLM_OPS_OPSET else None


FUSION = Fusion("rotary_embedding", "portable", _rules, _expected, count_ops("RotaryEmbedding"))
