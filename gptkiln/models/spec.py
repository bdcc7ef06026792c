"""DecoderSpec: the architecture facts gptkiln needs, read from the model config only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptkiln.errors import UnsupportedModelError

# model_type -> family name. Each one has a parity test (tests/test_architectures.py).
SUPPORTED_MODEL_TYPES = {
    "gpt2": "GPT-2",
    "gpt_neo": "GPT-Neo",
    "gptj": "GPT-J",
    "gpt_neox": "GPT-NeoX",
    "gpt_bigcode": "GPT-BigCode",
    "llama": "Llama",
    "qwen2": "Qwen2",
}


def supported_list() -> str:
    return ", ".join(f"{name} ({key})" for key, name in SUPPORTED_MODEL_TYPES.items())


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    sliding_window: int | None  # set when some layers use sliding-window attention
    activation: str  # the MLP activation as transformers names it ("gelu_new", "silu", ...)

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_spec(config) -> DecoderSpec:
    """Read every architecture parameter from a transformers config; refuse what we cannot export."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"'{model_type}' is an encoder-decoder model; gptkiln exports decoder-only causal LMs",
            f"use a decoder-only model: {supported_list()}",
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not a supported decoder-only causal LM",
            f"use one of: {supported_list()}",
        )
    num_heads = config.num_attention_heads
    hidden = config.hidden_size
    if getattr(config, "multi_query", False):  # GPT-BigCode
        num_kv_heads = 1
    else:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
    return DecoderSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_window=window,
        activation=getattr(config, "activation_function", None) or getattr(config, "hidden_act", "") or "",
    )
