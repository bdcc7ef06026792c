"""Cleanup around the fusions: constant folding, dead nodes, duplicate initializers, shapes.

onnxscript's optimizer folds constants (including the Shape/Gather/Concat chains that only
compute constants), removes unused nodes and runs shape inference; initializers with equal
content are merged. Tied embeddings are one initializer from the export on and stay one. Scales stored in
fp16 (initializers.half_constant) stay so: their Cast is not folded.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from gptkiln.graph.initializers import is_half_cast


def cleanup(model: ir.Model) -> None:
    onnxscript.optimizer.optimize_ir(model, should_fold=_keep_half_constants)
    common.DeduplicateInitializersPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)


def _keep_half_constants(node: ir.Node) -> bool | None:
    return False if is_half_cast(node) else None
