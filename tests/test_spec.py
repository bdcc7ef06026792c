"""DecoderSpec comes from the config alone, and unsupported models are refused by name."""

from __future__ import annotations

import pytest
import transformers

from gptkiln.errors import UnsupportedModelError
from gptkiln.models.spec import decoder_spec

from conftest import TINY_CONFIGS, VOCAB


def tiny_config(model_type):
    class_name, fields = TINY_CONFIGS[model_type]
    return getattr(transformers, class_name)(vocab_size=VOCAB, **fields)


@pytest.mark.parametrize("model_type,kv_heads", [("gpt2", 4), ("gpt_bigcode", 1), ("llama", 2), ("qwen2", 2),
                                                  ("gpt_neox", 4), ("gptj", 4), ("gpt_neo", 4)])
def test_spec_reads_heads_from_config(model_type, kv_heads):
    spec = decoder_spec(tiny_config(model_type))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, kv_heads, 16)
    assert spec.vocab_size == VOCAB and spec.max_positions == 128


def test_explicit_head_dim_wins():
    config = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                      hidden_size=64, head_dim=32)
    assert decoder_spec(config).head_dim == 32


def test_sliding_window_layers_are_recorded():
    config = transformers.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                      use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert decoder_spec(config).sliding_window == 16


@pytest.mark.parametrize("config", [transformers.BertConfig(), transformers.T5Config()])
def test_non_causal_models_are_refused_with_the_supported_list(config):
    with pytest.raises(UnsupportedModelError) as info:
        decoder_spec(config)
    assert "gpt2" in info.value.fix and "llama" in info.value.fix
