"""SmolLM2-135M-Instruct from its GGUF file: a real trained Llama through the whole fp32 pipeline on every CPU
target, and the engines generate what transformers' own generate() does (the build: conftest's smollm2_build)."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = "def fibonacci(n):"


def test_smollm2_gguf_passes_the_fp32_gate_on_every_cpu_target(smollm2_build, smollm2_gguf):
    from gptkiln.manifest import read_manifest, sha256_file

    result, output = smollm2_build
    assert result.ok, [t.failures for t in result.targets]
    spec = result.spec
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llama", 30, 9, 3, 64)
    assert spec.tied_embeddings and spec.vocab_size == 49152 and spec.blocks_path == "model.layers"
    model = read_manifest(output)["model"]
    assert model["kind"] == "gguf" and model["sha256"] == sha256_file(smollm2_gguf)
    assert model["gguf"]["tensor_types"]["Q4_1"] > 200  # as published
    for target in result.targets:
        comparisons = {c.name: c.rel for c in target.parity.comparisons}
        assert comparisons["batch1/logits"] <= 1e-4 and comparisons["padded/logits"] <= 1e-4, target.name
        assert not [f for f in target.settings["fusion"]["fusions"] if f["short"]], target.name


def test_smollm2_weights_keep_their_names_and_group_by_role(smollm2_build):
    import onnx_ir as ir

    from gptkiln.calibration.layers import linear_layers

    result, output = smollm2_build
    graph = ir.load(output / "onnxruntime" / "model.onnx")
    assert not [n for n, v in graph.graph.initializers.items() if n.startswith("val_") and v.const_value.size >= 64]
    layers = linear_layers(graph)
    roles = {layer.role(result.spec) for layer in layers}  # 7 linear layers of every block, and the (tied) lm_head
    assert roles == {"model.layers.*.self_attn.q_proj+k_proj+v_proj.weight", "model.layers.*.self_attn.o_proj.weight",
                     "model.layers.*.mlp.gate_proj+up_proj.weight", "model.layers.*.mlp.down_proj.weight",
                     "model.embed_tokens.weight"}  # packed where they share an input (graph.packed_linears), named
    assert {result.spec.block_of(layer.name) for layer in layers} == {*range(30), None}


@pytest.fixture(scope="module")
def transformers_continuation(smollm2_gguf) -> tuple[list[int], list[int]]:
    """(prompt ids, 32 greedy tokens) from transformers' own generate(), not gptkiln's KV-cache wrapper."""
    import torch

    from gptkiln.models.loading import load_model

    loaded = load_model(str(smollm2_gguf))
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        native = loaded.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
    return ids, native[0, len(ids):].tolist()


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_smollm2_engines_generate_what_transformers_generates(smollm2_build, transformers_continuation, target):
    from gptkiln.runtime.generate import GenerationConfig, generate
    from gptkiln.runtime.session import open_output

    _, output = smollm2_build
    ids, expected = transformers_continuation
    ours = generate(open_output(output, target).runner, [ids], GenerationConfig(max_new_tokens=32))[0]
    assert ours == expected
    assert np.unique(ours).size > 4  # a real continuation, not one token repeated


def test_smollm2_chat_is_what_transformers_chat_generates(smollm2_build, smollm2_gguf):
    """--chat: the model's template applied without transformers, and generation stops at the model's end-of-turn."""
    import torch

    import gptkiln
    from gptkiln.models.loading import load_model

    _, output = smollm2_build
    message = "What is the capital of France?"
    loaded = load_model(str(smollm2_gguf))
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    with torch.no_grad():
        native = loaded.model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
    expected = loaded.tokenizer.decode(native[0, len(ids):], skip_special_tokens=True)
    reply = gptkiln.load(output, "onnxruntime").generate(message, chat=True, max_new_tokens=48)
    assert reply == expected and "Paris" in reply
    assert native.shape[1] - len(ids) < 48  # it stopped at <|im_end|>, and so did gptkiln


def test_a_gguf_checkpoint_compresses_into_a_standard_checkpoint(smollm2_gguf, calibration_text, tmp_path):
    """transformers marks a GGUF load quantized and would refuse to save it: compress must write it anyway."""
    import json

    import gptkiln

    result = gptkiln.compress(str(smollm2_gguf), tmp_path / "sparse", calibration=calibration_text, sparsity="2:4",
                              calibration_samples=4, eval_tokens=1024, max_ppl_increase=1e6)
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert result.record["removed"]["sparsity"]["layers"] == 30 * 7  # q, k, v, o, gate, up, down in every block
