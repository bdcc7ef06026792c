"""Linear layers reading one activation packed into one MatMul and a Split: the same numbers, fewer kernels."""

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

from gptkiln.calibration.layers import linear_layers
from gptkiln.calibration.weight_only import WeightFormat, quantize_weights
from gptkiln.graph.initializers import initializer
from gptkiln.graph.packed_linears import pack_linears

WIDTH, OUTS = 64, (64, 32, 32)  # q, k, v of a grouped-query layer
X = np.random.default_rng(1).standard_normal((2, 3, WIDTH)).astype(np.float32)


def _graph() -> ir.Model:
    """x -> three MatMuls (graph outputs q, k, v) and one more MatMul on q (not the same input: left alone)."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "sequence", WIDTH]))
    graph.inputs.append(x)
    rng = np.random.default_rng(0)
    for name, width in zip("qkv", OUTS):
        node = ir.node("MatMul", [x, initializer(model, f"{name}.weight", rng.standard_normal((WIDTH, width)).astype(np.float32))],
                       name=f"{name}_proj")
        graph.append(node)
        node.outputs[0].name = name
        graph.outputs.append(node.outputs[0])
    after = ir.node("MatMul", [graph.outputs[0], initializer(model, "o.weight", np.eye(OUTS[0], dtype=np.float32))])
    graph.append(after)
    after.outputs[0].name = "o"
    graph.outputs.append(after.outputs[0])
    return model


def _run(model: ir.Model) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["q", "k", "v", "o"], {"x": X})


@pytest.mark.parametrize("weights", ["float", "int8", "int4"])
def test_layers_sharing_an_input_are_packed_and_compute_the_same(weights):
    model = _graph()
    if weights != "float":
        layers = [layer for layer in linear_layers(model) if layer.weight_name != "o.weight"]
        quantize_weights(model, layers, WeightFormat(32, symmetric=weights == "int8", bits=int(weights[3:])))
        common.RemoveUnusedNodesPass()(model)  # the float weights, as the quantize stage drops them
    before = _run(model)
    assert pack_linears(model) == 1
    ops = [node.op_type for node in model.graph]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1
    assert ops.count("DequantizeLinear") == (0 if weights == "float" else 1)
    assert not [name for name in model.graph.initializers if name.split(".")[0] in ("q", "k", "v")]  # all moved
    packed = {"float": ["q+k+v.weight"], "int8": ["q+k+v.weight.int8", "q+k+v.weight.scale"],
              "int4": ["q+k+v.weight.int4", "q+k+v.weight.scale", "q+k+v.weight.zero_point"]}[weights]
    assert set(packed) <= set(model.graph.initializers)  # named after the parameters they hold
    for got, want in zip(_run(model), before):
        np.testing.assert_array_equal(got, want)
    assert pack_linears(model) == 0  # nothing left to pack


def test_weights_of_different_forms_are_not_packed():
    model = _graph()
    q = [layer for layer in linear_layers(model) if layer.weight_name == "q.weight"]
    quantize_weights(model, q, WeightFormat(32, symmetric=True, bits=8))  # q int8, k and v float: k and v pack
    before = _run(model)
    assert pack_linears(model) == 1
    assert [node.op_type for node in model.graph].count("MatMul") == 3
    for got, want in zip(_run(model), before):
        np.testing.assert_array_equal(got, want)
