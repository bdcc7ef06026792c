"""Cleanup around the fusions: constant folding, dead nodes, duplicate initializers, shapes.

onnxscript's optimizer folds constants (including the Shape/Gather/Concat chains that only
compute constants), removes unused nodes and runs shape inference; initializers with equal
content are merged. Tied embeddings are one initializer from the export on and stay one.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer


def cleanup(model: ir.Model) -> None:
    onnxscript.optimizer.optimize(model)
    common.DeduplicateInitializersPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
