"""The lookup tables of a quantized build: stored by the quantize stage as a blocked DequantizeLinear in front of
Gather, gathered from the same codes by every runtime (ONNX Runtime after its lowering to GatherBlockQuantized,
OpenVINO as it is, TensorRT folded back to float)."""

import numpy as np
import onnx_ir as ir
import pytest

from gptkiln.graph.initializers import initializer
from gptkiln.graph.lookup_tables import (dequantize_lookup_tables, gather_block_quantized, quantize_lookup_tables,
                                         quantize_rows, table_block)

ROWS, WIDTH, BLOCK = 300, 576, 64
IDS = np.array([[0, 5, 299, 17]], np.int64)


def _embedding_graph(table: np.ndarray, opset: int = 21) -> ir.Model:
    """ids -> Gather(table) -> MatMul(w): an embedding and one linear layer; both outputs are graph outputs."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="g")
    model = ir.Model(graph, ir_version=10)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
    graph.inputs.append(ids)
    gather = ir.node("Gather", [initializer(model, "embed.weight", table), ids], name="embed")
    matmul = ir.node("MatMul", [gather.outputs[0], initializer(model, "w", np.full((table.shape[1], 8), 0.5, np.float32))])
    for node in (gather, matmul):
        graph.append(node)
    gather.outputs[0].name, matmul.outputs[0].name = "rows", "out"
    graph.outputs.extend([gather.outputs[0], matmul.outputs[0]])
    return model


def _table() -> np.ndarray:
    table = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(np.float32)
    table[0] = 0.0  # a padding row stays exactly zero
    return table


def _expected_rows(table: np.ndarray, bits: int) -> np.ndarray:
    codes, scales, zeros = quantize_rows(table, BLOCK, bits)
    rows = (codes.reshape(ROWS, -1, BLOCK) - zeros[..., None].astype(np.float32)) * scales[..., None]
    return rows.reshape(ROWS, WIDTH)[IDS[0]]


def _run_ort(model: ir.Model) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(["rows"], {"ids": IDS})[0][0]


@pytest.mark.parametrize("bits", [8, 4])
def test_a_table_is_stored_in_the_builds_bits_and_every_runtime_gathers_the_same_rows(bits, tmp_path):
    table = _table()
    model = _embedding_graph(table)
    assert quantize_lookup_tables(model, bits) == ["embed.weight"]
    assert "embed.weight" not in model.graph.initializers
    dequantize = next(node for node in model.graph if node.op_type == "DequantizeLinear")
    assert dequantize.attributes.get_int("block_size") == BLOCK and dequantize.attributes.get_int("axis") == 1
    assert dequantize.inputs[0].const_value.dtype == (ir.DataType.UINT8 if bits == 8 else ir.DataType.UINT4)
    expected = _expected_rows(table, bits)
    assert expected[0].tolist() == [0.0] * WIDTH
    # one step of a block's range per value, at most half of it off
    assert np.abs(expected - table[IDS[0]]).max() <= (table.max() - table.min()) / (2**bits - 1) * 0.5 + 1e-6
    np.testing.assert_allclose(_run_ort(model), expected, rtol=1e-6, atol=1e-6)  # the portable form, as it is

    ov = pytest.importorskip("openvino")
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled({"ids": IDS})["rows"][0], expected, rtol=1e-6, atol=1e-6)

    lowered = ir.from_proto(ir.to_proto(model))
    assert gather_block_quantized(lowered) == ["embed.weight.uint" + str(bits)]
    ops = [node.op_type for node in lowered.graph]
    assert "GatherBlockQuantized" in ops and "DequantizeLinear" not in ops and "Gather" not in ops
    packed = next(v for name, v in lowered.graph.initializers.items() if name.endswith(".packed")).const_value
    assert packed.dtype == ir.DataType.UINT8 and packed.shape[1] == WIDTH * bits // 8  # 4 bits: two codes a byte
    np.testing.assert_allclose(_run_ort(lowered), expected, rtol=1e-6, atol=1e-6)

    folded = ir.from_proto(ir.to_proto(model))
    assert dequantize_lookup_tables(folded) == ["embed.weight.uint" + str(bits)]
    assert [node.op_type for node in folded.graph] == ["Gather", "MatMul"]
    np.testing.assert_allclose(_run_ort(folded), expected, rtol=1e-6, atol=1e-6)


def test_a_table_read_by_a_matmul_too_and_a_graph_below_opset_21_stay_float():
    table = _table()
    model = _embedding_graph(table, opset=17)
    assert quantize_lookup_tables(model, 8) == [] and "embed.weight" in model.graph.initializers
    assert quantize_lookup_tables(_tied_graph(table), 8) == []  # a float lm_head reads it: the table stays too


@pytest.mark.parametrize("row, block", [(576, 64), (768, 128), (192, 64), (48, 16), (100, None)])
def test_block_is_the_largest_power_of_two_that_divides_the_row(row, block):
    assert table_block(row) == block


def _tied_graph(table: np.ndarray) -> ir.Model:
    """The embedding graph with a tied lm_head: logits = MatMul(rows, Transpose(table))."""
    model = _embedding_graph(table)
    transpose = ir.node("Transpose", [model.graph.initializers["embed.weight"]], attributes={"perm": [1, 0]})
    logits = ir.node("MatMul", [model.graph.outputs[0], transpose.outputs[0]])
    model.graph.extend([transpose, logits])
    logits.outputs[0].name = "logits"
    model.graph.outputs.append(logits.outputs[0])
    return model


@pytest.mark.parametrize("bits, symmetric", [(8, True), (4, False), (4, True)])
def test_a_tied_lm_head_and_its_table_share_one_copy_of_the_codes_on_every_runtime(bits, symmetric, tmp_path):
    """A weight-only lm_head tied to the embedding stores its codes once, as the table, and every runtime gathers
    the rows and computes the logits those codes stand for."""
    from gptkiln.calibration.layers import linear_layers, weight_bits
    from gptkiln.calibration.weight_only import WeightFormat, dequantize, quantize_rtn, quantize_weights

    table = _table()
    model = _tied_graph(table)
    (lm_head,) = [layer for layer in linear_layers(model) if layer.transposed]
    fmt = WeightFormat(32, symmetric, bits)
    codes, scales, zeros = quantize_rtn(table.T, fmt)
    weight = dequantize(codes.astype(np.float32), scales, zeros)  # [K, V], as the lm_head sees it
    result = quantize_weights(model, [lm_head], fmt)
    assert result.tied_tables == {"embed.weight": bits}
    assert "embed.weight" not in model.graph.initializers and quantize_lookup_tables(model, 8) == []
    codes_bits = {v.const_value.size * v.const_value.dtype.bitwidth for v in model.graph.initializers.values()
                  if v.name.startswith("embed.weight.int")}
    assert codes_bits == {ROWS * WIDTH * bits}  # one copy of the codes
    assert weight_bits(model)[1] < ROWS * WIDTH * (bits + 2)  # and nothing else the table's size
    rows = weight.T[IDS[0]]
    expected = {"rows": rows, "logits": rows @ weight}

    def check(outputs: dict, rtol: float = 1e-5):
        for name, want in expected.items():
            np.testing.assert_allclose(outputs[name].reshape(want.shape), want, rtol=rtol, atol=rtol * np.abs(want).max())

    import onnxruntime as ort

    def run_ort(graph: ir.Model, fuse: bool = True) -> dict:
        options = ort.SessionOptions()
        if not fuse:  # ORT's own DequantizeLinear -> MatMul fusion rounds the activations to int8, as lowering does
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(ir.serde.serialize_model(graph).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        return dict(zip(["rows", "logits"], session.run(["rows", "logits"], {"ids": IDS})))

    check(run_ort(model))  # the portable form
    lowered = ir.from_proto(ir.to_proto(model))
    assert gather_block_quantized(lowered) == [f"embed.weight.int{bits}"]
    ops = [node.op_type for node in lowered.graph]
    assert {"GatherBlockQuantized", "MatMulNBits"} <= set(ops) and not {"DequantizeLinear", "Transpose"} & set(ops)
    (matmul,) = [node for node in lowered.graph if node.op_type == "MatMulNBits"]
    (gather,) = [node for node in lowered.graph if node.op_type == "GatherBlockQuantized"]
    assert matmul.inputs[1] is gather.inputs[0]  # one initializer
    check(run_ort(lowered), rtol=2e-2)  # MatMulNBits at accuracy level 4 rounds the activations to int8

    folded = ir.from_proto(ir.to_proto(model))
    assert dequantize_lookup_tables(folded) == [f"embed.weight.int{bits}"]
    assert [node.op_type for node in folded.graph] == ["Gather", "MatMul", "DequantizeLinear", "MatMul"]
    check(run_ort(folded, fuse=False))

    ov = pytest.importorskip("openvino")
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                           "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"})  # as gptkiln's
    check({name: compiled({"ids": IDS})[name] for name in expected})
