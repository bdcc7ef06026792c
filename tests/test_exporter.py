"""The exported graph honours the IO contract and the structural promises of the exporter."""

from __future__ import annotations

import numpy as np
import onnx

from gptkiln.config import BuildConfig
from gptkiln.exporter import io_spec

MODEL = "onnxruntime/model.onnx"


def load_graph(output):
    return onnx.load(str(output / MODEL), load_external_data=False)


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_inputs_and_outputs_follow_the_contract(reference_build):
    result, output = reference_build
    model = load_graph(output)
    expected_in, expected_out = io_spec.inputs(result.spec), io_spec.outputs(result.spec)
    # the onnxruntime engine adds num_logits_to_keep (gptkiln.graph.last_logits) after the contract's inputs
    assert [i.name for i in model.graph.input] == [t.name for t in expected_in] + [io_spec.LOGITS_TO_KEEP]
    assert [o.name for o in model.graph.output] == [t.name for t in expected_out]
    for value, tensor in zip([*model.graph.input[:-1], *model.graph.output], [*expected_in, *expected_out]):
        assert dims(value) == list(tensor.shape), value.name
    assert dims(model.graph.input[-1]) == [1]
    assert dims(model.graph.input[0]) == ["batch", "sequence"]
    assert dims(model.graph.output[1]) == ["batch", result.spec.num_kv_heads, "past_sequence+sequence",
                                           result.spec.head_dim]


def test_one_straight_line_graph_at_the_requested_opset(reference_build):
    _, output = reference_build
    model = load_graph(output)
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"If", "Loop", "Scan"}
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {BuildConfig.opset}
    # opset 23 exports one Attention per layer; the onnxruntime engine runs each as one GroupQueryAttention
    assert sum(node.op_type == "GroupQueryAttention" for node in model.graph.node) == 4


def test_weights_live_in_external_data_and_tied_embeddings_stay_one_tensor(reference_build):
    result, output = reference_build
    model = load_graph(output)
    spec = result.spec
    embedding_sized = [t.name for t in model.graph.initializer
                       if sorted(t.dims) == sorted([spec.vocab_size, spec.hidden_size])]
    assert len(embedding_sized) == 1, embedding_sized
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
               if np.prod(t.dims) >= 1024)
    data_size = (output / (MODEL + ".data")).stat().st_size
    parameters = sum(p.numel() for p in _reference_parameters())
    assert data_size < parameters * 4 * 1.05  # no duplicated weight tensor


def _reference_parameters():
    from gptkiln.models.loading import load_model

    return load_model("reference").model.parameters()


def test_prefill_with_empty_past_and_decode_with_batch_8(reference_build):
    """past = 0 and a batch larger than any seen at export time both run."""
    from gptkiln.runtime.generate import GenerationConfig, generate
    from gptkiln.targets import get_target

    result, output = reference_build
    runner = get_target("onnxruntime").load(output / "onnxruntime", result.spec)
    prompts = [[5 + i] * (1 + i) for i in range(8)]  # lengths 1..8: seven rows padded
    config = GenerationConfig(max_new_tokens=4)
    tokens = generate(runner, prompts, config)
    assert tokens == [generate(runner, [p], config)[0] for p in prompts]


def test_every_weight_is_named_after_the_parameter_it_came_from(tiny_model_dir, tmp_path):
    """No `val_N` weights: the same tensor as a parameter takes its name, a transposed copy the name + '.T'.
    The quantization fallback's groups then follow the layer roles across the blocks (the DecoderSpec), plus the
    lm_head."""
    import onnx_ir as ir

    from gptkiln.calibration.layers import linear_layers
    from gptkiln.exporter.to_onnx import export_onnx
    from gptkiln.models.loading import load_model

    loaded = load_model(str(tiny_model_dir("llama")))
    graph = ir.load(export_onnx(loaded, tmp_path, opset=23).path)
    parameters = {name: tensor.detach().numpy() for name, tensor in loaded.model.state_dict().items()}
    weights = {name: value.const_value.numpy() for name, value in graph.graph.initializers.items()
               if value.const_value is not None and value.const_value.size >= 64}
    assert len(weights) >= 7 * loaded.spec.num_layers + 2
    for name, array in weights.items():
        source = name.removesuffix(".T")
        assert source in parameters, name
        np.testing.assert_array_equal(array, parameters[source].T if name.endswith(".T") else parameters[source])
    roles = {layer.role(loaded.spec) for layer in linear_layers(graph)}
    assert roles == {f"model.layers.*.{name}.weight" for name in ("self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {
                     "lm_head.weight"}
