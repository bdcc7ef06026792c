import numpy as np
import onnx_ir as ir
import pytest

from gptkiln.graph.initializers import initializer
from gptkiln.graph.lookup_tables import quantize_lookup_tables, table_block


def _embedding_graph(table: np.ndarray, weight_dtype=np.int8) -> ir.Model:
    """ids -> Gather(table) -> MatMul(DequantizeLinear(w)): an embedding and one quantized linear layer."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
    graph.inputs.append(ids)
    width = table.shape[1]
    table_value = initializer(model, "embed.weight", table)
    codes = initializer(model, "w.int8", np.ones((width, 8), weight_dtype))
    scale = initializer(model, "w.scale", np.full((8,), 0.5, np.float32))
    gather = ir.node("Gather", [table_value, ids], name="embed")
    weight = ir.node("DequantizeLinear", [codes, scale], attributes={"axis": 1})
    matmul = ir.node("MatMul", [gather.outputs[0], weight.outputs[0]])
    for node in (gather, weight, matmul):
        graph.append(node)
    matmul.outputs[0].name = "out"
    graph.outputs.append(matmul.outputs[0])
    return model


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


def test_a_quantized_build_gathers_from_a_uint8_table_with_the_same_result():
    table = np.random.default_rng(0).standard_normal((300, 576)).astype(np.float32)
    table[0] = 0.0  # a padding row stays exactly zero
    ids = np.array([[0, 5, 299, 17]], np.int64)
    before = _run(_embedding_graph(table), ids)
    model = _embedding_graph(table)
    assert quantize_lookup_tables(model) == ["embed.weight"]
    ops = [node.op_type for node in model.graph]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops and "embed.weight" not in model.graph.initializers
    assert model.graph.initializers["embed.weight.uint8"].const_value.dtype == ir.DataType.UINT8
    after = _run(model, ids)
    assert after[0, 0].tolist() == [0.0] * 8
    # one uint8 step of a block's range per value, at most half of it off: |error| <= range / 510 per element
    assert np.abs(after - before).max() <= 576 * (table.max() - table.min()) / 510 * 0.5


def test_fp32_weights_keep_their_tables_exact():
    table = np.ones((10, 64), np.float32)
    model = _embedding_graph(table, weight_dtype=np.float32)
    assert quantize_lookup_tables(model) == [] and "embed.weight" in model.graph.initializers


@pytest.mark.parametrize("row, block", [(576, 64), (768, 128), (192, 64), (48, 16), (100, None)])
def test_block_is_the_largest_power_of_two_that_divides_the_row(row, block):
    assert table_block(row) == block
