"""Graph passes and fusions. Each target names the fusion sets it takes (Target.fusion_sets):

- "portable": rewrites into standard ONNX ops that every runtime reads;
- "grouped_attention": Attention reading fewer K/V heads than query heads (standard ops, but not
  every runtime's path executes it);
- "onnxruntime": com.microsoft contrib ops, which only ONNX Runtime runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from gptkiln.graph import (attention, fast_gelu, gelu, gemm_to_matmul, gqa_attention, int8_matmul, onnx_attention,
                           rms_normalization, rotary_embedding, skip_layer_norm, skip_rms_norm)
from gptkiln.graph.cleanup import cleanup
from gptkiln.graph.fusion import Fusion, FusionCount
from gptkiln.models.spec import DecoderSpec

# In the order they run: later fusions rely on earlier ones (FastGelu's bias on GemmToMatMul,
# and it also takes the Gelu that the portable rule makes; SkipSimplifiedLayerNormalization
# takes the RMSNormalization).
FUSIONS: tuple[Fusion, ...] = (gemm_to_matmul.FUSION, gelu.FUSION, rms_normalization.FUSION, rotary_embedding.FUSION,
                               onnx_attention.FUSION, gqa_attention.FUSION, attention.FUSION, skip_layer_norm.FUSION,
                               skip_rms_norm.FUSION, fast_gelu.FUSION, int8_matmul.FUSION)


@dataclass
class FusionReport:
    counts: list[FusionCount]
    nodes_before: int
    nodes_after: int

    @property
    def short(self) -> list[FusionCount]:
        return [c for c in self.counts if c.short]

    def to_dict(self) -> dict:
        return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "fusions": [c.to_dict() for c in self.counts]}


def optimize(model: ir.Model, spec: DecoderSpec, fusion_sets: tuple[str, ...]) -> FusionReport:
    """Clean up, then apply every fusion of the given sets, in place."""
    nodes_before = len(model.graph)
    cleanup(model)
    counts = [fusion.apply(model, spec) for fusion in FUSIONS if fusion.fusion_set in fusion_sets]
    cleanup(model)
    return FusionReport(counts, nodes_before, len(model.graph))


__all__ = ["FUSIONS", "FusionReport", "optimize"]
