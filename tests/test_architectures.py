"""Every tested family: a tiny random model exported, compiled for every CPU target and held to the fp32 gate,
with the graph each one should get (normalization, rotary and attention ops, GQA without repeated K/V)."""

from __future__ import annotations

import pytest

from gptkiln.config import BuildConfig
from gptkiln.models.spec import TESTED_FAMILIES
from gptkiln.pipeline import build
from gptkiln.targets import get_target

from conftest import TINY_CONFIGS, VOCAB

CPU_TARGETS = ("onnxruntime", "openvino", "openvino-stateless")
# What each family's graph must show (expected counts must be claimed, and met). Facts of the families:
RMS_NORM = {"llama", "qwen2", "mistral", "qwen3", "phi3", "gemma2", "gemma3_text"}
ROTARY = RMS_NORM | {"gpt_neox", "falcon", "phi"}  # GPT-J rotates interleaved pairs: not claimed
EAGER_ATTENTION = {"gpt_neo", "gemma2"}  # GPT-Neo's local attention, Gemma 2's soft-capping
# ONNX Runtime keeps the Concat cache where the attention is not one op on transposed heads: eager attention,
# partial rotary spliced with Concat (GPT-NeoX, Phi), the output reshaped before its transpose (Phi, Phi-3),
# K/V without a head transpose (GPT-BigCode's single KV head; Falcon's had none in earlier transformers releases,
# transformers 5.25 exports it with one)
KV_CONCAT = EAGER_ATTENTION | {"gpt_neox", "phi", "phi3", "gpt_bigcode"}
GROUPED_KV = {"llama", "qwen2", "mistral", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt_bigcode", "falcon"}


def test_every_tested_family_has_a_parity_test():
    assert set(TINY_CONFIGS) == set(TESTED_FAMILIES)


def claimed(result, target: str) -> dict[str, tuple]:
    fusions = next(t for t in result.targets if t.name == target).settings["fusion"]["fusions"]
    return {f["name"]: (f["expected"], f["actual"]) for f in fusions}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_family_passes_fp32_parity_on_every_cpu_target(model_type, tiny_model_dir, tmp_path,
                                                       prefill_in_passes_matches_one_pass):
    result = build(BuildConfig(model=str(tiny_model_dir(model_type)), output=tmp_path / "out", targets=CPU_TARGETS))
    assert result.ok, [t.failures for t in result.targets]
    assert result.spec.model_type == model_type and result.spec.tested
    layers = result.spec.num_layers
    for target in result.targets:
        comparisons = {c.name: c for c in target.parity.comparisons}
        assert comparisons["batch1/logits"].rel <= 1e-4 and comparisons["padded/logits"].rel <= 1e-4, target.name
        assert all(g.matched == g.tokens == 32 for g in target.parity.greedy), target.name
        short = [f for f in target.settings["fusion"]["fusions"] if f["short"]]
        assert not short, (target.name, short)  # a fusion that stopped matching fails here, the day it happens
        # generation's prompt passes (Runner.prefill) through every cache form: Concat, in-place, state, arrays
        prefill_in_passes_matches_one_pass(get_target(target.name).load(tmp_path / "out" / target.name, result.spec),
                                           1e-4)
    ort, openvino = claimed(result, "onnxruntime"), claimed(result, "openvino")
    for counts in (ort, openvino):
        assert (counts["rms_normalization"][0] is not None) == (model_type in RMS_NORM)
        assert counts["rotary_embedding"][0] == (2 * layers if model_type in ROTARY else None)
        assert counts["onnx_attention"][0] == (None if model_type in EAGER_ATTENTION else layers)
        assert counts["gqa_attention"][0] == (layers if model_type in GROUPED_KV - EAGER_ATTENTION else None)
    assert ort["skip_rms_norm"][0] == (2 * layers if model_type in RMS_NORM else None)
    ort_settings = next(t for t in result.targets if t.name == "onnxruntime").settings
    assert ort_settings["kv_cache"] == ("concat" if model_type in KV_CONCAT else "in-place"), ort_settings
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_gqa_attention_reads_the_cache_without_repeating_it(tiny_model_dir, tmp_path):
    """No Expand or Concat touches the cache: on ONNX Runtime each layer is one GroupQueryAttention reading
    kv_num_heads (2 of 4 here) straight from its past input and writing its present (no Reshape after it); the portable graph's
    Attention nodes (what OpenVINO compiles) take the same K/V heads from the Concat of past and new."""
    import onnx_ir as ir

    from gptkiln.exporter.io_spec import past_names

    result = build(BuildConfig(model=str(tiny_model_dir("llama")), output=tmp_path / "out",
                               targets=("onnxruntime", "openvino")))
    assert result.ok
    graph = ir.load(tmp_path / "out" / "onnxruntime" / "model.onnx").graph
    gqa = [node for node in graph if node.op_type == "GroupQueryAttention"]
    assert len(gqa) == result.spec.num_layers and not [n for n in graph if n.op_type in ("Attention", "Concat")
                                                          and n.outputs[0].name.startswith("present")]
    pasts = {value.name: value for value in graph.inputs}
    for layer, node in enumerate(gqa):
        assert node.attributes["kv_num_heads"].value == result.spec.num_kv_heads == 2
        assert [v.name for v in node.inputs[3:5]] == past_names(result.spec.num_layers)[2 * layer: 2 * layer + 2]
        assert all(node.inputs[i] is pasts[node.inputs[i].name] for i in (3, 4))
    assert not [node for node in graph if node.op_type == "Expand" and node.outputs[0].dtype != ir.DataType.INT64]
    # its output is [batch, seq, hidden] already: o_proj reads it without the Reshape that merged the heads
    assert all(user.op_type != "Reshape" for node in gqa for user, _ in node.outputs[0].uses())


def test_a_family_outside_the_tested_list_is_exported_and_gated(tmp_path, capsys):
    """StarCoder2 (sliding window on every layer, LayerNorm with bias, GQA) is not in the tested list: it is
    built, gated, and the summary says it is untested."""
    import torch
    import transformers

    from gptkiln.cli import main
    from gptkiln.models.loading import REFERENCE_DIR

    config = transformers.Starcoder2Config(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                                           max_position_embeddings=128, sliding_window=8, bos_token_id=0,
                                           eos_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(tmp_path / "model")
    assert "starcoder2" not in TESTED_FAMILIES
    code = main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "'starcoder2' is not among the families gptkiln's suite tests" in out and "PASS" in out


def test_opset20_build_passes_parity_with_every_fusion(tmp_path):
    result = build(BuildConfig(model="reference", output=tmp_path / "out", opset=20))
    assert result.ok, result.targets[0].failures
    counts = {f["name"]: (f["expected"], f["actual"]) for f in result.targets[0].settings["fusion"]["fusions"]}
    layers = result.spec.num_layers
    assert counts["attention_with_kv_cache"] == (layers, layers)
    assert counts["fast_gelu"] == (layers, layers) and counts["gelu"] == (layers, layers)


def test_sliding_window_model_exports_and_passes_parity(tmp_path):
    """Qwen2 with a 6-token window on its second layer: the parity prompts (up to 24 tokens
    plus 16 decode steps) run far past the window, so a wrong window mask would show."""
    import torch
    import transformers

    _, fields = TINY_CONFIGS["qwen2"]
    config = transformers.Qwen2Config(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, use_sliding_window=True,
                                      sliding_window=6, max_window_layers=1, **fields)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained("gptkiln/models/reference").save_pretrained(tmp_path / "model")
    result = build(BuildConfig(model=str(tmp_path / "model"), output=tmp_path / "out"))
    assert result.spec.sliding_window == 6
    assert result.ok, result.targets[0].failures
