"""Scales stored in fp16: half the bytes on disk, the same numbers in every runtime, kept through cleanup."""

import numpy as np
import onnx_ir as ir
import pytest

from gptkiln.graph.cleanup import cleanup
from gptkiln.graph.initializers import (constant_array, fold_half_constants, half_constant, half_exact, initializer,
                                        stored_half)

K, N, BLOCK = 64, 48, 32
RNG = np.random.default_rng(0)
CODES = RNG.integers(-127, 128, (K, N)).astype(np.int8)
SCALES = half_exact(RNG.uniform(1e-3, 2e-2, (K // BLOCK, N)).astype(np.float32))
X = RNG.standard_normal((3, K)).astype(np.float32)
EXPECTED = X @ (CODES.astype(np.float32) * np.repeat(SCALES, BLOCK, axis=0))


def _graph() -> ir.Model:
    """y = x @ DequantizeLinear(int8 codes, Cast(fp16 scales)), blocks of 32 along K."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["rows", K]))
    graph.inputs.append(x)
    scale = half_constant(model, "w.scale", SCALES)
    dequantize = ir.node("DequantizeLinear", [initializer(model, "w.int8", CODES), scale.outputs[0]],
                         attributes={"axis": 0, "block_size": BLOCK})
    matmul = ir.node("MatMul", [x, dequantize.outputs[0]])
    graph.extend([scale, dequantize, matmul])
    matmul.outputs[0].name = "y"
    graph.outputs.append(matmul.outputs[0])
    return model


def test_half_exact_rounds_to_fp16_and_keeps_scales_positive():
    values = np.array([0.1, 1e-12, 0.0, 3.0e-5], np.float32)
    rounded = half_exact(values)
    assert rounded.dtype == np.float32 and (rounded > 0).all()
    assert np.array_equal(rounded.astype(np.float16).astype(np.float32), rounded)
    assert abs(rounded[0] - 0.1) <= 0.1 * 2**-11  # nearest: half an fp16 step
    with pytest.raises(ValueError, match="not fp16-exact"):
        half_constant(_graph(), "bad", np.array([0.1], np.float32))


def test_onnx_runtime_fuses_half_scales_into_matmul_nbits(tmp_path):
    import onnx
    import onnxruntime as ort

    model = _graph()
    assert model.graph.initializers["w.scale"].dtype == ir.DataType.FLOAT16
    np.testing.assert_array_equal(constant_array(model.graph.node(1).inputs[1]), SCALES)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    assert [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["MatMulNBits"]
    got = session.run(None, {"x": X})[0]
    assert np.abs(got - EXPECTED).max() <= 0.02 * np.abs(EXPECTED).max()  # accuracy level 4: int8 activations
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DequantizeLinear + MatMul: exact
    np.testing.assert_allclose(ort.InferenceSession(proto, plain, providers=["CPUExecutionProvider"]).run(
        None, {"x": X})[0], EXPECTED, rtol=1e-5, atol=1e-5)


def test_openvino_computes_with_half_scales():
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Core().read_model(ir.serde.serialize_model(_graph()).SerializeToString(),
                                                              b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    np.testing.assert_allclose(compiled({"x": X})[0], EXPECTED, rtol=1e-4, atol=1e-4)


def test_cleanup_keeps_half_scales_and_trt_folds_them_back():
    model = _graph()
    cleanup(model)  # onnxscript would fold a Cast of 96 values
    (scale,) = [v for v in model.graph.node(1).inputs[1:]]
    assert stored_half(scale) is not None and "w.scale" in model.graph.initializers
    assert fold_half_constants(model) == 1
    folded = model.graph.initializers["w.scale"]
    assert folded.dtype == ir.DataType.FLOAT and [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]
    np.testing.assert_array_equal(folded.const_value.numpy(), SCALES)
