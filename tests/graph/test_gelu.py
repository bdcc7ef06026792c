import onnx_ir as ir
import pytest

from gptkiln.graph import fast_gelu, gelu, gemm_to_matmul


@pytest.fixture(scope="module")
def opset20_export(tmp_path_factory):
    from gptkiln.exporter.to_onnx import export_onnx
    from gptkiln.models.loading import load_model

    loaded = load_model("reference")
    return export_onnx(loaded, tmp_path_factory.mktemp("opset20"), opset=20).path, loaded.spec


def test_opset20_graph_gets_standard_gelu(opset20_export):
    path, spec = opset20_export
    model = ir.load(path)
    count = gelu.FUSION.apply(model, spec)
    assert count.actual == count.expected == spec.num_layers
    gelus = [n for n in model.graph if n.op_type == "Gelu"]
    assert len(gelus) == spec.num_layers and {n.domain for n in gelus} == {""}
    assert {n.attributes["approximate"].value for n in gelus} == {"tanh"}


def test_opset18_graph_keeps_the_decomposed_form_and_says_why(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    assert gelu.FUSION.apply(model, spec).actual == 0
    assert gelu.FUSION.expected(spec, 18) is None
    assert "Gelu needs opset 20" in gelu.FUSION.why_not(model)


def test_onnxruntime_turns_the_portable_gelu_into_fast_gelu_with_bias(opset20_export):
    path, spec = opset20_export
    model = ir.load(path)
    gemm_to_matmul.FUSION.apply(model, spec)
    gelu.FUSION.apply(model, spec)
    assert fast_gelu.FUSION.apply(model, spec).actual == spec.num_layers
    assert not [n for n in model.graph if n.op_type == "Gelu"]
    assert all(len(n.inputs) == 2 for n in model.graph if n.op_type == "FastGelu")
