"""Every supported family: a tiny random model exported, compiled and held to the fp32 parity gate."""

from __future__ import annotations

import pytest

from gptkiln.config import BuildConfig
from gptkiln.models.spec import SUPPORTED_MODEL_TYPES
from gptkiln.pipeline import build

from conftest import TINY_CONFIGS


def test_every_supported_family_has_a_parity_test():
    assert set(TINY_CONFIGS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_family_passes_fp32_parity_on_onnxruntime(model_type, tiny_model_dir, tmp_path):
    result = build(BuildConfig(model=str(tiny_model_dir(model_type)), output=tmp_path / "out"))
    assert result.ok, result.targets[0].failures
    assert result.spec.model_type == model_type
    comparisons = {c.name: c for c in result.targets[0].parity.comparisons}
    assert comparisons["batch1/logits"].rel <= 1e-4
    assert comparisons["padded/logits"].rel <= 1e-4
    assert all(g.matched == g.tokens == 32 for g in result.targets[0].parity.greedy)
    assert (tmp_path / "out" / "manifest.json").is_file()
    fusion = result.targets[0].settings["fusion"]["fusions"]
    short = [f for f in fusion if f["short"]]
    assert not short, short  # a fusion that stopped matching fails here, the day it happens


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

    from conftest import TINY_CONFIGS, VOCAB

    _, fields = TINY_CONFIGS["qwen2"]
    config = transformers.Qwen2Config(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, use_sliding_window=True,
                                      sliding_window=6, max_window_layers=1, **fields)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    transformers.AutoTokenizer.from_pretrained("gptkiln/models/reference").save_pretrained(tmp_path / "model")
    result = build(BuildConfig(model=str(tmp_path / "model"), output=tmp_path / "out"))
    assert result.spec.sliding_window == 6
    assert result.ok, result.targets[0].failures
