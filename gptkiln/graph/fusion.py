"""A Fusion: a named set of pattern/check/rewrite rules, how many times it should fire, and why it did not.

Each fusion file in this package defines one Fusion. `apply` rewrites the model in place
and returns a FusionCount; when the count is below what the DecoderSpec says to expect,
a dry run with onnxscript's MatchingTracer finds the best partial match and its failure
reason, so a transformers or torch upgrade that breaks a pattern says where it broke.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern

from gptkiln.models.spec import DecoderSpec


LLM_OPS_OPSET = 23  # ONNX's own RMSNormalization, RotaryEmbedding and Attention


@dataclass
class FusionCount:
    name: str
    fusion_set: str  # "portable", "grouped_attention" (standard ONNX ops) or "onnxruntime" (contrib ops)
    expected: int | None  # None: nothing to expect for this architecture
    actual: int
    reason: str = ""  # why it fired fewer times than expected

    @property
    def short(self) -> bool:
        return self.expected is not None and self.actual < self.expected

    def to_dict(self) -> dict:
        return {**asdict(self), "short": self.short}


@dataclass(frozen=True)
class Fusion:
    name: str
    fusion_set: str
    rules: Callable[[], pattern.RewriteRuleSet] | None  # built on use: rules hold no model state; None: count only
    expected: Callable[[DecoderSpec, int], int | None]  # (spec, the graph's default-domain opset)
    # what `actual` counts: by default the rewrites this run made; for an op the exporter may already
    # emit (RMSNormalization, RotaryEmbedding, Attention) the graph's nodes of that op after the rewrite
    counted: Callable[[ir.Model, DecoderSpec], int] | None = None

    def apply(self, model: ir.Model, spec: DecoderSpec) -> FusionCount:
        actual = self.rules().apply_to_model(model) if self.rules else 0
        if self.counted is not None:
            actual = self.counted(model, spec)
        expected = self.expected(spec, model.opset_imports.get("", 0))
        reason = ""
        if expected is not None and actual < expected:
            reason = self.why_not(model)
        return FusionCount(self.name, self.fusion_set, expected, actual, reason)

    def why_not(self, model: ir.Model) -> str:
        """The best partial match left in the model and why it failed (a dry run: nothing changes)."""
        if self.rules is None:
            return "the exporter did not emit it, and no rule makes it"
        tracer = pattern.MatchingTracer()
        self.rules().apply_to_model(model, tracer=tracer)
        best = None
        for rule, matches in tracer.best_matches_map.items():
            for match in matches:
                if best is None or match.score() > best[1].score():
                    best = (rule, match)
        if best is None:
            return "no node matched even the start of the pattern"
        rule, match = best
        node = match.root_node
        detail = getattr(match.match_result, "reason", "") or "pattern mismatch"
        return f"{match.status.name.lower()} at {node.op_type} '{node.name}' ({rule.name}): {detail}"


def per_layer(spec: DecoderSpec) -> int:
    return spec.num_layers


def count_ops(op_type: str, domain: str = "") -> Callable[[ir.Model, DecoderSpec], int]:
    return lambda model, spec: sum(1 for node in model.graph if node.op_type == op_type and node.domain == domain)
