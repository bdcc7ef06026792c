import onnx_ir as ir

from gptkiln.graph import gemm_to_matmul


def test_every_linear_layer_becomes_matmul_add(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    count = gemm_to_matmul.FUSION.apply(model, spec)
    assert count.actual == 4 * spec.num_layers  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert not [n for n in model.graph if n.op_type == "Gemm"]


def test_a_transposing_gemm_is_left_alone_and_the_reason_says_so(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    gemm.attributes["transB"] = ir.AttrInt64("transB", 1)
    assert gemm_to_matmul.FUSION.apply(model, spec).actual == 4 * spec.num_layers - 1
    assert "Gemm transposes an input" in gemm_to_matmul.FUSION.why_not(model)
