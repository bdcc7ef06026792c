"""DecoderSpec comes from the config (checked against the cache the model writes); what cannot work is
refused with the reason, and everything else is left to the gate."""

from __future__ import annotations

import pytest
import transformers

from gptkiln.errors import UnsupportedModelError
from gptkiln.models.spec import decoder_spec

from conftest import TINY_CONFIGS, VOCAB


BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gptj": "transformer.h", "gpt_bigcode": "transformer.h",
          "falcon": "transformer.h", "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


def tiny_config(model_type):
    class_name, fields = TINY_CONFIGS[model_type]
    return getattr(transformers, class_name)(vocab_size=VOCAB, pad_token_id=0, **fields)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_spec_from_the_config_matches_the_cache_the_model_writes(model_type):
    """model_spec runs one forward pass and reads the cache; the config reading must agree with it."""
    from gptkiln.models.loading import model_spec

    config = tiny_config(model_type)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    from_config, from_model = decoder_spec(config), model_spec(model)
    assert (from_config.num_kv_heads, from_config.head_dim) == (from_model.num_kv_heads, from_model.head_dim)
    assert from_model.num_layers == 2 and from_model.vocab_size == VOCAB and from_model.max_positions == 128
    assert from_model.blocks_path == BLOCKS.get(model_type, "model.layers")
    assert from_model.block_of(f"{from_model.blocks_path}.1.mlp.weight") == 1
    assert from_model.block_of("lm_head.weight") is None and from_model.block_of(f"{from_model.blocks_path}.x") is None


@pytest.mark.parametrize("model_type,kv_heads", [("gpt2", 4), ("gpt_bigcode", 1), ("llama", 2), ("falcon", 1),
                                                  ("opt", 4), ("gemma3_text", 2), ("phi", 4)])
def test_spec_reads_heads_from_config(model_type, kv_heads):
    spec = decoder_spec(tiny_config(model_type))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, kv_heads, 16)


def test_explicit_head_dim_wins():
    config = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                      hidden_size=64, head_dim=32)
    assert decoder_spec(config).head_dim == 32


def test_sliding_window_layers_are_recorded():
    config = transformers.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                      use_sliding_window=True, sliding_window=16, max_window_layers=1)
    spec = decoder_spec(config)
    assert spec.sliding_window == 16 and spec.per_layer_masks
    assert spec.layer_types == ("full_attention", "sliding_attention")


def test_a_window_on_every_layer_needs_no_per_layer_masks():
    spec = decoder_spec(tiny_config("mistral"))
    assert spec.sliding_window == 8 and spec.layer_types is None and not spec.per_layer_masks
    assert decoder_spec(tiny_config("qwen2")).sliding_window is None  # Qwen2's window is off by default


def test_spec_round_trips_through_its_dict():
    from gptkiln.models.spec import DecoderSpec

    spec = decoder_spec(tiny_config("gemma2"))
    assert DecoderSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k not in ("layer_types", "blocks_path", "rms_norms", "rotary",
                                                                 "sdpa")}
    assert DecoderSpec.from_dict(old).layer_types is None  # manifests written before these fields still read


@pytest.mark.parametrize("config,reason", [
    (transformers.BertConfig(), "encoder (masked-LM) model"),
    (transformers.RobertaConfig(), "encoder (masked-LM) model"),
    (transformers.T5Config(), "encoder-decoder model"),
    (transformers.MambaConfig(), "state is recurrent"),
    (transformers.RwkvConfig(), "state is recurrent"),
    (transformers.JambaConfig(), "mixes attention with linear_attention layers"),
    (transformers.Qwen3NextConfig(), "mixes attention with linear_attention layers"),
    (transformers.ViTConfig(), "no causal-LM class"),
])
def test_what_cannot_work_is_refused_with_the_reason(config, reason):
    with pytest.raises(UnsupportedModelError) as info:
        decoder_spec(config)
    assert reason in info.value.cause
    assert "Llama" in info.value.fix  # the tested families, for the next step
