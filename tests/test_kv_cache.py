"""The wrapper's 4D mask against a brute-force reading of its definition."""

from __future__ import annotations

import itertools

import pytest
import torch

from gptkiln.exporter.kv_cache import attention_bias


@pytest.mark.parametrize("past,seq,window", [(0, 5, None), (4, 1, None), (3, 4, None), (6, 3, 4), (0, 6, 2)])
def test_attention_bias_is_causal_padding_aware_and_windowed(past, seq, window):
    total = past + seq
    padding = torch.ones(2, total, dtype=torch.int64)
    padding[1, :2] = 0  # row 1 is left-padded by two
    bias = attention_bias(padding, seq, torch.float32, window)
    assert bias.shape == (2, 1, seq, total)
    minimum = torch.finfo(torch.float32).min
    for row, i, j in itertools.product(range(2), range(seq), range(total)):
        query = past + i
        allowed = j <= query and padding[row, j] == 1 and (window is None or query - j < window)
        assert bias[row, 0, i, j].item() == (0.0 if allowed else minimum), (row, i, j)


def _native_and_wrapped(model, spec, input_ids, attention_mask):
    from gptkiln.exporter.kv_cache import KVCacheDecoder

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    empty = [torch.zeros(input_ids.shape[0], spec.num_kv_heads, 0, spec.head_dim) for _ in range(2 * spec.num_layers)]
    with torch.no_grad():
        native = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        wrapped = KVCacheDecoder(model, spec)(input_ids, attention_mask, position_ids, *empty)[0]
    keep = attention_mask.bool()
    return native[keep], wrapped[keep]


def _tiny(model_type, **overrides):
    import transformers

    from conftest import TINY_CONFIGS, VOCAB

    class_name, fields = TINY_CONFIGS[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(vocab_size=VOCAB, pad_token_id=0, **{**fields, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _families():
    from conftest import TINY_CONFIGS

    return sorted(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", _families())
def test_wrapper_matches_the_transformers_forward(model_type):
    """Our mask + cache path computes what transformers computes with its own, padding included."""
    from gptkiln.models.spec import decoder_spec

    model = _tiny(model_type)
    input_ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 20, dtype=torch.int64)
    attention_mask[1, :6] = 0
    native, wrapped = _native_and_wrapped(model, decoder_spec(model.config), input_ids, attention_mask)
    torch.testing.assert_close(wrapped, native, rtol=1e-4, atol=1e-5)


def test_sliding_window_layers_get_the_window_mask():
    from gptkiln.models.spec import decoder_spec

    model = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    spec = decoder_spec(model.config)
    assert spec.sliding_window == 4
    input_ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    native, wrapped = _native_and_wrapped(model, spec, input_ids, torch.ones(1, 16, dtype=torch.int64))
    torch.testing.assert_close(wrapped, native, rtol=1e-4, atol=1e-5)
