import onnx_ir as ir

from gptkiln.graph import skip_layer_norm


def test_every_residual_norm_fuses_and_keeps_the_sum(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    count = skip_layer_norm.FUSION.apply(model, spec)
    assert count.actual == count.expected == 2 * spec.num_layers + 1
    skips = [n for n in model.graph if n.op_type == "SkipLayerNormalization"]
    # all but the final norm feed the next residual Add through output 3 (input + skip)
    assert sum(1 for n in skips if n.outputs[3].uses()) == 2 * spec.num_layers


def test_the_outputs_nobody_reads_are_left_out_of_the_file(fresh_graph, reference_export):
    """ONNX Runtime computes every named output: the mean and inverse std, and the final norm's sum, go unnamed."""
    model, spec = fresh_graph(), reference_export[1]
    skip_layer_norm.FUSION.apply(model, spec)
    assert skip_layer_norm.unname_statistics(model) == 2 * (2 * spec.num_layers + 1) + 1
    protos = [n for n in ir.serde.serialize_model(model).graph.node if n.op_type == "SkipLayerNormalization"]
    outputs = [list(n.output) + [""] * (4 - len(n.output)) for n in protos]  # trailing empty ones are left out
    assert all(o[0] and o[1] == o[2] == "" for o in outputs)
    assert sum(o[3] != "" for o in outputs) == 2 * spec.num_layers


def test_a_norm_over_another_axis_is_not_fused(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    norm.attributes["axis"] = ir.AttrInt64("axis", 1)
    count = skip_layer_norm.FUSION.apply(model, spec)
    assert count.short and "not over the last axis" in count.reason


def test_a_broadcasting_residual_is_not_fused(fresh_graph, reference_export):
    model, spec = fresh_graph(), reference_export[1]
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    add = norm.inputs[0].producer()
    add.inputs[1].shape = ir.Shape([add.inputs[1].shape[0], 1, spec.hidden_size])  # [batch, 1, hidden]
    count = skip_layer_norm.FUSION.apply(model, spec)
    assert count.short and "would broadcast" in count.reason
