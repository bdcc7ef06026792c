"""fp16 graphs (gptkiln.graph.half): normalization and softmax stay fp32, constants are clipped to the
half range, and the graph runs and passes the fp16 parity bar on ONNX Runtime CPU, the one runtime here
that executes fp16 graphs (TensorRT runs the same graph on a GPU: tests/gpu/)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gptkiln.config import BuildConfig, Precision, Tolerances
from gptkiln.graph.half import to_half
from gptkiln.manifest import read_manifest
from gptkiln.pipeline import build


def test_fp32_islands_and_clipping(fresh_graph):
    model = fresh_graph()
    report = to_half(model, "bf16")
    assert report.fp32_islands == {"LayerNormalization": 9, "Softmax": 4}  # opset 18: explicit Softmax
    assert report.clipped >= 1  # the causal mask's float32 minimum
    norms = [n for n in model.graph if n.op_type in ("LayerNormalization", "Softmax")]
    for node in norms:
        assert node.inputs[0].producer().op_type == "Cast" and node.inputs[0].dtype == ir.DataType.FLOAT
        assert all(v.dtype == ir.DataType.FLOAT for v in node.inputs if v is not None)
        assert {use.node.op_type for use in node.outputs[0].uses()} == {"Cast"}
    floats = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
    assert floats and all(use.node.op_type == "LayerNormalization" for v in floats for use in v.uses())
    assert model.graph.outputs[0].name == "logits" and model.graph.outputs[0].dtype == ir.DataType.FLOAT
    for node in model.graph:  # the mask's float32 minimum became the largest finite half value, not -inf
        if node.op_type == "Constant" and node.outputs[0].dtype == ir.DataType.BFLOAT16:
            assert np.isfinite(node.attributes["value"].value.numpy().astype(np.float32)).all()


def test_shared_normalization_weights(fresh_graph):
    """Identical LayerNorm weights may be one initializer (GPT-2 at init): one fp32 copy serves them all."""
    model = fresh_graph()
    norms = [n for n in model.graph if n.op_type == "LayerNormalization"]
    shared = norms[0].inputs[1]
    for node in norms[1:3]:
        node.replace_input_with(1, shared)
    scaled = ir.node("Mul", [norms[0].outputs[0], shared])  # and a half consumer of the same weight
    model.graph.append(scaled)
    to_half(model, "fp16")
    assert all(n.inputs[1].dtype == ir.DataType.FLOAT for n in norms)
    assert len({id(n.inputs[1]) for n in norms[:3]}) == 1 and norms[0].inputs[1].name == f"{shared.name}_fp32"
    assert scaled.inputs[1] is shared and shared.dtype == ir.DataType.FLOAT16


def test_fp16_build_passes_the_half_bar_on_ort(tmp_path):
    result = build(BuildConfig(model="reference", output=tmp_path / "out", targets=("onnxruntime",),
                               precision=Precision.FP16, tolerances=Tolerances.half()))
    target = result.targets[0]
    assert result.ok, target.failures
    by_name = {c.name: c for c in target.parity.comparisons}
    assert by_name["batch1/logits"].top1_agreement >= 0.99 and by_name["padded/logits"].top1_agreement >= 0.99
    assert 0 < by_name["batch1/logits"].rel < 1e-2  # half precision moved the logits, a little
    assert all(g.matched >= 16 for g in target.parity.greedy)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["precision"] == "fp16" and manifest["tolerances"]["greedy_tokens"] == 16
    assert manifest["half"]["initializers"] > 0
