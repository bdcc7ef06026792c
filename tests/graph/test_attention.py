import onnx_ir as ir

from gptkiln.graph import attention, gemm_to_matmul


def test_each_layer_becomes_one_multihead_attention_with_its_cache(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    count = attention.FUSION.apply(model, spec)
    assert (count.expected, count.actual) == (spec.num_layers, spec.num_layers)
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(mha) == spec.num_layers and not [n for n in model.graph if n.op_type == "Softmax"]
    assert {n.attributes["num_heads"].value for n in mha} == {spec.num_heads}
    # the op writes the cache: present.{i}.key/value are its outputs now
    presents = {o.name for n in mha for o in n.outputs}
    assert {f"present.{i}.key" for i in range(spec.num_layers)} <= presents


def test_fuses_after_gemm_rewrite_too(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    gemm_to_matmul.FUSION.apply(model, spec)
    assert attention.FUSION.apply(model, spec).actual == spec.num_layers


def test_a_softmax_over_another_axis_is_not_attention_and_the_report_says_where(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 1)
    count = attention.FUSION.apply(model, spec)
    assert count.short and count.actual == spec.num_layers - 1
    assert "Softmax" in count.reason or "axis" in count.reason, count.reason


def test_only_verified_families_expect_fusion():
    from dataclasses import replace

    from gptkiln.models.spec import decoder_spec
    from transformers import GPT2Config

    spec = decoder_spec(GPT2Config(n_layer=2))
    assert attention.FUSION.expected(spec, 18) == 2
    assert attention.FUSION.expected(replace(spec, num_kv_heads=4), 18) is None  # grouped-query
    assert attention.FUSION.expected(replace(spec, model_type="gptj"), 18) is None
