"""DecoderSpec: the architecture facts gptkiln needs, read from the model config.

No list of families decides what is exported: any decoder-only causal LM whose transformers
implementation runs on a per-layer key/value cache goes through the KV-cache wrapper, and the
parity gate decides whether the build is good. What cannot work is refused with the reason:
encoder-only and encoder-decoder models, and models whose state is not a KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptkiln.errors import UnsupportedModelError

# model_type -> family name. Each one has a tiny config in the suite that passes the fp32 gate on
# every CPU target (tests/test_architectures.py); a family outside it is exported and gated too,
# and the summary says it is untested.
TESTED_FAMILIES = {
    "gpt2": "GPT-2",
    "gpt_neo": "GPT-Neo",
    "gptj": "GPT-J",
    "gpt_neox": "GPT-NeoX",
    "gpt_bigcode": "GPT-BigCode",
    "llama": "Llama",
    "qwen2": "Qwen2",
    "mistral": "Mistral",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "opt": "OPT",
    "falcon": "Falcon",
    "phi": "Phi",
}
# Layer kinds whose state is a key/value cache; anything else (mamba, linear attention, conv) is not.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def tested_list() -> str:
    return ", ".join(TESTED_FAMILIES.values())


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
    sliding_window: int | None  # the window, when some or all layers attend through one
    activation: str  # the MLP activation as transformers names it ("gelu_new", "silu", ...)
    # per-layer "full_attention" / "sliding_attention" when the config names them (alternating local/global);
    # None: every layer is alike (windowed when sliding_window is set)
    layer_types: tuple[str, ...] | None = None
    # the module path of the transformer blocks ("model.layers", "transformer.h"): block i's weights are
    # named "{blocks_path}.{i}.*"; the quantization fallback groups layers by it
    blocks_path: str = ""
    # what the graph should show, read from the model's modules (gptkiln.graph's expected fusion counts):
    rms_norms: int = 0  # RMSNorm modules (each one RMSNormalization op), q/k norms included
    rotary: bool = False  # rotary embedding in transformers' rotate_half form (one RotaryEmbedding per q and k)
    sdpa: bool = False  # attention runs through SDPA (one Attention op per layer); eager attention does not

    @property
    def family(self) -> str:
        return TESTED_FAMILIES.get(self.model_type, self.model_type)

    @property
    def tested(self) -> bool:
        return self.model_type in TESTED_FAMILIES

    @property
    def per_layer_masks(self) -> bool:
        """The model takes one mask per layer kind (a dict keyed by layer type)."""
        return self.layer_types is not None and "sliding_attention" in self.layer_types

    def block_of(self, parameter: str) -> int | None:
        """The transformer block a parameter name belongs to, or None (embeddings, final norm, lm_head)."""
        prefix = f"{self.blocks_path}."
        if not self.blocks_path or not parameter.startswith(prefix):
            return None
        index = parameter[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layer_types"] = list(self.layer_types) if self.layer_types else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderSpec":
        layer_types = data.get("layer_types")
        return cls(**{**data, "layer_types": tuple(layer_types) if layer_types else None})


def check_decoder_only(config) -> None:
    """Refuse, from the config alone, what the KV-cache wrapper cannot export; say why."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"'{model_type}' is an encoder-decoder model; gptkiln exports decoder-only causal LMs",
            f"use a decoder-only model (tested: {tested_list()})")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # BERT-like: a causal head exists, but not a GPT decoder
        raise UnsupportedModelError(
            f"'{model_type}' is an encoder (masked-LM) model; gptkiln exports decoder-only causal LMs",
            f"use a decoder-only model (tested: {tested_list()})")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"'{model_type}' has no causal-LM class in transformers (AutoModelForCausalLM cannot load it)",
            f"use a decoder-only causal LM (tested: {tested_list()})")
    if _attention_heads(config) is None:
        raise UnsupportedModelError(
            f"'{model_type}' has no attention heads: its state is recurrent (state-space or RNN), not a KV cache",
            f"gptkiln exports attention decoders with a KV cache (tested: {tested_list()})")
    other = sorted(set(getattr(config, "layer_types", None) or []) - set(ATTENTION_LAYER_TYPES))
    if other:
        raise UnsupportedModelError(
            f"'{model_type}' mixes attention with {', '.join(other)} layers, whose state is not a KV cache",
            f"gptkiln exports attention decoders with a KV cache (tested: {tested_list()})")


def _attention_heads(config) -> int | None:
    return getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)


def decoder_spec(config) -> DecoderSpec:
    """Every architecture parameter from a transformers config (KV heads and head size as the config
    states them; `loading` checks them against the cache the model really writes)."""
    check_decoder_only(config)
    num_heads = _attention_heads(config)
    hidden = config.hidden_size
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        num_kv_heads = 1  # GPT-BigCode, Falcon-7B
    else:
        num_kv_heads = (getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
                        or num_heads)
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    layer_types = tuple(getattr(config, "layer_types", None) or ()) or None
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        window = window if "sliding_attention" in layer_types else None
        layer_types = layer_types if window is not None else None
    return DecoderSpec(
        model_type=config.model_type,
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
        layer_types=layer_types,
    )
