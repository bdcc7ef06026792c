"""GPT-2 small's shape (124M, 12 layers) end to end: the size the exporter has to be fast on."""

from __future__ import annotations

from gptkiln.config import BuildConfig
from gptkiln.pipeline import build


def test_gpt2_small_preset_passes_fp32_parity(tmp_path):
    result = build(BuildConfig(model="preset:gpt2", output=tmp_path / "out"))
    assert result.ok, result.targets[0].failures
    assert (result.spec.num_layers, result.spec.hidden_size, result.spec.vocab_size) == (12, 768, 50257)
    data = (tmp_path / "out" / "onnxruntime" / "model.onnx.data").stat().st_size
    assert data < 124.5e6 * 4 * 1.02  # 124.4M parameters once: the tied lm_head is not duplicated
